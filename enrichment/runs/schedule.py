"""The scheduler: turns a scope into a durable run, cut into batches, handed to a dispatcher.

The run, its checkpoint and its batches are committed before any batch is
dispatched, page by page, so a crash loses nothing: `enrich resume` continues
paging from the checkpoint and re-dispatches batches that never finished.
Paging the source runs on a background thread, so a slow API page does not
stall the batches already cut.

Runs are incremental by default: a record is enqueued only if it has no result
for this model version, its last result was an error, or its image URL or
source timestamp changed since. For Europeana, a run over a scope that already
completed with this model adds a `timestamp_update` filter, so a nightly run
over an unchanged collection costs little more than one query.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol, TypeVar

import sqlalchemy as sa
from sqlalchemy.orm import Session

from enrichment.errors import EnrichError, ScopeBusy
from enrichment.model.spec import ModelSpec
from enrichment.sources import Source
from enrichment.sources.records_file import Record
from enrichment.store.database import Database
from enrichment.store.query import outcome_counts
from enrichment.store.schema import (
    Batch,
    BatchStatus,
    Outcome,
    RecordRow,
    Result,
    Run,
    RunStatus,
    as_utc_naive,
    utc_now,
)
from enrichment.store.writes import register_model, upsert_statement

T = TypeVar("T")
SINCE_MARGIN = timedelta(days=1)


class RunKind:
    NIGHTLY = "nightly"
    ON_DEMAND = "on_demand"


QUEUES = {RunKind.NIGHTLY: "enrich.nightly", RunKind.ON_DEMAND: "enrich.on_demand"}


@dataclass(frozen=True)
class ModelIdentity:
    """What the scheduler needs to know of a model: its version and its labels."""

    version: str
    spec: ModelSpec


class Dispatcher(Protocol):
    """Hands batches to whatever executes them: this process, or Celery workers."""

    def dispatch(self, db: Database, run_id: int, queue: str, batch_ids: list[int]) -> None: ...


@dataclass(frozen=True)
class RunProgress:
    run_id: int
    records_seen: int
    batches: int


def get_run(session: Session, run_id: int) -> Run:
    run = session.get(Run, run_id)
    if run is None:
        raise EnrichError(f"run {run_id} does not exist")
    return run


def start_run(
    db: Database, model: ModelIdentity, kind: str, scope: dict[str, Any], full: bool
) -> int:
    """Create the run (status `scheduling`) with its initial checkpoint; nothing is enqueued yet."""
    with db.transaction() as session:
        busy = _busy_run(session, scope)
        if busy is not None:
            raise ScopeBusy(
                f"run {busy} over the same scope has not finished: "
                f"follow it with `enrich status {busy}` or continue it with `enrich resume {busy}`"
            )
        register_model(
            session,
            model.version,
            model.spec.name,
            model.spec.architecture,
            [
                {"key": label.key, "label": label.label, "concept": label.concept}
                for label in model.spec.labels
            ],
            [label.threshold for label in model.spec.labels],
            model.spec.top_k_fallback,
        )
        previous = None if full else _last_completed(session, scope, model.version)
        checkpoint: dict[str, Any] = {"pending": []}
        if previous is not None and scope["source"] == "europeana":
            since = previous.started_at - SINCE_MARGIN
            checkpoint.update(since=since.strftime("%Y-%m-%dT%H:%M:%SZ"), previous_run=previous.id)
        run = Run(
            kind=kind,
            scope=scope,
            model_version=model.version,
            status=RunStatus.SCHEDULING,
            queue=QUEUES[kind],
            records_seen=0,
            records_enqueued=0,
            batches_total=0,
            checkpoint=checkpoint,
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


def _last_completed(session: Session, scope: dict[str, Any], version: str) -> Run | None:
    candidates = session.scalars(
        sa.select(Run)
        .where(Run.status == RunStatus.COMPLETED, Run.model_version == version)
        .order_by(Run.started_at.desc())
    )
    return next((run for run in candidates if run.scope == scope), None)


def fill_run(
    db: Database,
    run_id: int,
    source: Source,
    dispatcher: Dispatcher,
    batch_size: int,
    full: bool = False,
) -> RunProgress:
    """Page the source from the run's checkpoint, commit batches page by page, dispatch them.

    A failure (a page that keeps failing, a lost database) marks the run
    `failed` with its checkpoint intact; `enrich resume` continues from there.
    """
    with db.transaction() as session:
        run = get_run(session, run_id)
        version, queue_name = run.model_version, run.queue
        checkpoint = dict(run.checkpoint or {"pending": []})
        run.status, run.error = RunStatus.SCHEDULING, None
    try:
        if not checkpoint.get("done"):
            for page in prefetched(source.pages(checkpoint.get("position"))):
                checkpoint = _commit_page(
                    db,
                    run_id,
                    version,
                    page.records,
                    page.checkpoint,
                    checkpoint,
                    batch_size,
                    full,
                    dispatcher,
                    queue_name,
                )
            checkpoint = _commit_tail(
                db, run_id, version, checkpoint, batch_size, dispatcher, queue_name
            )
    except Exception as error:
        with db.transaction() as session:
            session.execute(
                sa.update(Run)
                .where(Run.id == run_id)
                .values(status=RunStatus.FAILED, error=str(error))
            )
        raise
    with db.transaction() as session:
        run = session.get(Run, run_id)
        assert run is not None
        run.status = RunStatus.RUNNING
        seen, total = run.records_seen, run.batches_total
    complete_run_if_done(db, run_id)
    return RunProgress(run_id, seen, total)


def resume_run(
    db: Database, run_id: int, source: Source, dispatcher: Dispatcher, batch_size: int
) -> RunProgress:
    """Re-dispatch the batches that never finished, then page on from the checkpoint.

    A completed run has nothing left to do and is left exactly as it finished
    (its finished_at, and so its rate, stay).
    """
    with db.transaction() as session:
        run = get_run(session, run_id)
        queue_name, status = run.queue, run.status
        seen, total = run.records_seen, run.batches_total
    if status == RunStatus.COMPLETED:
        return RunProgress(run_id, seen, total)
    leftovers = unfinished_batches(db, run_id)
    if leftovers:
        dispatcher.dispatch(db, run_id, queue_name, leftovers)
    return fill_run(db, run_id, source, dispatcher, batch_size)


def complete_run_if_done(db: Database, run_id: int) -> bool:
    """Mark the run completed once it is fully scheduled and no batch is left unfinished.

    Called after each batch commits; whichever batch commits last sees all the
    others, so no chord or counter is needed.
    """
    unfinished = (
        sa.select(Batch.id)
        .where(Batch.run_id == run_id, Batch.status.not_in(BatchStatus.FINISHED))
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
        # Frozen now: a later run over the same records takes these result rows over.
        session.execute(
            sa.update(Run)
            .where(Run.id == run_id)
            .values(final_counts=outcome_counts(session, run_id))
        )
        return True


def _commit_page(
    db: Database,
    run_id: int,
    version: str,
    records: list[Record],
    position: dict[str, Any],
    checkpoint: dict[str, Any],
    batch_size: int,
    full: bool,
    dispatcher: Dispatcher,
    queue_name: str,
) -> dict[str, Any]:
    with db.transaction() as session:
        unique = list({record.id: record for record in records}.values())
        upsert_records(session, unique)
        fresh = unique if full else list(_needing_work(session, unique, version))
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
    if batch_ids:
        dispatcher.dispatch(db, run_id, queue_name, batch_ids)
    return checkpoint


def _commit_tail(
    db: Database,
    run_id: int,
    version: str,
    checkpoint: dict[str, Any],
    batch_size: int,
    dispatcher: Dispatcher,
    queue_name: str,
) -> dict[str, Any]:
    """After the last page: the leftover records, plus last run's errors when filtering by date."""
    with db.transaction() as session:
        pending = list(checkpoint["pending"])
        if checkpoint.get("previous_run"):
            retry = session.scalars(
                sa.select(Result.record_id).where(
                    Result.run_id == checkpoint["previous_run"],
                    Result.model_version == version,
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
    if batch_ids:
        dispatcher.dispatch(db, run_id, queue_name, batch_ids)
    return checkpoint


def upsert_records(session: Session, records: list[Record]) -> None:
    if not records:
        return
    now = utc_now()
    insert = upsert_statement(session, RecordRow.__table__)
    session.execute(
        insert.on_conflict_do_update(
            index_elements=["id"],
            set_={
                name: insert.excluded[name]
                for name in (
                    "dataset",
                    "item_uri",
                    "image_url",
                    "provider",
                    "title",
                    "timestamp_update",
                    "last_seen",
                )
            },
        ),
        [
            {
                "id": record.id,
                "dataset": record.dataset,
                "item_uri": record.item_uri,
                "image_url": record.image_url,
                "provider": record.provider,
                "title": record.title,
                "timestamp_update": as_utc_naive(record.timestamp_update),
                "first_seen": now,
                "last_seen": now,
            }
            for record in records
        ],
    )


def _needing_work(session: Session, records: list[Record], version: str) -> Iterator[Record]:
    """Records with no usable result for this model version, or changed since it."""
    existing = {
        row.record_id: row
        for row in session.execute(
            sa.select(
                Result.record_id, Result.image_url, Result.source_timestamp, Result.status
            ).where(Result.model_version == version, Result.record_id.in_([r.id for r in records]))
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


def prefetched(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Iterate `items` on a background thread, `depth` ahead; its exceptions surface here."""
    buffer: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put(("item", item), timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put(("end", None))
        except BaseException as error:  # handed to the consumer, raised there
            buffer.put(("error", error))

    thread = threading.Thread(target=produce, name="source-pages", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = buffer.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()


def mark_queued(db: Database, batch_ids: list[int]) -> None:
    with db.transaction() as session:
        session.execute(
            sa.update(Batch)
            .where(Batch.id.in_(batch_ids), Batch.status == BatchStatus.PENDING)
            .values(status=BatchStatus.QUEUED, updated_at=utc_now())
        )


def unfinished_batches(db: Database, run_id: int) -> list[int]:
    """The batches of a run that never finished, for `enrich resume`."""
    with db.transaction() as session:
        return list(
            session.scalars(
                sa.select(Batch.id)
                .where(Batch.run_id == run_id, Batch.status.not_in(BatchStatus.FINISHED))
                .order_by(Batch.seq)
            )
        )
