"""The review items read from `results`: one arm per (model version, class) over each
record's chosen result, scores read from the stored vectors in SQL (JSON indexing works on
PostgreSQL and SQLite).

What the review index (`review_index.py`) does not hold is read here: queues filtered by
dataset, run, model version or score, the reviewed states and a queue's decisions of the
day (both starting from the decisions), pages beyond the index's band, a record's view,
and every item for exports and stats. It is also the reference the index's answers are
tested against.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from itertools import chain
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from enrichment.errors import InvalidValue
from enrichment.store.columns import score_at
from enrichment.store.comparison import disagree_condition
from enrichment.store.current import current_results
from enrichment.store.database import Database
from enrichment.store.models import ModelClasses
from enrichment.store.review_index import BAND
from enrichment.store.review_types import (
    MAX_LIMIT,
    STREAM,
    Cursor,
    Item,
    QueueFilter,
    RecordItems,
    RecordView,
    check_filter,
    item_page,
)
from enrichment.store.reviews import Decision, latest_decisions
from enrichment.store.schema import Label, RecordRow, Result, record_item_uri, shown_image_url


def scanned_rows(
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
    inner = scanned(session, filters, models, tail)
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


def scanned(
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


def decided_since(
    session: Session, filters: QueueFilter, models: dict[str, ModelClasses], since: datetime
) -> sa.Subquery | None:
    """The matching items whose standing decision was made at or after `since`, starting
    from the decisions (with `audit`, the audit decisions on the sample's labels); a state
    of pending, any or reviewed counts every decision, one decision counts those."""
    if filters.audit or filters.state in ("pending", "any"):
        filters = replace(filters, state="reviewed")
    query = _items_query(session, filters, models, labelled_column=False, decided_since=since)
    return None if query is None else query.subquery("decided_since")


def _after(items: Any, cursor: Cursor) -> Any:
    """Items ordered after `cursor` by (margin, nulls last; record; class)."""
    margin = sa.func.abs(items.c.confidence - items.c.threshold)
    later_same = sa.tuple_(items.c.record_id, items.c.label_key) > sa.tuple_(
        sa.literal(cursor.record_id), sa.literal(cursor.label_key)
    )
    if cursor.margin is None:
        return margin.is_(None) & later_same
    return (margin > cursor.margin) | margin.is_(None) | ((margin == cursor.margin) & later_same)


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


def record_view(
    db: Database, record_id: str, model_version: str | None = None, audit: bool = False
) -> RecordView:
    """A record with every class of its chosen result (or of `model_version`); with `audit`
    (opened from the audit sample) each class shows its audit decision only, as the
    sample's tiles do."""
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
        items = [scanned_item(row) for row in rows]
        if audit:
            audited = latest_decisions(audit_only=True)
            decided = {
                row.label_key: row
                for row in session.execute(
                    sa.select(audited).where(audited.c.record_id == record_id)
                )
            }
            items = [_with_decision(item, decided.get(item.label_key)) for item in items]
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


def _with_decision(item: Item, decision: Any | None) -> Item:
    """The item with this standing decision (None: pending) instead of its own."""
    return replace(
        item,
        decision=decision.decision if decision else None,
        reviewer=decision.reviewer if decision else None,
        decided_at=decision.decided_at if decision else None,
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
    yield from (scanned_item(row) for row in rows)


def _items_query(
    session: Session,
    filters: QueueFilter,
    models: dict[str, ModelClasses],
    record_id: str | None = None,
    labelled_column: bool = True,
    decided_since: datetime | None = None,
) -> sa.Select | None:
    """Every matching item (of one record, with `record_id`), unordered, as one SELECT;
    None when no class matches. With `decided_since`, only the items whose standing
    decision (audit: audit decision) was made since then (`decided_since()`).

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
    if record_id is not None:
        with_scores = with_scores.where(chosen.c.record_id == record_id)
    reviewed_only = decided_since is not None or (
        not filters.audit and filters.state not in ("pending", "any")
    )
    if reviewed_only:
        # Start from the decisions, which are few, not from every result: one row per
        # decision, each arm keeping those on its class.
        on = latest_decisions(audit_only=filters.audit).alias("decided_items")
        joined = on.c.record_id == chosen.c.record_id
        if decided_since is not None:
            joined &= on.c.decided_at >= decided_since
        with_scores = with_scores.add_columns(
            on.c.label_key.label("decided_key"), on.c.decision, on.c.reviewer, on.c.decided_at
        ).join(on, joined)
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
                    *(
                        [scored.c.decision, scored.c.reviewer, scored.c.decided_at]
                        if reviewed_only
                        else []
                    ),
                ).where(
                    scored.c.model_version == model.version,
                    *([scored.c.decided_key == key] if reviewed_only else []),
                )
            )
    if not arms:
        return None
    items = sa.union_all(*arms).subquery("items")
    # The records' own columns are joined later, for the page only (`_with_records`).
    columns = (
        items.c.record_id,
        items.c.label_key,
        items.c.label_name,
        items.c.model_version,
        items.c.confidence,
        items.c.threshold,
    )
    if reviewed_only:  # the items carry their decision already
        decided = items
        query = sa.select(*columns, items.c.decision, items.c.reviewer, items.c.decided_at)
    else:
        # In the audit sample a label's state is its audit decision: one made in the queue
        # is neither shown to the auditor (the audit is a second, independent look) nor
        # taken as the audit's.
        decided = latest_decisions(audit_only=filters.audit)
        query = sa.select(
            *columns, decided.c.decision, decided.c.reviewer, decided.c.decided_at
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
    if filters.disagree is not None:
        query = query.where(
            disagree_condition(items.c.record_id, items.c.label_key, *filters.disagree)
        )
    if filters.side == "above" or filters.audit:
        query = query.where(Label.record_id.is_not(None))
    elif filters.side == "below":
        query = query.where(Label.record_id.is_(None))
    if filters.audit:
        if decided_since is None:  # pending in the audit sample: no audit decision yet
            query = query.where(decided.c.decision.is_(None))
    elif filters.state == "pending":
        query = query.where(decided.c.decision.is_(None))
    elif filters.state == "reviewed":
        query = query.where(decided.c.decision.is_not(None))
    elif filters.state != "any":
        state = {"accepted": Decision.ACCEPT, "rejected": Decision.REJECT, "added": Decision.ADD}
        query = query.where(decided.c.decision == state[filters.state])
    return query


def scanned_item(row: Any) -> Item:
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


def _with_records(items: sa.Subquery) -> sa.Select:
    """Items with their record's title, provider and dataset (and `labelled`, if missing)."""
    query = sa.select(
        items,
        RecordRow.title,
        RecordRow.provider,
        RecordRow.dataset,
        record_item_uri(RecordRow.item_uri, RecordRow.id).label("item_uri"),
    ).join(RecordRow, RecordRow.id == items.c.record_id)
    if "labelled" not in items.c:
        labelled = sa.exists().where(
            Label.record_id == items.c.record_id,
            Label.model_version == items.c.model_version,
            Label.label_key == items.c.label_key,
        )
        query = query.add_columns(labelled.label("labelled"))
    return query
