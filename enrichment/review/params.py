"""What the pages and the JSON API read from a request: a queue filter, decisions, ids.

The store names a wrong value by its field as the `enrich review` commands
call it (`classes`, `run_id`); the API answers with the query parameter's
name instead (`label`, `run`), through `QUERY_PARAMETERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from werkzeug.datastructures import MultiDict

from enrichment.errors import EnrichError, InvalidValue
from enrichment.store.database import Database
from enrichment.store.decisions import PENDING, NewDecision
from enrichment.store.review_queue import MAX_LIMIT, Cursor, QueueFilter
from enrichment.store.review_types import check_filter
from enrichment.store.reviews import Decision

# A QueueFilter field -> the query parameter that sets it, where the two differ.
QUERY_PARAMETERS = {"classes": "label", "datasets": "dataset", "run_id": "run"}
MAX_REVIEWER = 200
MAX_ID = 2**63 - 1
# Every query parameter a queue page reads, in the order links write them.
QUEUE_PARAMETERS = (
    "label",
    "dataset",
    "run",
    "model_version",
    "min_score",
    "max_score",
    "side",
    "state",
    "audit",
    "limit",
    "after",
    "disagree",
)


class ReviewError(EnrichError):
    """A review request is malformed, or the app cannot be served as asked."""


def _number(args: Any, name: str, kind: Callable[[str], Any]) -> Any:
    raw = (args.get(name) or "").strip()
    if not raw:
        return None
    if len(raw) > 40:
        raise InvalidValue(name, f"{name} is too long to be a number here")
    try:
        return kind(raw)
    except ValueError:
        raise InvalidValue(name, f"{name}={raw!r} is not a number") from None


def audit_asked(args: Any) -> bool:
    """Whether the request is the audit sample's (`audit=1`): its items show, and its
    decisions are checked against, the audit decisions only."""
    return args.get("audit") in ("1", "true")


def queue_filter(args: Any, default_limit: int) -> QueueFilter:
    """A QueueFilter from query parameters, as the API documents them."""
    classes = tuple(value for value in args.getlist("label") if value)
    # The queue's form sends the datasets as one comma-separated box: "9101, 9102".
    datasets = tuple(
        part.strip()
        for value in args.getlist("dataset")
        for part in value.split(",")
        if part.strip()
    )
    limit = _number(args, "limit", int)
    return QueueFilter(
        classes=classes,
        datasets=datasets,
        run_id=_number(args, "run", int),
        model_version=args.get("model_version") or None,
        min_score=_number(args, "min_score", float),
        max_score=_number(args, "max_score", float),
        side=args.get("side") or "any",
        state=args.get("state") or "pending",
        audit=audit_asked(args),
        limit=default_limit if limit is None else limit,
        offset=_number(args, "offset", int) or 0,
        after=Cursor.from_text(args["after"]) if args.get("after") else None,
        disagree=_version_pair(args.get("disagree")),
    )


def _version_pair(raw: str | None) -> tuple[str, str] | None:
    """`disagree=A,B`: the two model versions whose disagreements to show."""
    if not raw:
        return None
    first, comma, second = raw.partition(",")
    if not comma or not first.strip() or not second.strip() or "," in second:
        raise InvalidValue("disagree", "disagree is two model versions: A,B")
    return first.strip(), second.strip()


def decision_from_json(document: Any) -> NewDecision:
    """One decision as the API receives it: every field a non-empty string, audit a boolean."""
    if not isinstance(document, dict):
        raise ReviewError("a decision is a JSON object")
    fields = {}
    for name in ("record_id", "label_key", "model_version", "decision", "reviewer"):
        value = document.get(name)
        if not isinstance(value, str) or not value.strip():
            raise InvalidValue(name, f"a decision needs {name} (a non-empty string)")
        fields[name] = value.strip()
    if len(fields["reviewer"]) > MAX_REVIEWER:
        raise InvalidValue("reviewer", f"reviewer is at most {MAX_REVIEWER} characters")
    audit = document.get("audit", False)
    if not isinstance(audit, bool):
        raise InvalidValue("audit", "audit is true or false")
    seen = document.get("seen")
    if seen is not None and seen not in (PENDING, *Decision):
        raise InvalidValue("seen", f"seen is {PENDING} or a decision ({', '.join(Decision)})")
    return NewDecision(**fields, audit=audit, seen=seen)


def decisions_from_json(body: Any) -> list[NewDecision]:
    """A request's decisions: one object, a list of them, or {"decisions": [...]}."""
    if isinstance(body, dict) and "decisions" in body:
        body = body["decisions"]
    documents = body if isinstance(body, list) else [body]
    if not documents or len(documents) > MAX_LIMIT:
        raise ReviewError(f"send between 1 and {MAX_LIMIT} decisions")
    return [decision_from_json(document) for document in documents]


def ids_from_json(body: Any) -> list[int]:
    """The ids an undo names ({"ids": [...]}): at most MAX_LIMIT integers a database holds."""
    ids = body.get("ids") if isinstance(body, dict) else None
    if not isinstance(ids, list) or not 1 <= len(ids) <= MAX_LIMIT:
        raise InvalidValue("ids", f"undo needs the ids of 1 to {MAX_LIMIT} decisions")
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 < i <= MAX_ID for i in ids):
        raise InvalidValue("ids", "ids are the positive integers the decisions were given")
    return ids


def record_ids_from_args(args: Any) -> list[str]:
    """The records a page asks what stands on (`record`, repeated): 1 to MAX_LIMIT."""
    record_ids = sorted({value for value in args.getlist("record") if value})
    if not 1 <= len(record_ids) <= MAX_LIMIT:
        raise InvalidValue("record", f"name 1 to {MAX_LIMIT} records: record=ID&record=ID")
    return record_ids


def reviewer_from_json(body: Any) -> str | None:
    """Who takes decisions back ({"reviewer": NAME}, optional): a short string or nothing."""
    reviewer = body.get("reviewer") if isinstance(body, dict) else None
    if reviewer is None:
        return None
    if not isinstance(reviewer, str) or not reviewer.strip():
        raise InvalidValue("reviewer", "reviewer is a non-empty string")
    if len(reviewer.strip()) > MAX_REVIEWER:
        raise InvalidValue("reviewer", f"reviewer is at most {MAX_REVIEWER} characters")
    return reviewer.strip()


def page_query(args: Any, **changes: str | None) -> list[tuple[str, str]]:
    """The query of a link to another page of the same queue: the known parameters only
    (repeated ones, such as `label`, kept whole), with `changes` set (None removes one)."""
    pairs = [
        (name, value)
        for name in QUEUE_PARAMETERS
        if name not in changes
        for value in args.getlist(name)
        if value
    ]
    return pairs + [(name, value) for name, value in changes.items() if value is not None]


def usable_query(db: Database, args: Any) -> list[tuple[str, str]]:
    """The queue parameters of a refused request that a page can serve: each one refused
    is left out in turn (of the classes, only those no model has), so that the error
    page's way back keeps every filter the curator set that was right."""
    pairs = page_query(args)
    with db.transaction() as session:
        known = {
            key for model in check_filter(session, QueueFilter()).values() for key in model.keys
        }
        pairs = [(name, value) for name, value in pairs if name != "label" or value in known]
        for _ in QUEUE_PARAMETERS:
            try:
                check_filter(session, queue_filter(MultiDict(pairs), 1))
            except InvalidValue as error:
                wrong = QUERY_PARAMETERS.get(error.field, error.field)
                pairs = [(name, value) for name, value in pairs if name != wrong]
            else:
                return pairs
    return []
