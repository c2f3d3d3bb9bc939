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

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from itertools import chain
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from enrichment.errors import InvalidValue
from enrichment.store.columns import score_at
from enrichment.store.current import current_results
from enrichment.store.database import Database
from enrichment.store.models import ModelClasses, model_classes
from enrichment.store.reviews import Decision, latest_decisions
from enrichment.store.schema import Label, RecordRow, Result, Run, shown_image_url, utc_now

SIDES = ("any", "above", "below")
STATES = ("pending", "reviewed", "accepted", "rejected", "added", "any")
MAX_LIMIT = 500
MAX_OFFSET = 10_000_000  # far past any queue a person pages through; keeps the number SQL-sized
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
    total: int  # every matching item, not only the page's
    # Where the next page starts (None: this page is the last one).
    next_page: Cursor | None = None


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
    """One page of items, most uncertain first (audit: in random order), and how many match."""
    with db.transaction() as session:
        models = check_filter(session, filters)
        query = _items_query(session, filters, models, labelled_column=False)
        if query is None:
            return QueuePage([], 0)
        inner = query.subquery("matching")

        def uncertainty(items: Any) -> list[Any]:
            margin = sa.func.abs(items.c.confidence - items.c.threshold)
            return [margin.asc().nulls_last(), items.c.record_id, items.c.label_key]

        order = [sa.func.random()] if filters.audit else uncertainty(inner)
        total = session.execute(sa.select(sa.func.count()).select_from(inner)).scalar_one()
        selected = sa.select(
            inner, sa.func.abs(inner.c.confidence - inner.c.threshold).label("margin")
        )
        if filters.after is not None and not filters.audit:
            selected = selected.where(_after(inner, filters.after))
        page = selected.order_by(*order).limit(filters.limit + 1).offset(filters.offset)
        page = page.subquery("page")
        with_records = _with_records(page)
        if not filters.audit:  # the page in the same order (the audit's random one needs none)
            with_records = with_records.order_by(*uncertainty(page))
        rows = session.execute(with_records).all()
        more, rows = len(rows) > filters.limit, rows[: filters.limit]
        last = rows[-1] if rows and more and not filters.audit else None
        cursor = None if last is None else Cursor(last.margin, last.record_id, last.label_key)
        return QueuePage([_item(row) for row in rows], total, cursor)


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
    """Where a curator stands: items of the filters still pending, decisions made today."""

    pending: int
    decided_today: int

    def as_json(self) -> dict[str, int]:
        return asdict(self)


def queue_progress(db: Database, filters: QueueFilter) -> Progress:
    """The pending items of `filters` (whatever its state) and today's decisions (UTC day)."""
    pending = replace(filters, state="pending", audit=False, after=None, offset=0)
    with db.transaction() as session:
        models = check_filter(session, pending)
        query = _items_query(session, pending, models, labelled_column=False)
        count = 0
        if query is not None:
            count = session.execute(
                sa.select(sa.func.count()).select_from(query.subquery("pending"))
            ).scalar_one()
        today = utc_now().replace(hour=0, minute=0, second=0, microsecond=0)
        standing = latest_decisions()
        decided = session.execute(
            sa.select(sa.func.count()).select_from(standing).where(standing.c.decided_at >= today)
        ).scalar_one()
        return Progress(count, decided)


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
        sa.select(shown_image_url(Result.image_url, RecordRow.image_url))
        .select_from(Result)
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
    dialect = session.get_bind().dialect.name
    with_scores = sa.select(
        chosen.c.record_id, chosen.c.model_version, Result.scores.label("scores")
    ).join(
        Result,
        (Result.record_id == chosen.c.record_id) & (Result.model_version == chosen.c.model_version),
    )
    if record_id is not None:  # on the window's partition key: the database pushes it down
        with_scores = with_scores.where(chosen.c.record_id == record_id)
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
                    score_at(scored.c.scores, index, dialect).label("confidence"),
                    sa.literal(threshold, sa.Float).label("threshold"),
                ).where(scored.c.model_version == model.version)
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
