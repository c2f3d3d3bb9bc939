"""What an interrupted publish left unsettled, resolved before the next one writes anything.

A ledger row in an intent state means a request may or may not have been
carried out (the publish was killed, or the answer was lost):

- `creating`: the record's annotations are looked up with the search endpoint
  (`target_record_id`). The one that is this tag (tagging, this concept, this
  item) and is this account's (any account's while this one is not yet
  known) is adopted: its id and owner go into the row. Found twice (which
  only a misbehaving server could cause), this account's surplus is
  withdrawn. Not found, the create never happened and the row is forgotten,
  so the label is planned afresh.
- `withdrawing`: DELETE again; it is idempotent (an annotation already gone
  counts as withdrawn).
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

import sqlalchemy as sa

from enrichment.errors import EnrichError, ScopeBusy
from enrichment.publish.annotations_api import AnnotationsAPI, Stored, agent_id
from enrichment.store.database import Database
from enrichment.store.ledger import Publication, PublicationState
from enrichment.store.locks import scope_lock
from enrichment.store.schema import RecordRow, utc_now

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


def count_unsettled(db: Database, api_url: str) -> int:
    query = sa.select(sa.func.count()).where(
        Publication.api_url == api_url, Publication.state.in_(S.UNSETTLED)
    )
    with db.engine.connect() as connection:
        return connection.execute(query).scalar_one()


def known_account(db: Database, api_url: str) -> str | None:
    """The owner of the last annotation this API's own create answered: this account, likely."""
    query = (
        sa.select(Publication.owner)
        .where(
            Publication.api_url == api_url,
            Publication.owner.is_not(None),
            Publication.adopted.is_(False),
        )
        .order_by(Publication.published_at.desc())
        .limit(1)
    )
    with db.engine.connect() as connection:
        return connection.execute(query).scalar()


def resolve_unsettled(
    db: Database,
    api: AnnotationsAPI,
    api_url: str,
    account: str | None,
    pool: ThreadPoolExecutor,
) -> Resolved:
    """Settle every `creating` and `withdrawing` row of this API, the lookups in `pool`."""
    query = (
        sa.select(Publication, RecordRow.item_uri)
        .join(RecordRow, RecordRow.id == Publication.record_id)
        .where(
            Publication.api_url == api_url,
            Publication.state.in_((S.CREATING, S.WITHDRAWING)),
        )
        .order_by(Publication.id)
    )
    with db.sessions() as session:
        rows = [(row, item_uri) for row, item_uri in session.execute(query)]
    resolved = Resolved()
    for row, outcome in pool.map(lambda pair: _resolve(api, *pair, account), rows):
        with db.transaction() as session:
            if outcome is None:
                resolved.forgotten += 1
                session.execute(sa.delete(Publication).where(Publication.id == row.id))
                continue
            if outcome == "withdrawn":
                resolved.withdrawn += 1
                values: dict[str, Any] = {"state": S.WITHDRAWN, "withdrawn_at": utc_now()}
            else:
                resolved.adopted += 1
                values = {
                    "annotation_id": outcome.id,
                    "owner": outcome.owner,
                    "adopted": True,
                    "state": S.PUBLISHED,
                    "published_at": utc_now(),
                }
            session.execute(
                sa.update(Publication)
                .where(Publication.id == row.id)
                .values(updated_at=utc_now(), **values)
            )
    return resolved


def _resolve(
    api: AnnotationsAPI, row: Publication, item_uri: str, account: str | None
) -> tuple[Publication, Stored | str | None]:
    """Runs in a pool thread: the row and what the server holds for it (None: nothing)."""
    if row.state == S.WITHDRAWING:
        assert row.annotation_id is not None
        api.withdraw(row.annotation_id)
        return row, "withdrawn"
    found = sorted(
        (
            annotation
            for annotation in api.search_record(row.record_id)
            if same_tag(annotation, row.concept, item_uri)
            and (account is None or agent_id(annotation.get("creator")) == account)
        ),
        key=lambda annotation: str(annotation["id"]),
    )
    if account is not None:  # then every one found is this account's own
        for surplus in found[1:]:
            api.withdraw(str(surplus["id"]))
    return row, Stored.of(found[0]) if found else None


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
