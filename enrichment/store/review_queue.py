"""What there is to review, most uncertain first: the review app's reads.

An item is one class of one record's chosen result (the latest classification
by default, or of a run or model version, as exports choose): its score, the
class threshold, whether the model gave the label (a row in `labels`), and
the record's last decision. Items are ordered by |score - threshold|, closest
first: those are the labels where a curator's word changes most. Scores are
read from the stored score vectors in SQL (JSON indexing works on PostgreSQL
and SQLite), one arm per (model version, class), so nothing is recomputed.

Pages follow a keyset, not an offset: "next" asks for the items after the
last one shown (its margin, record and class), so deciding a page never
shifts pending items out of reach, as `offset` did once the first page was
decided.

The audit queue instead draws labelled items at random among those without an
audit decision yet: precision estimated from it is not biased by the
uncertainty ordering.

Each function here is one transaction and returns plain dataclasses; a value
the caller gave that names nothing is an `InvalidValue` naming its field.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from itertools import chain
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from enrichment.errors import InvalidValue
from enrichment.store.current import current_results
from enrichment.store.database import Database
from enrichment.store.models import ModelClasses, model_classes
from enrichment.store.review_index import BAND, ReviewItem
from enrichment.store.reviews import Decision, Review, latest_decisions, standing
from enrichment.store.schema import Label, RecordRow, Result, Run, utc_now

SIDES = ("any", "above", "below")
STATES = ("pending", "reviewed", "accepted", "rejected", "added", "any")
MAX_LIMIT = 500
# Offsets read and skip every item before the page: `after` (keyset) is how to page deep.
MAX_OFFSET = 10_000
TOTAL_CAP = 10_000  # totals are exact up to this, then "10,000+"
MAX_ID = 2**63 - 1  # the largest id a database integer holds
STREAM = {"stream_results": True, "yield_per": 2000}


@dataclass(frozen=True)
class Cursor:
    """Where a page of the queue ended: the last item's margin |score - threshold| (None
    for an item without a score, which sorts last), record and class."""

    margin: float | None
    record_id: str
    label_key: str

    def as_text(self) -> str:
        """`margin~class~record` (the record last: it may hold any character)."""
        margin = "none" if self.margin is None else repr(self.margin)
        return f"{margin}~{self.label_key}~{self.record_id}"

    @classmethod
    def from_text(cls, text: str) -> Cursor:
        margin, _, rest = text.partition("~")
        label_key, _, record_id = rest.partition("~")
        if not record_id or not label_key:
            raise InvalidValue("after", "after is margin~class~record, as a next-page link has it")
        try:
            value = None if margin == "none" else float(margin)
        except ValueError:
            raise InvalidValue("after", f"after: {margin!r} is not a number") from None
        if value is not None and not 0 <= value <= 1:
            raise InvalidValue("after", "after: the margin is in [0, 1]")
        return cls(value, record_id, label_key)


@dataclass(frozen=True)
class QueueFilter:
    """Which items to show; the defaults are every pending item of every class.

    The fields are named as the `enrich review` commands name their parameters,
    so an `InvalidValue` about one names the option the user gave.
    """

    classes: Sequence[str] = ()
    datasets: Sequence[str] = ()
    run_id: int | None = None
    model_version: str | None = None
    min_score: float | None = None
    max_score: float | None = None
    side: str = "any"  # above: the model gave the label; below: it did not
    state: str = "pending"
    # The audit sample: labels without an audit decision, in random order; `state` is ignored.
    audit: bool = False
    limit: int = 50
    offset: int = 0
    # Keyset paging: only items ordered after this one (see `Cursor`); not for the audit.
    after: Cursor | None = None

    def check(self) -> None:
        """Refuse values out of range (what needs the database is `check_filter`'s)."""
        if self.side not in SIDES:
            raise InvalidValue("side", f"side must be one of {', '.join(SIDES)}, not {self.side!r}")
        if self.state not in STATES:
            raise InvalidValue(
                "state", f"state must be one of {', '.join(STATES)}, not {self.state!r}"
            )
        if not 1 <= self.limit <= MAX_LIMIT:
            raise InvalidValue("limit", f"limit must be between 1 and {MAX_LIMIT}")
        if not 0 <= self.offset <= MAX_OFFSET:
            raise InvalidValue("offset", f"offset must be between 0 and {MAX_OFFSET}")
        if self.run_id is not None and not 0 < self.run_id <= MAX_ID:
            raise InvalidValue("run_id", f"run {self.run_id} does not exist")
        for name, value in (("min_score", self.min_score), ("max_score", self.max_score)):
            if value is not None and not 0 <= value <= 1:
                raise InvalidValue(name, f"{name} must be in [0, 1]")

    def everything(self, state: str, classes: Sequence[str] = ()) -> QueueFilter:
        """Every item in `state` of the same datasets, run and model version: what an
        export or a summary reads whole, whatever page of the queue the filter showed."""
        return QueueFilter(
            classes=classes,
            datasets=self.datasets,
            run_id=self.run_id,
            model_version=self.model_version,
            state=state,
            limit=MAX_LIMIT,
        )


@dataclass(frozen=True)
class Item:
    """One class of one record, as the queue and the record view show it."""

    record_id: str
    label_key: str
    label_name: str
    model_version: str
    confidence: float | None
    threshold: float
    labelled: bool
    decision: str | None
    reviewer: str | None
    decided_at: datetime | None
    title: str | None
    provider: str | None
    dataset: str
    item_page: str | None

    def as_json(self) -> dict[str, Any]:
        document = asdict(self)
        document["decided_at"] = self.decided_at.isoformat() + "Z" if self.decided_at else None
        document["state"] = self.decision or "pending"
        return document


@dataclass(frozen=True)
class QueuePage:
    items: list[Item]
    total: int  # every matching item, not only the page's, up to TOTAL_CAP
    # Where the next page starts (None: this page is the last one).
    next_page: Cursor | None = None
    total_capped: bool = False  # more than TOTAL_CAP items match


@dataclass(frozen=True)
class RecordView:
    record_id: str
    model_version: str
    title: str | None
    provider: str | None
    dataset: str
    item_page: str | None
    image_url: str | None
    items: list[Item] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "record_id": self.record_id,
            "model_version": self.model_version,
            "title": self.title,
            "provider": self.provider,
            "dataset": self.dataset,
            "item_page": self.item_page,
            "items": [item.as_json() for item in self.items],
        }


@dataclass(frozen=True)
class RecordItems:
    """The items of one record's result, with the image it was classified from."""

    record_id: str
    model_version: str
    image_url: str | None
    items: list[Item]


def registered_models(db: Database) -> dict[str, ModelClasses]:
    """Every registered model version's classes and thresholds, by version."""
    with db.transaction() as session:
        return model_classes(session)


def check_filter(session: Session, filters: QueueFilter) -> dict[str, ModelClasses]:
    """Refuse a filter naming an unknown run, model version or class; returns the models."""
    filters.check()
    models = model_classes(session)
    if filters.model_version is not None and filters.model_version not in models:
        raise InvalidValue("model_version", f"unknown model version {filters.model_version}")
    if (
        filters.run_id is not None
        and session.execute(sa.select(Run.id).where(Run.id == filters.run_id)).first() is None
    ):
        raise InvalidValue("run_id", f"run {filters.run_id} does not exist")
    keys = {key for model in models.values() for key in model.keys}
    unknown = sorted(set(filters.classes) - keys)
    if unknown:
        known = f"known: {', '.join(sorted(keys))}" if keys else "no model is registered yet"
        raise InvalidValue("classes", f"no model has the class {', '.join(unknown)} ({known})")
    return models


def queue_page(db: Database, filters: QueueFilter) -> QueuePage:
    """One page of items, most uncertain first (audit: in random order), and how many match
    (counted up to `TOTAL_CAP`).

    The default queue (pending or any state, over all datasets, of the current results,
    by class and side) and the audit sample are read from the review index: their pages
    cost the same at any collection size. Other filters scan `results` (`_scanned_rows`).
    """
    with db.transaction() as session:
        models = check_filter(session, filters)
        keys = _keys(filters, models)
        if not keys:
            return QueuePage([], 0)
        total, capped = _total(session, filters, models, keys)
        if filters.audit and _indexed(filters):
            rows = _sampled_rows(session, filters, keys)
            items = _indexed_items(session, rows[filters.offset :], models)
            return QueuePage(items, total, None, capped)
        in_band = filters.after is None or (
            filters.after.margin is not None and filters.after.margin <= BAND
        )
        if _indexed(filters) and in_band:
            rows = _band_rows(session, filters, keys)
            picked = rows[filters.offset : filters.offset + filters.limit + 1]
            items = _indexed_items(session, picked, models)
            margins = [row.margin for row in picked]
            if len(rows) < filters.offset + filters.limit + 1:  # the band is exhausted
                tail = _scanned_rows(
                    session,
                    replace(filters, after=None),
                    models,
                    offset=max(0, filters.offset - len(rows)),
                    limit=filters.limit + 1 - len(items),
                    tail=True,
                )
                items += [_item(row) for row in tail]
                margins += [row.margin for row in tail]
        else:
            rows = _scanned_rows(
                session, filters, models, offset=filters.offset, limit=filters.limit + 1
            )
            items = [_item(row) for row in rows]
            margins = [row.margin for row in rows]
        more, items = len(items) > filters.limit, items[: filters.limit]
        last = items[-1] if items and more and not filters.audit else None
        cursor = (
            None
            if last is None
            else Cursor(margins[filters.limit - 1], last.record_id, last.label_key)
        )
        return QueuePage(items, total, cursor, capped)


def _indexed(filters: QueueFilter) -> bool:
    """Whether the review index answers these filters: it holds the current results' items
    over all datasets, with their margin and whether labelled, not their score."""
    return (
        not filters.datasets
        and filters.run_id is None
        and filters.model_version is None
        and filters.min_score is None
        and filters.max_score is None
        and (filters.audit or filters.state in ("pending", "any"))
    )


def _keys(filters: QueueFilter, models: dict[str, ModelClasses]) -> list[str]:
    """The class keys the filters cover, over the model versions they cover."""
    return sorted(
        {
            key
            for model in models.values()
            if filters.model_version is None or model.version == filters.model_version
            for key in model.keys
            if not filters.classes or key in filters.classes
        }
    )


def _decided(item: type[ReviewItem], audit_only: bool = False) -> sa.Exists:
    """A standing decision (in the audit sample, with `audit_only`) on the index item."""
    return sa.exists().where(
        Review.record_id == item.record_id,
        Review.label_key == item.label_key,
        *([Review.audit.is_(True)] if audit_only else []),
        standing(),
    )


def _band_scope(filters: QueueFilter) -> list[Any]:
    """The conditions on index items in the band that the state and side filters set."""
    scope: list[Any] = [ReviewItem.margin <= BAND]
    if filters.side == "above":
        scope.append(ReviewItem.labelled.is_(True))
    elif filters.side == "below":
        scope.append(ReviewItem.labelled.is_(False))
    if filters.state == "pending":
        scope.append(~_decided(ReviewItem))
    return scope


INDEX_COLUMNS = (
    ReviewItem.record_id,
    ReviewItem.label_key,
    ReviewItem.model_version,
    ReviewItem.margin,
    ReviewItem.labelled,
)


def _band_rows(session: Session, filters: QueueFilter, keys: Sequence[str]) -> list[Any]:
    """The first `offset + limit + 1` items in the band after the cursor, in queue order.

    One arm per class, each an index range scan from the cursor that stops at the page's
    size, merged and ordered in SQL (so record ids compare under the database's collation,
    as the scanned query's do).
    """
    want = filters.offset + filters.limit + 1
    scope = _band_scope(filters)
    cursor = filters.after
    if cursor is not None:
        at = sa.tuple_(ReviewItem.margin, ReviewItem.record_id)
        mark = sa.tuple_(sa.literal(cursor.margin, sa.Float), sa.literal(cursor.record_id))
        same = (ReviewItem.margin == cursor.margin) & (ReviewItem.record_id == cursor.record_id)
        scope += [at >= mark, ~(same & (ReviewItem.label_key <= cursor.label_key))]
    arms = [
        sa.select(
            *sa.select(*INDEX_COLUMNS)
            .where(ReviewItem.label_key == key, *scope)
            .order_by(ReviewItem.margin, ReviewItem.record_id)
            .limit(want)
            .subquery(f"arm{number}")
            .c
        )
        for number, key in enumerate(keys)
    ]
    merged = sa.union_all(*arms).subquery("band")
    return session.execute(
        sa.select(merged)
        .order_by(merged.c.margin, merged.c.record_id, merged.c.label_key)
        .limit(want)
    ).all()


def _sampled_rows(session: Session, filters: QueueFilter, keys: Sequence[str]) -> list[Any]:
    """`offset + limit` labelled items without an audit decision, from a random point of
    the sample-key order on (wrapping around): the sample key is a hash of the record id,
    so whatever the start, every such item is as likely to be drawn, whatever its score."""
    want = filters.offset + filters.limit
    start = secrets.randbelow(2**31)
    scope = [ReviewItem.labelled.is_(True), ~_decided(ReviewItem, audit_only=True)]
    rows: list[Any] = []
    for part in (ReviewItem.sample_key >= start, ReviewItem.sample_key < start):
        arms = [
            sa.select(
                *sa.select(*INDEX_COLUMNS, ReviewItem.sample_key)
                .where(ReviewItem.label_key == key, part, *scope)
                .order_by(ReviewItem.sample_key, ReviewItem.record_id)
                .limit(want - len(rows))
                .subquery(f"arm{number}")
                .c
            )
            for number, key in enumerate(keys)
        ]
        merged = sa.union_all(*arms).subquery("sample")
        rows += session.execute(
            sa.select(merged)
            .order_by(merged.c.sample_key, merged.c.record_id, merged.c.label_key)
            .limit(want - len(rows))
        ).all()
        if len(rows) >= want:
            break
    return rows


def _indexed_items(
    session: Session, rows: Sequence[Any], models: dict[str, ModelClasses]
) -> list[Item]:
    """Items of index rows, in their order: the score from the result, the threshold and
    name from the model, the decision and the record's columns, a few lookups per page."""
    if not rows:
        return []
    record_ids = sorted({row.record_id for row in rows})
    records = {
        record.id: record
        for record in session.execute(
            sa.select(
                RecordRow.id,
                RecordRow.title,
                RecordRow.provider,
                RecordRow.dataset,
                RecordRow.item_uri,
            ).where(RecordRow.id.in_(record_ids))
        )
    }
    pairs = {(row.record_id, row.model_version) for row in rows}
    scores = {
        (record_id, version): vector
        for record_id, version, vector in session.execute(
            sa.select(Result.record_id, Result.model_version, Result.scores).where(
                Result.record_id.in_(record_ids)
            )
        )
        if (record_id, version) in pairs
    }
    decided = latest_decisions()
    decisions = {
        (row.record_id, row.label_key): row
        for row in session.execute(sa.select(decided).where(decided.c.record_id.in_(record_ids)))
    }
    items = []
    for row in rows:
        model = models[row.model_version]
        index = model.keys.index(row.label_key)
        vector = scores.get((row.record_id, row.model_version)) or []
        record = records[row.record_id]
        decision = decisions.get((row.record_id, row.label_key))
        items.append(
            Item(
                row.record_id,
                row.label_key,
                model.names[index],
                row.model_version,
                vector[index] if index < len(vector) else None,
                model.thresholds[index],
                bool(row.labelled),
                decision.decision if decision else None,
                decision.reviewer if decision else None,
                decision.decided_at if decision else None,
                record.title or None,
                record.provider,
                record.dataset,
                item_page(record.item_uri),
            )
        )
    return items


def _scanned_rows(
    session: Session,
    filters: QueueFilter,
    models: dict[str, ModelClasses],
    offset: int,
    limit: int,
    tail: bool = False,
) -> list[Any]:
    """A page of items read from `results` (with `tail`, of those beyond the band only),
    with their margin: what the review index does not hold, and the reference its
    answers are tested against."""
    inner = _scanned(session, filters, models, tail)
    if inner is None:
        return []

    def uncertainty(items: Any) -> list[Any]:
        margin = sa.func.abs(items.c.confidence - items.c.threshold)
        return [margin.asc().nulls_last(), items.c.record_id, items.c.label_key]

    order = [sa.func.random()] if filters.audit else uncertainty(inner)
    selected = sa.select(inner, sa.func.abs(inner.c.confidence - inner.c.threshold).label("margin"))
    if filters.after is not None and not filters.audit:
        selected = selected.where(_after(inner, filters.after))
    page = selected.order_by(*order).limit(limit).offset(offset).subquery("page")
    with_records = _with_records(page)
    if not filters.audit:  # the page in the same order (the audit's random one needs none)
        with_records = with_records.order_by(*uncertainty(page))
    return session.execute(with_records).all()


def _scanned(
    session: Session, filters: QueueFilter, models: dict[str, ModelClasses], tail: bool = False
) -> sa.Subquery | None:
    """Every matching item read from `results` (`tail`: beyond the band), as a subquery."""
    query = _items_query(session, filters, models, labelled_column=False)
    if query is None:
        return None
    if tail:
        inner = query.subquery("all_matching")
        margin = sa.func.abs(inner.c.confidence - inner.c.threshold)
        query = sa.select(inner).where((margin > BAND) | margin.is_(None))
    return query.subquery("matching")


def _total(
    session: Session, filters: QueueFilter, models: dict[str, ModelClasses], keys: Sequence[str]
) -> tuple[int, bool]:
    """How many items match, counted up to `TOTAL_CAP` (then True: there are more): an exact
    count of the default queue would be a pass over every result."""
    counted = 0
    tail = False
    if _indexed(filters):
        if filters.audit:
            scope = [ReviewItem.labelled.is_(True), ~_decided(ReviewItem, audit_only=True)]
        else:
            scope, tail = _band_scope(filters), True
        band = (
            sa.select(ReviewItem.record_id)
            .where(ReviewItem.label_key.in_(keys), *scope)
            .limit(TOTAL_CAP + 1)
        )
        counted = _count(session, band.subquery("band"))
        if counted > TOTAL_CAP or not tail:
            return min(counted, TOTAL_CAP), counted > TOTAL_CAP
    scanned = _scanned(session, replace(filters, after=None), models, tail)
    if scanned is not None:
        limited = sa.select(scanned).limit(TOTAL_CAP + 1 - counted).subquery("limited")
        counted += _count(session, limited)
    return min(counted, TOTAL_CAP), counted > TOTAL_CAP


def _count(session: Session, rows: sa.Subquery) -> int:
    return session.execute(sa.select(sa.func.count()).select_from(rows)).scalar_one()


def _after(items: Any, cursor: Cursor) -> Any:
    """Items ordered after `cursor` by (margin, nulls last; record; class)."""
    margin = sa.func.abs(items.c.confidence - items.c.threshold)
    later_same = sa.tuple_(items.c.record_id, items.c.label_key) > sa.tuple_(
        sa.literal(cursor.record_id), sa.literal(cursor.label_key)
    )
    if cursor.margin is None:
        return margin.is_(None) & later_same
    return (margin > cursor.margin) | margin.is_(None) | ((margin == cursor.margin) & later_same)


@dataclass(frozen=True)
class Progress:
    """Where a curator stands: items of the filters still pending (up to `TOTAL_CAP`, then
    `pending_capped`), decisions made today."""

    pending: int
    decided_today: int
    pending_capped: bool = False

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def queue_progress(db: Database, filters: QueueFilter) -> Progress:
    """The pending items of `filters` (whatever its state) and today's decisions (UTC day)."""
    pending = replace(filters, state="pending", audit=False, after=None, offset=0)
    with db.transaction() as session:
        models = check_filter(session, pending)
        keys = _keys(pending, models)
        count, capped = _total(session, pending, models, keys) if keys else (0, False)
        today = utc_now().replace(hour=0, minute=0, second=0, microsecond=0)
        standing_now = latest_decisions()
        decided = session.execute(
            sa.select(sa.func.count())
            .select_from(standing_now)
            .where(standing_now.c.decided_at >= today)
        ).scalar_one()
        return Progress(count, decided, capped)


def all_items(db: Database, filters: QueueFilter) -> Iterator[Item]:
    """Every matching item, by record, model version and class (for stats), streamed."""
    with db.transaction() as session:
        yield from _all_items(session, filters)


def items_by_record(
    db: Database, filters: QueueFilter, decided: bool | None = None
) -> Iterator[RecordItems]:
    """Every matching item grouped per (record, model version), with the record's image URL,
    streamed in record order: what the labelled set and Label Studio tasks are written from.

    `decided` True keeps the records with a decision on any of their items, False those
    with none, None every record; the image URL is looked up for the records kept only.
    """
    with db.transaction() as session:
        group: list[Item] = []
        for item in chain(_all_items(session, filters), [None]):
            if group and (
                item is None
                or (item.record_id, item.model_version)
                != (group[0].record_id, group[0].model_version)
            ):
                if decided is None or decided == any(each.decision for each in group):
                    first = group[0]
                    url = _image_url(session, first.record_id, first.model_version)
                    yield RecordItems(first.record_id, first.model_version, url, group)
                group = []
            if item is not None:
                group.append(item)


def record_view(db: Database, record_id: str, model_version: str | None = None) -> RecordView:
    """A record with every class of its chosen result (or of `model_version`)."""
    filters = QueueFilter(model_version=model_version, state="any", limit=MAX_LIMIT)
    with db.transaction() as session:
        models = check_filter(session, filters)
        query = _items_query(session, filters, models, record_id)
        if query is None:
            raise InvalidValue("record_id", f"record {record_id} has no classified result")
        inner = query.subquery("matching")
        rows = session.execute(
            _with_records(inner).where(inner.c.record_id == record_id).order_by(inner.c.label_key)
        ).all()
        if not rows:
            raise InvalidValue("record_id", f"record {record_id} has no classified result")
        items = [_item(row) for row in rows]
        version = items[0].model_version
        order = models[version].keys
        items.sort(key=lambda item: order.index(item.label_key))
        first = items[0]
        return RecordView(
            record_id,
            version,
            first.title,
            first.provider,
            first.dataset,
            first.item_page,
            _image_url(session, record_id, version),
            items,
        )


def image_url(db: Database, record_id: str, model_version: str) -> str | None:
    """The image a result was classified from (the record's own when the result has none)."""
    with db.transaction() as session:
        return _image_url(session, record_id, model_version)


def _image_url(session: Session, record_id: str, model_version: str) -> str | None:
    return session.execute(
        sa.select(sa.func.coalesce(Result.image_url, RecordRow.image_url))
        .join(RecordRow, RecordRow.id == Result.record_id)
        .where(Result.record_id == record_id, Result.model_version == model_version)
    ).scalar_one_or_none()


def _all_items(session: Session, filters: QueueFilter) -> Iterator[Item]:
    models = check_filter(session, filters)
    query = _items_query(session, filters, models)
    if query is None:
        return
    inner = query.subquery("matching")
    ordered = _with_records(inner).order_by(
        inner.c.record_id, inner.c.model_version, inner.c.label_key
    )
    rows = session.execute(ordered, execution_options=STREAM)
    yield from (_item(row) for row in rows)


def _items_query(
    session: Session,
    filters: QueueFilter,
    models: dict[str, ModelClasses],
    record_id: str | None = None,
    labelled_column: bool = True,
) -> sa.Select | None:
    """Every matching item (of one record, with `record_id`), unordered, as one SELECT;
    None when no class matches.

    Without `labelled_column` (and unless the filters need it) whether the model gave
    the label is left to `_with_records`, which looks it up for a page's rows only:
    looked up for every item, it is most of the cost of a queue over all classes.
    """
    chosen = current_results(filters.datasets, filters.run_id, filters.model_version)
    scores: Any = Result.scores
    if session.get_bind().dialect.name == "postgresql":  # parsed once, not once per class
        scores = sa.cast(Result.scores, postgresql.JSONB)
    with_scores = sa.select(
        chosen.c.record_id, chosen.c.model_version, scores.label("scores")
    ).join(
        Result,
        (Result.record_id == chosen.c.record_id) & (Result.model_version == chosen.c.model_version),
    )
    if record_id is not None:
        with_scores = with_scores.where(chosen.c.record_id == record_id)
    reviewed_only = not filters.audit and filters.state not in ("pending", "any")
    if reviewed_only:
        # Start from the decisions, which are few, not from every result: one row per
        # decision, each arm keeping those on its class.
        on = latest_decisions().alias("decided_items")
        with_scores = with_scores.add_columns(on.c.label_key.label("decided_key")).join(
            on, on.c.record_id == chosen.c.record_id
        )
    scored = with_scores.cte("scored")
    arms = []
    for model in models.values():
        if filters.model_version is not None and model.version != filters.model_version:
            continue
        for index, (key, name, threshold) in enumerate(
            zip(model.keys, model.names, model.thresholds, strict=True)
        ):
            if filters.classes and key not in filters.classes:
                continue
            arms.append(
                sa.select(
                    scored.c.record_id,
                    scored.c.model_version,
                    sa.literal(key, sa.String).label("label_key"),
                    sa.literal(name, sa.String).label("label_name"),
                    scored.c.scores[index].as_float().label("confidence"),
                    sa.literal(threshold, sa.Float).label("threshold"),
                ).where(
                    scored.c.model_version == model.version,
                    *([scored.c.decided_key == key] if reviewed_only else []),
                )
            )
    if not arms:
        return None
    items = sa.union_all(*arms).subquery("items")
    decided = latest_decisions()
    # The records' own columns are joined later, for the page only (`_with_records`).
    query = sa.select(
        items.c.record_id,
        items.c.label_key,
        items.c.label_name,
        items.c.model_version,
        items.c.confidence,
        items.c.threshold,
        decided.c.decision,
        decided.c.reviewer,
        decided.c.decided_at,
    ).outerjoin(
        decided,
        (decided.c.record_id == items.c.record_id) & (decided.c.label_key == items.c.label_key),
    )
    if labelled_column or filters.side != "any" or filters.audit:
        query = query.add_columns(Label.record_id.is_not(None).label("labelled")).outerjoin(
            Label,
            (Label.record_id == items.c.record_id)
            & (Label.model_version == items.c.model_version)
            & (Label.label_key == items.c.label_key),
        )
    if filters.min_score is not None:
        query = query.where(items.c.confidence >= filters.min_score)
    if filters.max_score is not None:
        query = query.where(items.c.confidence <= filters.max_score)
    if filters.side == "above" or filters.audit:
        query = query.where(Label.record_id.is_not(None))
    elif filters.side == "below":
        query = query.where(Label.record_id.is_(None))
    if filters.audit:  # pending in the audit sample: no audit decision yet
        audited = latest_decisions(audit_only=True)
        query = query.where(
            ~sa.exists().where(
                audited.c.record_id == items.c.record_id,
                audited.c.label_key == items.c.label_key,
            )
        )
    elif filters.state == "pending":
        query = query.where(decided.c.decision.is_(None))
    elif filters.state == "reviewed":
        query = query.where(decided.c.decision.is_not(None))
    elif filters.state != "any":
        state = {"accepted": Decision.ACCEPT, "rejected": Decision.REJECT, "added": Decision.ADD}
        query = query.where(decided.c.decision == state[filters.state])
    return query


def _item(row: Any) -> Item:
    return Item(
        row.record_id,
        row.label_key,
        row.label_name,
        row.model_version,
        row.confidence,
        row.threshold,
        bool(row.labelled),
        row.decision,
        row.reviewer,
        row.decided_at,
        row.title or None,
        row.provider,
        row.dataset,
        item_page(row.item_uri),
    )


def item_page(item_uri: str | None) -> str | None:
    """Where a person sees the record: its item URI, as the run report links it (one rule).

    Europeana's `http://data.europeana.eu/item/…` resolves to the item's page. Only
    http(s) is a link: an item URI from a records file is third-party text.
    """
    if item_uri and item_uri.startswith(("http://", "https://")):
        return item_uri
    return None


def _with_records(items: sa.Subquery) -> sa.Select:
    """Items with their record's title, provider and dataset (and `labelled`, if missing)."""
    query = sa.select(
        items, RecordRow.title, RecordRow.provider, RecordRow.dataset, RecordRow.item_uri
    ).join(RecordRow, RecordRow.id == items.c.record_id)
    if "labelled" not in items.c:
        labelled = sa.exists().where(
            Label.record_id == items.c.record_id,
            Label.model_version == items.c.model_version,
            Label.label_key == items.c.label_key,
        )
        query = query.add_columns(labelled.label("labelled"))
    return query
