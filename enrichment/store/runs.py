"""A run's state changes, one transaction each: started, paged into batches, failed, completed.

The scheduler (`enrichment.runs.schedule`) pages the source and hands batches
to a dispatcher; every change it makes to the run's durable state is one of
these functions. Each page commits its records, its new batches and the
checkpoint after it together, so a crash between two pages loses nothing and
repeats nothing: `enrich resume` pages on from the last committed checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from enrichment.errors import EnrichError, ScopeBusy
from enrichment.store.database import Database
from enrichment.store.query import batch_counts, outcome_counts
from enrichment.store.retire import refuse_retired
from enrichment.store.schema import (
    FINISHED_BATCHES,
    Batch,
    BatchStatus,
    Outcome,
    RecordRow,
    Result,
    Run,
    RunStatus,
    as_utc_naive,
    result_image_url,
    utc_now,
)
from enrichment.store.selection import MOVED_FROM, sample_ranks
from enrichment.store.writes import SourceRecord, register_model, upsert_records


class UnfinishedRun(ScopeBusy):
    """A run over the same scope is still scheduling or running; `run_id` names it."""

    def __init__(self, run_id: int) -> None:
        super().__init__(f"run {run_id} over the same scope has not finished")
        self.run_id = run_id


@dataclass(frozen=True)
class ModelRegistration:
    """A model version as the `models` table keeps it: its classes and how it decides labels."""

    version: str
    name: str
    architecture: str
    classes: list[dict[str, str]]  # key, label, concept, in the model's output order
    thresholds: list[float]
    top_k_fallback: int = 0


@dataclass(frozen=True)
class PreviousRun:
    """The last completed run over the same scope with the same model version."""

    id: int
    started_at: datetime


@dataclass(frozen=True)
class RunState:
    """What the scheduler reads of a run to page it on."""

    id: int
    scope: dict[str, Any]
    status: str
    queue: str
    model_version: str
    checkpoint: dict[str, Any]
    records_seen: int
    batches_total: int


@dataclass(frozen=True)
class CommittedPage:
    """A page's durable effect: the checkpoint after it and the batches it added."""

    checkpoint: dict[str, Any]
    batch_ids: list[int]


def _register(session: Session, model: ModelRegistration) -> None:
    """Register the model a run is for (again, when it was recalibrated)."""
    register_model(
        session,
        model.version,
        model.name,
        model.architecture,
        model.classes,
        model.thresholds,
        model.top_k_fallback,
    )


def start_run(
    db: Database,
    model: ModelRegistration,
    kind: str,
    queue: str,
    scope: dict[str, Any],
    first_checkpoint: Callable[[PreviousRun | None], dict[str, Any]],
    full: bool,
) -> int:
    """Create a run (status `scheduling`) over a scope no unfinished run holds; its id.

    In one transaction: refuse a scope that a scheduling or running run holds,
    register the model version, and find the last completed run over the scope
    (none with `full`), from which `first_checkpoint` makes the run's first checkpoint.
    Raises UnfinishedRun if a run over the scope has not finished.
    """
    with db.transaction() as session:
        busy = _busy_run(session, scope)
        if busy is not None:
            raise UnfinishedRun(busy)
        refuse_retired(session, model.version)
        _register(session, model)
        previous = None if full else _last_completed(session, scope, model.version)
        run = Run(
            kind=kind,
            scope=scope,
            model_version=model.version,
            status=RunStatus.SCHEDULING,
            queue=queue,
            records_seen=0,
            records_enqueued=0,
            batches_total=0,
            checkpoint=first_checkpoint(previous),
            started_at=utc_now(),
        )
        session.add(run)
        session.flush()
        return run.id


def _busy_run(session: Session, scope: dict[str, Any]) -> int | None:
    for run_id, run_scope in session.execute(
        sa.select(Run.id, Run.scope).where(
            Run.status.in_([RunStatus.SCHEDULING, RunStatus.RUNNING])
        )
    ):
        if run_scope == scope:
            return run_id
    return None


def _last_completed(session: Session, scope: dict[str, Any], version: str) -> PreviousRun | None:
    """The run whose start an incremental run pages from: the last completed over the scope
    whose every record got this version's result. A run moved to the version (`move_run`)
    is not one: the records of its batches done before the move have the earlier version's
    result only, and paging from it would pass over them for good."""
    candidates = session.scalars(
        sa.select(Run)
        .where(Run.status == RunStatus.COMPLETED, Run.model_version == version)
        .order_by(Run.started_at.desc())
    )
    run = next(
        (
            run
            for run in candidates
            if run.scope == scope and not (run.checkpoint or {}).get(MOVED_FROM)
        ),
        None,
    )
    return None if run is None or run.started_at is None else PreviousRun(run.id, run.started_at)


def run_state(db: Database, run_id: int) -> RunState:
    """A run as the scheduler sees it; a run that does not exist is the user's error."""
    with db.transaction() as session:
        return _state(_get_run(session, run_id))


def mark_scheduling(db: Database, run_id: int) -> RunState:
    """The run is being paged (again): status `scheduling`, an earlier failure's error cleared."""
    with db.transaction() as session:
        run = _get_run(session, run_id)
        refuse_retired(session, run.model_version)
        run.status, run.error = RunStatus.SCHEDULING, None
        return _state(run)


def mark_running(db: Database, run_id: int) -> RunState:
    """Fully scheduled: every batch is dispatched; the run completes when the last one does."""
    with db.transaction() as session:
        run = _get_run(session, run_id)
        run.status = RunStatus.RUNNING
        return _state(run)


def mark_failed(db: Database, run_id: int, error: str) -> None:
    """Scheduling stopped on `error`; the checkpoint stays, for `enrich resume`."""
    with db.transaction() as session:
        session.execute(
            sa.update(Run).where(Run.id == run_id).values(status=RunStatus.FAILED, error=error)
        )


def _get_run(session: Session, run_id: int) -> Run:
    run = session.get(Run, run_id)
    if run is None:
        raise EnrichError(f"run {run_id} does not exist")
    return run


def _state(run: Run) -> RunState:
    return RunState(
        id=run.id,
        scope=run.scope,
        status=run.status,
        queue=run.queue,
        model_version=run.model_version,
        checkpoint=dict(run.checkpoint or {"pending": []}),
        records_seen=run.records_seen,
        batches_total=run.batches_total,
    )


def commit_page(
    db: Database,
    run_id: int,
    model_version: str,
    records: Sequence[SourceRecord],
    position: dict[str, Any],
    checkpoint: dict[str, Any],
    batch_size: int,
    full: bool,
) -> CommittedPage:
    """Store a page's records, cut those needing work into batches, advance the checkpoint.

    Records needing work (all of them with `full`) join the ones still waiting
    from earlier pages; whole batches are cut, the rest waits in the checkpoint
    for the next page. A record served twice is stored and enqueued once.
    """
    with db.transaction() as session:
        unique = list({record.id: record for record in records}.values())
        upsert_records(session, unique)
        if "sample" in checkpoint:
            return _draw_page(session, run_id, model_version, unique, position, checkpoint, full)
        fresh = unique if full else list(_needing_work(session, unique, model_version))
        # A record still waiting for a batch is not added again: one id twice in a
        # batch would collide with itself on the results' and labels' keys.
        waiting = set(checkpoint["pending"])
        pending = [*checkpoint["pending"], *(r.id for r in fresh if r.id not in waiting)]
        cut = len(pending) - len(pending) % batch_size
        batch_ids = _add_batches(session, run_id, pending[:cut], batch_size)
        checkpoint = {**checkpoint, "position": position, "pending": pending[cut:]}
        session.execute(
            sa.update(Run)
            .where(Run.id == run_id)
            .values(
                checkpoint=checkpoint,
                records_seen=Run.records_seen + len(unique),
                records_enqueued=Run.records_enqueued + cut,
                batches_total=Run.batches_total + len(batch_ids),
            )
        )
    return CommittedPage(checkpoint, batch_ids)


def _draw_page(
    session: Session,
    run_id: int,
    version: str,
    records: list[SourceRecord],
    position: dict[str, Any],
    checkpoint: dict[str, Any],
    full: bool,
) -> CommittedPage:
    """A sample run's page: its records compete for the sample; nothing is cut before the end.

    The checkpoint keeps the `size` best-ranked records seen so far
    (`selection.sample_ranks`), each with whether this version still has work
    on it (always, with `full`), so the draw is bounded by the sample and survives a resume.
    """
    sample = checkpoint["sample"]
    ranks = sample_ranks(session, [r.id for r in records], version, sample["seed"])
    needing = {r.id for r in (records if full else _needing_work(session, records, version))}
    seen = {entry[2] for entry in sample["chosen"]}
    candidates = [
        *sample["chosen"],
        *([*ranks[r.id], r.id, r.id in needing] for r in records if r.id not in seen),
    ]
    chosen = sorted(candidates)[: sample["size"]]
    checkpoint = {**checkpoint, "position": position, "sample": {**sample, "chosen": chosen}}
    session.execute(
        sa.update(Run)
        .where(Run.id == run_id)
        .values(checkpoint=checkpoint, records_seen=Run.records_seen + len(records))
    )
    return CommittedPage(checkpoint, [])


def commit_tail(
    db: Database, run_id: int, model_version: str, checkpoint: dict[str, Any], batch_size: int
) -> CommittedPage:
    """After the last page: batches for the records left waiting (a sample run's: those it
    drew that still need work), and for the previous run's errors when this run only pages
    what changed since it (their records are not paged)."""
    with db.transaction() as session:
        pending = list(checkpoint["pending"])
        if "sample" in checkpoint:
            chosen = checkpoint["sample"]["chosen"]
            pending.extend(record_id for *_, record_id, needs in chosen if needs)
        if checkpoint.get("previous_run"):
            retry = session.scalars(
                sa.select(Result.record_id).where(
                    Result.run_id == checkpoint["previous_run"],
                    Result.model_version == model_version,
                    Result.status == Outcome.ERROR,
                )
            ).all()
            waiting = set(pending)
            pending.extend(record_id for record_id in retry if record_id not in waiting)
        batch_ids = _add_batches(session, run_id, pending, batch_size)
        checkpoint = {**checkpoint, "pending": [], "done": True}
        session.execute(
            sa.update(Run)
            .where(Run.id == run_id)
            .values(
                checkpoint=checkpoint,
                records_enqueued=Run.records_enqueued + len(pending),
                batches_total=Run.batches_total + len(batch_ids),
            )
        )
    return CommittedPage(checkpoint, batch_ids)


def _needing_work(
    session: Session, records: list[SourceRecord], version: str
) -> Iterator[SourceRecord]:
    """Records with no usable result for this model version, or changed since it."""
    existing = {
        row.record_id: row
        for row in session.execute(
            sa.select(
                Result.record_id,
                result_image_url(Result.image_url, RecordRow.image_url).label("image_url"),
                Result.source_timestamp,
                Result.status,
            )
            .join(RecordRow, RecordRow.id == Result.record_id)
            .where(Result.model_version == version, Result.record_id.in_([r.id for r in records]))
        )
    }
    for record in records:
        previous = existing.get(record.id)
        if (
            previous is None
            or previous.status == Outcome.ERROR
            or previous.image_url != record.image_url
            or previous.source_timestamp != as_utc_naive(record.timestamp_update)
        ):
            yield record


def _add_batches(
    session: Session, run_id: int, record_ids: list[str], batch_size: int
) -> list[int]:
    if not record_ids:
        return []
    seq = session.scalar(
        sa.select(sa.func.coalesce(sa.func.max(Batch.seq) + 1, 0)).where(Batch.run_id == run_id)
    )
    batches = [
        Batch(
            run_id=run_id,
            seq=seq + index,
            status=BatchStatus.PENDING,
            attempts=0,
            record_ids=record_ids[start : start + batch_size],
        )
        for index, start in enumerate(range(0, len(record_ids), batch_size))
    ]
    session.add_all(batches)
    session.flush()
    return [batch.id for batch in batches]


def complete_run_if_done(db: Database, run_id: int) -> bool:
    """Mark the run completed once it is fully scheduled and no batch is left unfinished.

    Called after each batch commits; whichever batch commits last sees all the
    others, so no chord or counter is needed. The counts by outcome are frozen
    in the same transaction: a later run over the same records takes these
    result rows over; so are its batches by status, which no longer change.
    """
    unfinished = (
        sa.select(Batch.id)
        .where(Batch.run_id == run_id, Batch.status.not_in(FINISHED_BATCHES))
        .exists()
    )
    with db.transaction() as session:
        result = session.execute(
            sa.update(Run)
            .where(Run.id == run_id, Run.status == RunStatus.RUNNING, ~unfinished)
            .values(status=RunStatus.COMPLETED, finished_at=utc_now())
        )
        if result.rowcount != 1:
            return False
        session.execute(
            sa.update(Run)
            .where(Run.id == run_id)
            .values(
                final_counts={
                    **outcome_counts(session, run_id),
                    "batches": batch_counts(session, run_id),
                }
            )
        )
        return True


def move_run(db: Database, run_id: int, model: ModelRegistration) -> int:
    """Move a run's unfinished work to another model version (registered here); batches moved.

    Only ever asked for explicitly (`enrich resume --model-dir`). Results of
    the batches already done stay their version's; the unfinished batches
    start their attempts afresh under the new version, and pages still to come
    are cut for it. A batch still running under the old version when it is
    moved is not committed by it (`finish_batch` refuses), so every record of
    the run ends with one result. Refused when nothing is left to move, and when the
    version was retired (before anything changes: a moved run is no longer its version's,
    which could then be retired under it, its results with it).

    The versions a run was moved from are kept in its checkpoint (`MOVED_FROM`): such a
    run is no baseline for incremental runs (`_last_completed`).
    """
    with db.transaction() as session:
        refuse_retired(session, model.version)
        run = _get_run(session, run_id)
        if run.model_version == model.version:
            raise EnrichError(f"run {run_id} is already for model {model.version}")
        unfinished = session.scalars(
            sa.select(Batch.id).where(Batch.run_id == run_id, Batch.status.not_in(FINISHED_BATCHES))
        ).all()
        paging_done = bool((run.checkpoint or {}).get("done"))
        if run.status == RunStatus.COMPLETED or (not unfinished and paging_done):
            raise EnrichError(
                f"run {run_id} has nothing left to move to model {model.version}: "
                f"it is {run.status} with every batch finished"
            )
        _register(session, model)
        checkpoint = run.checkpoint or {}
        moved_from = sorted({*checkpoint.get(MOVED_FROM, []), run.model_version})
        run.checkpoint = {**checkpoint, MOVED_FROM: moved_from}
        run.model_version = model.version
        if unfinished:
            session.execute(
                sa.update(Batch)
                .where(Batch.id.in_(unfinished))
                .values(attempts=0, error=None, heartbeat_at=None, updated_at=utc_now())
            )
        return len(unfinished)


def unfinished_batches(db: Database, run_id: int) -> list[int]:
    """The batches of a run that never finished, in order, for `enrich resume`."""
    with db.transaction() as session:
        return list(
            session.scalars(
                sa.select(Batch.id)
                .where(Batch.run_id == run_id, Batch.status.not_in(FINISHED_BATCHES))
                .order_by(Batch.seq)
            )
        )


def mark_queued(db: Database, batch_ids: list[int]) -> None:
    """Batches handed to a broker: `queued`, so the workers' sweep, not resume, owns them."""
    with db.transaction() as session:
        session.execute(
            sa.update(Batch)
            .where(Batch.id.in_(batch_ids), Batch.status == BatchStatus.PENDING)
            .values(status=BatchStatus.QUEUED, updated_at=utc_now())
        )
