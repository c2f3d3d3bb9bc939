"""Which result counts for a record: the one rule exports, publishing and the review queue share.

A record classified by several model versions has several results. Asked for
a run or a model version, its result there counts; asked for neither, the
latest classified one does (ties to the later version name). Error results
never count: they carry no scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from enrichment.store.schema import Outcome, RecordRow, Result

CLASSIFIED = (Outcome.LABELLED, Outcome.BELOW_THRESHOLD)


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
    scope = [Result.status.in_(CLASSIFIED)]
    if datasets:
        scope.append(
            Result.record_id.in_(sa.select(RecordRow.id).where(RecordRow.dataset.in_(datasets)))
        )
    if run_id is not None:
        scope.append(Result.run_id == run_id)
    if model_version is not None:
        scope.append(Result.model_version == model_version)
    if run_id is not None or model_version is not None:
        return sa.select(*columns).where(*scope).subquery("chosen")
    newest_first = sa.func.row_number().over(
        partition_by=Result.record_id,
        order_by=(Result.classified_at.desc(), Result.model_version.desc()),
    )
    ranked = sa.select(*columns, newest_first.label("rank")).where(*scope).subquery("ranked")
    return (
        sa.select(*(ranked.c[column.key] for column in columns))
        .where(ranked.c.rank == 1)
        .subquery("chosen")
    )
