"""What there is to review, most uncertain first, and the decisions curators make on it.

An item is one class of one record's chosen result (the latest classification
by default, or of a run or model version, as exports choose): its score, the
class threshold, whether the model gave the label (a row in `labels`), and
the record's last decision. Items are ordered by |score - threshold|, closest
first: those are the labels where a curator's word changes most. Scores are
read from the stored score vectors in SQL (JSON indexing works on PostgreSQL
and SQLite), one arm per (model version, class), so nothing is recomputed.

The audit queue instead draws labelled items at random among those without an
audit decision yet: precision estimated from it is not biased by the
uncertainty ordering.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from enrichment.errors import EnrichError
from enrichment.store.current import current_results
from enrichment.store.reviews import Decision, Review, latest_decisions
from enrichment.store.schema import Label, ModelRow, RecordRow, Result, Run

SIDES = ("any", "above", "below")
STATES = ("pending", "reviewed", "accepted", "rejected", "added", "any")
MAX_LIMIT = 500
LOOKUP_CHUNK = 500  # record ids per IN (...) list, well under SQLite's variable limit
EUROPEANA_ITEM_PAGE = "https://www.europeana.eu/item"


class ReviewError(EnrichError):
    """A review request names something that does not exist, or is not a valid decision."""


@dataclass(frozen=True)
class QueueFilter:
    """Which items to show; the defaults are every pending item of every class."""

    labels: Sequence[str] = ()
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

    def check(self) -> None:
        if self.side not in SIDES:
            raise ReviewError(f"side must be one of {', '.join(SIDES)}, not {self.side!r}")
        if self.state not in STATES:
            raise ReviewError(f"state must be one of {', '.join(STATES)}, not {self.state!r}")
        if not 1 <= self.limit <= MAX_LIMIT:
            raise ReviewError(f"limit must be between 1 and {MAX_LIMIT}")
        if self.offset < 0:
            raise ReviewError("offset must not be negative")
        for name, value in (("min_score", self.min_score), ("max_score", self.max_score)):
            if value is not None and not 0 <= value <= 1:
                raise ReviewError(f"{name} must be in [0, 1]")

    def whole_scope(self, state: str, labels: Sequence[str] = ()) -> QueueFilter:
        """Every item in `state` of the same datasets, run and model version: what an
        export or a summary reads whole, whatever page of the queue the filter showed."""
        return QueueFilter(
            labels=labels,
            datasets=self.datasets,
            run_id=self.run_id,
            model_version=self.model_version,
            state=state,
            limit=MAX_LIMIT,
        )


@dataclass(frozen=True)
class ModelClasses:
    """A model version's classes in score order, with their names and thresholds."""

    version: str
    keys: list[str]
    names: list[str]
    thresholds: list[float]

    def index(self, key: str) -> int:
        try:
            return self.keys.index(key)
        except ValueError:
            raise ReviewError(f"model {self.version} has no label {key!r}") from None


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
    item_page: str

    def as_json(self) -> dict[str, Any]:
        document = asdict(self)
        document["decided_at"] = self.decided_at.isoformat() + "Z" if self.decided_at else None
        document["state"] = self.decision or "pending"
        return document


def model_classes(connection: sa.Connection) -> dict[str, ModelClasses]:
    rows = connection.execute(sa.select(ModelRow.version, ModelRow.labels, ModelRow.thresholds))
    return {
        version: ModelClasses(
            version,
            [label["key"] for label in labels],
            [label.get("label") or label["key"] for label in labels],
            [float(threshold) for threshold in thresholds],
        )
        for version, labels, thresholds in rows
    }


def check_scope(connection: sa.Connection, filters: QueueFilter) -> dict[str, ModelClasses]:
    """Refuse a filter naming an unknown run, model version or label; returns the models."""
    filters.check()
    models = model_classes(connection)
    if filters.model_version is not None and filters.model_version not in models:
        raise ReviewError(f"unknown model version {filters.model_version}")
    if (
        filters.run_id is not None
        and connection.execute(sa.select(Run.id).where(Run.id == filters.run_id)).first() is None
    ):
        raise ReviewError(f"run {filters.run_id} does not exist")
    keys = {key for model in models.values() for key in model.keys}
    unknown = sorted(set(filters.labels) - keys)
    if unknown:
        raise ReviewError(f"unknown label {', '.join(unknown)}")
    return models


def _items_query(
    connection: sa.Connection,
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
    if connection.dialect.name == "postgresql":  # parsed once, not once per class
        scores = sa.cast(Result.scores, postgresql.JSONB)
    with_scores = sa.select(
        chosen.c.record_id, chosen.c.model_version, scores.label("scores")
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
            if filters.labels and key not in filters.labels:
                continue
            arms.append(
                sa.select(
                    scored.c.record_id,
                    scored.c.model_version,
                    sa.literal(key, sa.String).label("label_key"),
                    sa.literal(name, sa.String).label("label_name"),
                    scored.c.scores[index].as_float().label("confidence"),
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
        EUROPEANA_ITEM_PAGE + row.record_id,
    )


def _with_records(items: sa.Subquery) -> sa.Select:
    """Items with their record's title, provider and dataset (and `labelled`, if missing)."""
    query = sa.select(items, RecordRow.title, RecordRow.provider, RecordRow.dataset).join(
        RecordRow, RecordRow.id == items.c.record_id
    )
    if "labelled" not in items.c:
        labelled = sa.exists().where(
            Label.record_id == items.c.record_id,
            Label.model_version == items.c.model_version,
            Label.label_key == items.c.label_key,
        )
        query = query.add_columns(labelled.label("labelled"))
    return query


def queue(connection: sa.Connection, filters: QueueFilter) -> tuple[list[Item], int]:
    """One page of items, most uncertain first (audit: in random order), and how many match."""
    models = check_scope(connection, filters)
    query = _items_query(connection, filters, models, labelled_column=False)
    if query is None:
        return [], 0
    inner = query.subquery("matching")

    def uncertainty(items: Any) -> list[Any]:
        margin = sa.func.abs(items.c.confidence - items.c.threshold)
        return [margin.asc().nulls_last(), items.c.record_id, items.c.label_key]

    order = [sa.func.random()] if filters.audit else uncertainty(inner)
    # The count as a window over the same rows: one pass over the items instead of two.
    page = (
        sa.select(inner, sa.func.count().over().label("total"))
        .order_by(*order)
        .limit(filters.limit)
        .offset(filters.offset)
        .subquery("page")
    )
    with_records = _with_records(page)
    if not filters.audit:  # the page in the same order (the audit's random one needs none)
        with_records = with_records.order_by(*uncertainty(page))
    rows = connection.execute(with_records).all()
    if rows:
        return [_item(row) for row in rows], rows[0].total
    total = connection.execute(sa.select(sa.func.count()).select_from(inner)).scalar_one()
    return [], total


def all_items(connection: sa.Connection, filters: QueueFilter) -> Iterable[Item]:
    """Every matching item, by record and label (for stats and exports), streamed."""
    models = check_scope(connection, filters)
    query = _items_query(connection, filters, models)
    if query is None:
        return
    inner = query.subquery("matching")
    ordered = _with_records(inner).order_by(
        inner.c.record_id, inner.c.model_version, inner.c.label_key
    )
    rows = connection.execution_options(stream_results=True, yield_per=2000).execute(ordered)
    yield from (_item(row) for row in rows)


@dataclass(frozen=True)
class RecordView:
    record_id: str
    model_version: str
    title: str | None
    provider: str | None
    dataset: str
    item_page: str
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


def record_view(
    connection: sa.Connection, record_id: str, model_version: str | None = None
) -> RecordView:
    """A record with every class of its chosen result (or of `model_version`)."""
    filters = QueueFilter(model_version=model_version, state="any", limit=MAX_LIMIT)
    models = check_scope(connection, filters)
    query = _items_query(connection, filters, models, record_id)
    if query is None:
        raise ReviewError(f"record {record_id} has no classified result")
    inner = query.subquery("matching")
    rows = connection.execute(
        _with_records(inner).where(inner.c.record_id == record_id).order_by(inner.c.label_key)
    ).all()
    if not rows:
        raise ReviewError(f"record {record_id} has no classified result")
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
        image_url(connection, record_id, version),
        items,
    )


def image_url(connection: sa.Connection, record_id: str, model_version: str) -> str | None:
    """The image a result was classified from (the record's own when the result has none)."""
    return connection.execute(
        sa.select(sa.func.coalesce(Result.image_url, RecordRow.image_url))
        .join(RecordRow, RecordRow.id == Result.record_id)
        .where(Result.record_id == record_id, Result.model_version == model_version)
    ).scalar_one_or_none()


@dataclass(frozen=True)
class DecisionIn:
    """One decision as the API receives it."""

    record_id: str
    label_key: str
    model_version: str
    decision: str
    reviewer: str
    audit: bool = False

    @classmethod
    def from_json(cls, document: Any) -> DecisionIn:
        if not isinstance(document, dict):
            raise ReviewError("a decision is a JSON object")
        fields = {}
        for name in ("record_id", "label_key", "model_version", "decision", "reviewer"):
            value = document.get(name)
            if not isinstance(value, str) or not value.strip():
                raise ReviewError(f"a decision needs {name} (a non-empty string)")
            fields[name] = value.strip()
        if len(fields["reviewer"]) > 200:
            raise ReviewError("reviewer is at most 200 characters")
        audit = document.get("audit", False)
        if not isinstance(audit, bool):
            raise ReviewError("audit is true or false")
        return cls(**fields, audit=audit)


def record_decisions(session: Session, decisions: Sequence[DecisionIn]) -> list[int]:
    """Store decisions after checking each against the model's own labels; returns their ids.

    accept is for a label the model gave, add for one it did not (a missed
    label), reject for either: so an accept is a true positive, an add a
    false negative, and a reject a false positive or a confirmed negative.
    """
    connection = session.connection()
    models = model_classes(connection)
    for decision in decisions:
        if decision.decision not in Decision.ALL:
            raise ReviewError(
                f"decision must be one of {', '.join(Decision.ALL)}, not {decision.decision!r}"
            )
        model = models.get(decision.model_version)
        if model is None:
            raise ReviewError(f"unknown model version {decision.model_version}")
        model.index(decision.label_key)
    results, labels = results_and_labels(
        connection, [(decision.record_id, decision.model_version) for decision in decisions]
    )
    reviews = []
    for decision in decisions:
        if (decision.record_id, decision.model_version) not in results:
            raise ReviewError(
                f"record {decision.record_id} has no result of model {decision.model_version}"
            )
        labelled = (decision.record_id, decision.model_version, decision.label_key) in labels
        if decision.decision == Decision.ACCEPT and not labelled:
            raise ReviewError(
                f"{decision.label_key} is not a label of {decision.record_id}: add it instead"
            )
        if decision.decision == Decision.ADD and labelled:
            raise ReviewError(
                f"{decision.label_key} is already a label of {decision.record_id}: accept it"
            )
        reviews.append(
            Review(
                record_id=decision.record_id,
                label_key=decision.label_key,
                model_version=decision.model_version,
                decision=decision.decision,
                reviewer=decision.reviewer,
                audit=decision.audit,
            )
        )
    session.add_all(reviews)  # inserted in this order, so ids follow the decisions' order
    session.flush()
    return [review.id for review in reviews]


def results_and_labels(
    connection: sa.Connection, pairs: Iterable[tuple[str, str]]
) -> tuple[set[tuple[str, str]], set[tuple[str, str, str]]]:
    """Of these (record, model version) pairs: those that have a result, and the (record,
    model version, label) triples the model gave; a few queries for a whole Label Studio
    import rather than two per decision."""
    wanted: dict[str, set[str]] = {}
    for record_id, version in pairs:
        wanted.setdefault(version, set()).add(record_id)
    results: set[tuple[str, str]] = set()
    labels: set[tuple[str, str, str]] = set()
    for version, record_ids in wanted.items():
        ordered = sorted(record_ids)
        for start in range(0, len(ordered), LOOKUP_CHUNK):
            chunk = ordered[start : start + LOOKUP_CHUNK]
            results.update(
                (record_id, version)
                for record_id in connection.scalars(
                    sa.select(Result.record_id).where(
                        Result.model_version == version, Result.record_id.in_(chunk)
                    )
                )
            )
            labels.update(
                (row.record_id, version, row.label_key)
                for row in connection.execute(
                    sa.select(Label.record_id, Label.label_key).where(
                        Label.model_version == version, Label.record_id.in_(chunk)
                    )
                )
            )
    return results, labels


def undo(session: Session, ids: Sequence[int]) -> int:
    """Take back decisions just made (a slip of the key): the one before each counts again."""
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ReviewError("undo needs the ids of the decisions to take back")
    deleted = session.execute(sa.delete(Review).where(Review.id.in_(ids)))
    return deleted.rowcount
