"""Read models for the reporting commands: a run's state, and what happened to each record."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.orm import Session

from enrichment.errors import EnrichError
from enrichment.store.database import Database
from enrichment.store.models import class_concepts
from enrichment.store.schema import (
    Batch,
    BatchStatus,
    Label,
    ModelRow,
    RecordRow,
    Result,
    Run,
    RunStatus,
    check_dataset,
    label_concept,
    of_datasets,
    result_image_url,
    utc_now,
)

PAGE = 500
# A run that no process is working on although its status says it is going on (see
# `Liveness`): it was stopped by Ctrl-C or killed. Shown, never stored.
INTERRUPTED = "interrupted"
MAX_ID = 2**63 - 1  # the largest id either database stores


@dataclass(frozen=True)
class RunSummary:
    id: int
    kind: str
    scope: dict[str, Any]
    model_version: str
    status: str
    records_seen: int
    records_enqueued: int
    batches: dict[str, int]
    outcomes: dict[str, int]
    errors_by_reason: dict[str, int]
    created_at: datetime
    finished_at: datetime | None
    error: str | None
    records_done: int
    rate: float | None  # records per second since the run started
    eta_seconds: float | None
    # Its model's labels are being decided again after a recalibration, from the record
    # after this one ("": from the first; `store.relabel`); None when none is pending.
    relabelling_after: str | None = None

    def as_json(self) -> dict[str, Any]:
        document = asdict(self)
        document["created_at"] = self.created_at.isoformat() + "Z"
        document["finished_at"] = self.finished_at.isoformat() + "Z" if self.finished_at else None
        return document


def _progress(
    started: datetime, finished: datetime | None, done: int, enqueued: int
) -> tuple[float | None, float | None]:
    """Throughput so far and, while the run goes on, the time left at that pace."""
    elapsed = ((finished or utc_now()) - started).total_seconds()
    if done == 0 or elapsed <= 0:
        return None, None
    rate = done / elapsed
    return round(rate, 2), (None if finished else round(max(enqueued - done, 0) / rate, 1))


class Liveness(Protocol):
    """Whether some process is working on a run: its scheduler, or its in-process executor."""

    def scheduling(self, scope: dict[str, Any]) -> bool: ...

    def executing(self, run_id: int) -> bool: ...


def abandoned(status: str, batches: dict[str, int], run: Run, liveness: Liveness) -> bool:
    """A run left `scheduling` by a dead scheduler, or `running` with work nobody will do.

    Batches sent to a broker are `queued` (the workers and their sweep own
    them); a running run whose unfinished batches are all still `pending` can
    only progress in the process that runs it in-process.
    """
    if status == RunStatus.SCHEDULING:
        return not liveness.scheduling(run.scope)
    if status == RunStatus.RUNNING and batches.get(BatchStatus.PENDING):
        return not batches.get(BatchStatus.QUEUED) and not liveness.executing(run.id)
    return False


@dataclass(frozen=True)
class RecordResult:
    record_id: str
    model_version: str
    run_id: int | None
    status: str
    error_reason: str | None
    error_message: str | None
    image_url: str | None
    labels: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def run_summary(
    db: Database, run_id: int | None = None, liveness: Liveness | None = None
) -> RunSummary:
    """The given run, or the latest one; counts come from the rows, not from counters.

    With `liveness`, a run that no process is working on (`abandoned`) is
    shown as `interrupted`, with no time left, rather than as going on with an
    ETA that grows for ever.
    """
    with db.transaction() as session:
        if run_id is None:
            run = session.scalars(sa.select(Run).order_by(Run.id.desc()).limit(1)).first()
            if run is None:
                raise EnrichError("no runs yet: start one with `enrich run`")
        else:
            run = session.get(Run, check_run_id(run_id))
            if run is None:
                raise EnrichError(f"run {run_id} does not exist")
        counts = run.final_counts or outcome_counts(session, run.id)
        # A completed run's batches were counted when it completed: a run over the whole
        # collection has a batch per 128 records, too many to count on every look.
        batches = counts.get("batches") or batch_counts(session, run.id)
        outcomes, errors = counts["outcomes"], counts["errors_by_reason"]
        done = sum(outcomes.values())
        rate, eta = _progress(
            run.started_at or run.created_at, run.finished_at, done, run.records_enqueued
        )
        status = run.status
        if liveness is not None and abandoned(status, batches, run, liveness):
            # Nobody works on it: its rate up to the last batch it finished, not to now,
            # which would fall for as long as it waits for `enrich resume`.
            stopped = session.scalar(
                sa.select(sa.func.max(Batch.updated_at)).where(
                    Batch.run_id == run.id, Batch.status == BatchStatus.DONE
                )
            )
            started = run.started_at or run.created_at
            rate = _progress(started, stopped, done, run.records_enqueued)[0] if stopped else None
            status, eta = INTERRUPTED, None
        return RunSummary(
            id=run.id,
            kind=run.kind,
            scope=run.scope,
            model_version=run.model_version,
            status=status,
            records_seen=run.records_seen,
            records_enqueued=run.records_enqueued,
            batches=batches,
            outcomes=outcomes,
            errors_by_reason=errors,
            created_at=run.created_at,
            finished_at=run.finished_at,
            error=run.error,
            records_done=done,
            rate=rate,
            eta_seconds=eta,
            relabelling_after=session.scalar(
                sa.select(ModelRow.relabel_after).where(ModelRow.version == run.model_version)
            ),
        )


def batch_counts(session: Session, run_id: int) -> dict[str, int]:
    """A run's batches by status."""
    return dict(
        session.execute(
            sa.select(Batch.status, sa.func.count())
            .where(Batch.run_id == run_id)
            .group_by(Batch.status)
        ).all()
    )


def outcome_counts(session: Session, run_id: int) -> dict[str, dict[str, int]]:
    """A run's results by outcome and its errors by reason, from the rows it wrote."""
    outcomes = session.execute(
        sa.select(Result.status, sa.func.count())
        .where(Result.run_id == run_id)
        .group_by(Result.status)
    ).all()
    errors = session.execute(
        sa.select(Result.error_reason, sa.func.count())
        .where(Result.run_id == run_id, Result.error_reason.is_not(None))
        .group_by(Result.error_reason)
        .order_by(sa.func.count().desc())
    ).all()
    return {"outcomes": dict(outcomes), "errors_by_reason": dict(errors)}


def check_run_id(run_id: int) -> int:
    """A run id the database could hold; any other cannot name a run (and would overflow)."""
    if not 1 <= run_id <= MAX_ID:
        raise EnrichError(f"run {run_id} does not exist")
    return run_id


def run_exists(db: Database, run_id: int) -> bool:
    with db.transaction() as session:
        return session.get(Run, check_run_id(run_id)) is not None


def record_results(
    db: Database,
    run_id: int | None = None,
    datasets: Sequence[str] = (),
    record_ids: Sequence[str] = (),
) -> Iterator[RecordResult]:
    """One entry per (record, model version), ordered by record id, read page by page.

    With datasets, dataset after dataset (in name order), each in record id
    order: a page is the next records of one dataset after the last one read
    (a range of the records' primary key), then their results by key, so a page
    costs the same whatever the dataset's or the collection's size.
    """
    if run_id is not None:
        check_run_id(run_id)
    for dataset in datasets:  # refused before the first line is written, not midway
        check_dataset(dataset)
    if not datasets:
        yield from _results_pages(db, run_id, record_ids)
        return
    for dataset in sorted(set(datasets)):
        after: str | None = None
        while True:
            query = (
                sa.select(RecordRow.id)
                .where(of_datasets(RecordRow.id, [dataset]))
                .order_by(RecordRow.id)
                .limit(PAGE)
            )
            if after is not None:
                query = query.where(RecordRow.id > after)
            if record_ids:
                query = query.where(RecordRow.id.in_(record_ids))
            with db.transaction() as session:
                page = session.scalars(query).all()
                if not page:
                    break
                # The page's ids on both tables: each is read by its key, never scanned.
                of_page = _results_of(run_id).where(
                    Result.record_id.in_(page), RecordRow.id.in_(page)
                )
                found = _with_labels(session, of_page)
            yield from found
            after = page[-1]


def _results_pages(
    db: Database, run_id: int | None, record_ids: Sequence[str]
) -> Iterator[RecordResult]:
    """Results keyed on (record, model version): every one, a run's, or some records'."""
    query = _results_of(run_id)
    if record_ids:
        query = query.where(Result.record_id.in_(record_ids), RecordRow.id.in_(record_ids))
    after: tuple[str, str] | None = None
    while True:
        page_query = query.limit(PAGE)
        if after is not None:
            # The bound on both sides of the join: with it on `results` only, each page's
            # merge join read the records' index from its start up to the cursor (every
            # page of `results --run` cost the collection so far: quadratic).
            page_query = page_query.where(
                sa.tuple_(Result.record_id, Result.model_version) > after,
                RecordRow.id >= after[0],
            )
        with db.transaction() as session:
            page = _with_labels(session, page_query)
        if not page:
            return
        yield from page
        after = (page[-1].record_id, page[-1].model_version)


def _results_of(run_id: int | None) -> sa.Select:
    """Results with their image URL (`result_image_url`), ordered by record and version."""
    query = (
        sa.select(
            Result.record_id,
            Result.model_version,
            Result.run_id,
            Result.status,
            Result.error_reason,
            Result.error_message,
            result_image_url(Result.image_url, RecordRow.image_url),
        )
        .join(RecordRow, RecordRow.id == Result.record_id)
        .order_by(Result.record_id, Result.model_version)
    )
    if run_id is not None:
        query = query.where(Result.run_id == run_id)
    return query


def _with_labels(session: Session, query: sa.Select) -> list[RecordResult]:
    """The query's results, each with its labels, most confident first."""
    rows = session.execute(query).all()
    if not rows:
        return []
    concepts = class_concepts(session)
    labels: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for label in session.execute(
        sa.select(
            Label.record_id, Label.model_version, Label.label_key, Label.concept, Label.confidence
        )
        .where(Label.record_id.in_({row.record_id for row in rows}))
        .order_by(Label.confidence.desc())
    ):
        concept = label_concept(label.concept, concepts.get((label.model_version, label.label_key)))
        labels.setdefault((label.record_id, label.model_version), []).append(
            {"key": label.label_key, "concept": concept, "confidence": label.confidence}
        )
    return [
        RecordResult(*row, labels=labels.get((row.record_id, row.model_version), []))
        for row in rows
    ]
