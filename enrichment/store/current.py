"""Which result counts for a record: the one rule exports, publishing and the review queue share.

A record classified by several model versions has several results. Asked for
a run or a model version, its result there counts; asked for neither, the
latest classified one does (ties to the later version name). Error results
never count: they carry no scores.

The latest classified result is flagged in its row (`Result.is_current`), kept
by the transaction that writes results (`review_index.refresh`): worked out over
all of `results` with a window function on every read, it cost a sort of the
whole table per queue page. `newest_classified` is the rule itself, which the
writes and `review_index.rebuild` apply to a few records at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from enrichment.store.columns import among
from enrichment.store.schema import Outcome, Result, of_datasets

CLASSIFIED = (Outcome.LABELLED, Outcome.BELOW_THRESHOLD)


def newest_classified(
    record_ids: Sequence[str], dialect: str, results: sa.Table | None = None
) -> sa.Select:
    """(record_id, model_version) of the result that counts for each of these records: the
    latest classified one, ties to the later version name. A migration passes its own
    description of `results` (the ORM's may describe a later schema)."""
    table = Result.__table__ if results is None else results
    newest_first = sa.func.row_number().over(
        partition_by=table.c.record_id,
        order_by=(table.c.classified_at.desc(), table.c.model_version.desc()),
    )
    ranked = (
        sa.select(table.c.record_id, table.c.model_version, newest_first.label("rank"))
        .where(table.c.status.in_(CLASSIFIED), among(table.c.record_id, record_ids, dialect))
        .subquery("ranked")
    )
    return sa.select(ranked.c.record_id, ranked.c.model_version).where(ranked.c.rank == 1)


def newest_of_staged(*carried: str) -> sa.Select:
    """`newest_classified` for the records of PostgreSQL's `stage_results` table (a batch
    being written), with the `carried` columns of the staging table beside: one index
    lookup per record (LATERAL), whatever the planner guesses of a temporary table
    without statistics."""
    stage = sa.table("stage_results", sa.column("record_id"), *map(sa.column, carried))
    staged = sa.select(stage.c.record_id, *(stage.c[name] for name in carried))
    staged = staged.distinct().subquery("staged")
    newest = (
        sa.select(Result.record_id, Result.model_version)
        .where(Result.record_id == staged.c.record_id, Result.status.in_(CLASSIFIED))
        .order_by(Result.classified_at.desc(), Result.model_version.desc())
        .limit(1)
        .lateral("newest")
    )
    return (
        sa.select(newest.c.record_id, newest.c.model_version, *(staged.c[name] for name in carried))
        .select_from(staged)
        .join(newest, sa.true())
    )


def current_results(
    datasets: Sequence[str] = (), run_id: int | None = None, model_version: str | None = None
) -> sa.Subquery:
    """One result per record (record_id, model_version, image_url, classified_at)."""
    columns = (
        Result.record_id,
        Result.model_version,
        Result.image_url,
        Result.classified_at,
    )
    in_datasets = [of_datasets(Result.record_id, datasets)] if datasets else []
    if run_id is not None or model_version is not None:
        scope = [Result.status.in_(CLASSIFIED), *in_datasets]
        if run_id is not None:
            scope.append(Result.run_id == run_id)
        if model_version is not None:
            scope.append(Result.model_version == model_version)
        return sa.select(*columns).where(*scope).subquery("chosen")
    return sa.select(*columns).where(Result.is_current, *in_datasets).subquery("chosen")
