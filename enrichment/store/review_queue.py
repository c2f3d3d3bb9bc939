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

The default queue and the audit sample are read from the review index
(`review_index.py`), so that their pages cost the same at any collection size;
other filters, and pages beyond the index's band, from `results`
(`review_scan.py`). Totals are counted up to `TOTAL_CAP`.

Each function here is one transaction and returns plain dataclasses; a value
the caller gave that names nothing is an `InvalidValue` naming its field.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from enrichment.store.database import Database
from enrichment.store.models import ModelClasses
from enrichment.store.review_index import BAND, ReviewItem
from enrichment.store.review_scan import (
    all_items,
    decided_since,
    image_url,
    items_by_record,
    record_view,
    scanned,
    scanned_item,
    scanned_rows,
)
from enrichment.store.review_types import (
    MAX_LIMIT,
    SIDES,
    STATES,
    TOTAL_CAP,
    Cursor,
    Item,
    Progress,
    QueueFilter,
    QueuePage,
    RecordItems,
    RecordView,
    check_filter,
    item_page,
    registered_models,
)
from enrichment.store.reviews import Review, latest_decisions, standing
from enrichment.store.schema import RecordRow, Result, item_uri_of, utc_now

# What the review app, the CLI and exports import from here.
__all__ = [
    "MAX_LIMIT",
    "SIDES",
    "STATES",
    "TOTAL_CAP",
    "Cursor",
    "Item",
    "Progress",
    "QueueFilter",
    "QueuePage",
    "RecordItems",
    "RecordView",
    "all_items",
    "image_url",
    "item_page",
    "items_by_record",
    "queue_page",
    "queue_progress",
    "record_view",
    "registered_models",
]


def queue_page(db: Database, filters: QueueFilter) -> QueuePage:
    """One page of items, most uncertain first (audit: in random order), and how many match
    (counted up to `TOTAL_CAP`).

    The default queue (pending or any state, over all datasets, of the current results,
    by class and side) and the audit sample are read from the review index: their pages
    cost the same at any collection size. Other filters scan `results` (`review_scan`).
    """
    with db.transaction() as session:
        models = check_filter(session, filters)
        keys = _keys(filters, models)
        if not keys:
            return QueuePage([], 0)
        total, capped = _total(session, filters, models, keys)
        if filters.audit and _indexed(filters):
            rows = _sampled_rows(session, filters, keys)
            items = _indexed_items(session, rows[filters.offset :], models, audit_only=True)
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
                tail = scanned_rows(
                    session,
                    replace(filters, after=None),
                    models,
                    offset=max(0, filters.offset - len(rows)),
                    limit=filters.limit + 1 - len(items),
                    tail=True,
                )
                items += [scanned_item(row) for row in tail]
                margins += [row.margin for row in tail]
        else:
            rows = scanned_rows(
                session, filters, models, offset=filters.offset, limit=filters.limit + 1
            )
            items = [scanned_item(row) for row in rows]
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
        and filters.disagree is None
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
        scope.append(ReviewItem.labelled == sa.true())
    elif filters.side == "below":
        scope.append(ReviewItem.labelled == sa.false())
    if filters.state == "pending":
        scope.append(~_decided(ReviewItem))
    return scope


INDEX_COLUMNS = (
    ReviewItem.record_id,
    ReviewItem.label_key,
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
    the sample-key order on (wrapping around). The sample key is a hash of the record id:
    which items a draw gets depends on that hash and the random start, never on a score,
    so precision estimated from the sample is unbiased."""
    want = filters.offset + filters.limit
    start = secrets.randbelow(2**31)
    scope = [ReviewItem.labelled == sa.true(), ~_decided(ReviewItem, audit_only=True)]
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
    session: Session,
    rows: Sequence[Any],
    models: dict[str, ModelClasses],
    audit_only: bool = False,
) -> list[Item]:
    """Items of index rows, in their order: the model version and score from the record's
    current result, the threshold and name from the model, the decision and the record's
    columns, a few lookups per page. With `audit_only` (the audit sample) the decision is
    the audit's: the auditor judges afresh, whatever the queue decided."""
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
    current = {
        record_id: (version, vector)
        for record_id, version, vector in session.execute(
            sa.select(Result.record_id, Result.model_version, Result.scores).where(
                Result.record_id.in_(record_ids), Result.is_current
            )
        )
    }
    decided = latest_decisions(audit_only)
    decisions = {
        (row.record_id, row.label_key): row
        for row in session.execute(sa.select(decided).where(decided.c.record_id.in_(record_ids)))
    }
    items = []
    for row in rows:
        if row.record_id not in current:  # its result went (a retired version) meanwhile
            continue
        version, stored = current[row.record_id]
        model = models[version]
        if row.label_key not in model.keys:  # another version took over meanwhile
            continue
        index = model.keys.index(row.label_key)
        vector = stored or []
        record = records[row.record_id]
        decision = decisions.get((row.record_id, row.label_key))
        items.append(
            Item(
                row.record_id,
                row.label_key,
                model.names[index],
                version,
                vector[index] if index < len(vector) else None,
                model.thresholds[index],
                bool(row.labelled),
                decision.decision if decision else None,
                decision.reviewer if decision else None,
                decision.decided_at if decision else None,
                record.title or None,
                record.provider,
                record.dataset,
                item_page(item_uri_of(record.id, record.item_uri)),
            )
        )
    return items


def _total(
    session: Session, filters: QueueFilter, models: dict[str, ModelClasses], keys: Sequence[str]
) -> tuple[int, bool]:
    """How many items match, counted up to `TOTAL_CAP` (then True: there are more): an exact
    count of the default queue would be a pass over every result."""
    counted = 0
    tail = False
    if _indexed(filters):
        if filters.audit:
            scope = [ReviewItem.labelled == sa.true(), ~_decided(ReviewItem, audit_only=True)]
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
    matching = scanned(session, replace(filters, after=None), models, tail)
    if matching is not None:
        limited = sa.select(matching).limit(TOTAL_CAP + 1 - counted).subquery("limited")
        counted += _count(session, limited)
    return min(counted, TOTAL_CAP), counted > TOTAL_CAP


def _count(session: Session, rows: sa.Subquery) -> int:
    return session.execute(sa.select(sa.func.count()).select_from(rows)).scalar_one()


def queue_progress(db: Database, filters: QueueFilter) -> Progress:
    """What the curator of `filters` still has to do, and today's decisions (UTC day).

    In the queue: its pending items, whatever state the page shows, and the decisions
    standing now that were made today on its items (of its classes, datasets, run, model
    version, scores and side; of its state where that is one decision, such as rejected).
    In the audit sample: the labels not yet audited, as the page's total counts them, and
    today's audit decisions on them; the whole queue's pending items are not what an
    auditor works through. Both count the page's own items, so a curator on one class or
    dataset sees that queue move, not every decision of the day.
    """
    # The filter as given (its state too, which today's decisions are counted in), not only
    # the pending one counted: a mistyped state is the caller's InvalidValue.
    filters.check()
    todo = replace(filters, after=None, offset=0)
    if not filters.audit:
        todo = replace(todo, state="pending")
    with db.transaction() as session:
        models = check_filter(session, todo)
        keys = _keys(todo, models)
        count, capped = _total(session, todo, models, keys) if keys else (0, False)
        today = utc_now().replace(hour=0, minute=0, second=0, microsecond=0)
        decided = decided_since(session, replace(filters, after=None, offset=0), models, today)
        return Progress(count, _count(session, decided) if decided is not None else 0, capped)
