"""What an interrupted publish left unsettled, resolved before the next one writes anything.

A ledger row in an intent state means a request may or may not have been
carried out (the publish was killed, or the answer was lost):

- `creating`: the record's annotations are looked up with the search endpoint
  (`target_record_id`). The one that is this tag (tagging, this concept, this
  item) and is this account's is adopted: its id and owner go into the row.
  Found twice (which only a misbehaving server could cause), this account's
  surplus is withdrawn. Not found, the create never happened and the row is
  forgotten, so the label is planned afresh. Which account is this one is only
  sure once this publish's own creates have been answered (the token may have
  changed since the ledger's last answer). Before that, the ledger's last
  account (`known_account`) is taken for it where it holds the tag; where only
  other accounts do, or (no ledger account yet: the first publish) several
  do, the row is left for the closing resolve, when this publish's account is
  known, rather than adopting another account's annotation and leaving this
  one's behind, or forgetting this one's and creating it twice. With no
  ledger account, a tag one account holds is adopted (the same annotation:
  creating another would duplicate it).
- `withdrawing`: DELETE again; it is idempotent (an annotation already gone
  counts as withdrawn). A row whose id is not an annotation id (which only an
  older version of this project could have recorded) names nothing that could
  be deleted, and is settled as withdrawn without a request.
- `updating` needs no request here: the plan treats its content as unknown
  and sends the update again, which is idempotent too.

Resolving another publish's intents while its requests are in flight would
forget creates that are about to succeed, so only one publish per API runs
at a time (`publish_lock`).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from enrichment.errors import EnrichError, ScopeBusy
from enrichment.publish.annotations_api import AnnotationsAPI, Stored, agent_id
from enrichment.store.database import Database
from enrichment.store.ledger import PublicationState
from enrichment.store.locks import scope_lock
from enrichment.store.publications import (
    Adopted,
    UnsettledIntent,
    Withdrawn,
    forget_intent,
    record_outcomes,
    unsettled_intents,
)

S = PublicationState


class PublishError(EnrichError):
    """A publish cannot start: another one is running against the same API."""


@contextmanager
def publish_lock(db: Database, api_url: str) -> Iterator[None]:
    """One publish per API at a time: a second would resolve the first one's intents."""
    lock = scope_lock(db, {"publish": api_url})
    try:
        lock.__enter__()
    except ScopeBusy:
        raise PublishError(
            f"another publish to {api_url} is running right now; try again later"
        ) from None
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


@dataclass
class Resolved:
    adopted: int = 0
    forgotten: int = 0
    withdrawn: int = 0
    # Creates whose tag the server holds, but not as the ledger's account (or as several
    # accounts, with none in the ledger), while this publish's account is not sure.
    undecided: int = 0


@dataclass(frozen=True)
class Account:
    """Whose annotations this publish's are: `sure`, learned from this publish's own answers;
    else `likely`, the owner of the ledger's last answered create (None: no create yet)."""

    sure: str | None = None
    likely: str | None = None


UNDECIDED = "undecided"


def resolve_unsettled(
    db: Database,
    api: AnnotationsAPI,
    api_url: str,
    account: Account,
    pool: ThreadPoolExecutor,
) -> Resolved:
    """Settle every `creating` and `withdrawing` row of this API, the lookups in `pool`.

    Each row is settled in a transaction of its own as soon as its lookup is
    back, so what was learnt survives a publish killed half-way through.
    """
    resolved = Resolved()
    intents = unsettled_intents(db, api_url)
    for intent, outcome in pool.map(lambda intent: _resolve(api, intent, account), intents):
        if outcome is None:
            resolved.forgotten += 1
            forget_intent(db, intent.id)
        elif outcome == UNDECIDED:
            resolved.undecided += 1
        elif outcome == "withdrawn":
            resolved.withdrawn += 1
            record_outcomes(db, [Withdrawn(intent.id)])
        else:
            resolved.adopted += 1
            record_outcomes(db, [Adopted(intent.id, outcome.id, outcome.owner)])
    return resolved


def _resolve(
    api: AnnotationsAPI, intent: UnsettledIntent, account: Account
) -> tuple[UnsettledIntent, Stored | str | None]:
    """Runs in a pool thread: the row and what the server holds for it (None: nothing;
    `UNDECIDED`: left for when this publish's account is known)."""
    if intent.state == S.WITHDRAWING:
        if api.is_annotation_id(intent.annotation_id):
            assert intent.annotation_id is not None
            api.withdraw(intent.annotation_id)
        return intent, "withdrawn"
    # Only annotations with a usable id come from the search.
    found = sorted(
        (
            annotation
            for annotation in api.search_record(intent.record_id)
            if same_tag(annotation, intent.concept, intent.item_uri)
        ),
        key=lambda annotation: str(annotation["id"]),
    )
    creators = {agent_id(annotation.get("creator")) for annotation in found}
    owner = account.sure
    if owner is None and account.likely is not None and account.likely in creators:
        owner = account.likely
    elif owner is None and (account.likely is not None or len(creators) > 1) and found:
        # Another account's only (the ledger's is not among them: the token changed, or
        # the create never happened), or several and no ledger account.
        return intent, UNDECIDED
    if owner is not None:  # then every one kept is this account's own
        found = [a for a in found if agent_id(a.get("creator")) == owner]
        for surplus in found[1:]:
            api.withdraw(str(surplus["id"]))
    return intent, api.stored(found[0]) if found else None


def same_tag(annotation: dict[str, Any], concept: str, item_uri: str) -> bool:
    """The server's annotation is this semantic tag: tagging, this concept, this item."""
    body = annotation.get("body")
    body_id = body.get("id") if isinstance(body, dict) else body
    target = annotation.get("target")
    targets = target if isinstance(target, list) else [target]
    target_ids = {
        uri
        for t in targets
        for uri in ((t.get("source"), t.get("scope"), t.get("id")) if isinstance(t, dict) else (t,))
    }
    return (
        annotation.get("motivation") == "tagging" and body_id == concept and item_uri in target_ids
    )
