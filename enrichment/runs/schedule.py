"""The scheduler: turns a scope into a durable run, cut into batches, handed to a dispatcher.

The run, its checkpoint and its batches are committed before any batch is
dispatched, page by page (`enrichment.store.runs`), so a crash loses nothing:
`enrich resume` continues paging from the checkpoint and re-dispatches
batches that never finished. Paging the source runs on a background thread,
so a slow API page does not stall the batches already cut.

Runs are incremental by default: a record is enqueued only if it has no result
for this model version, its last result was an error, or its image URL or
source timestamp changed since. For Europeana, a run over a scope that already
completed with this model adds a `timestamp_update` filter, so a nightly run
over an unchanged collection costs little more than one query.

A sample run (`scope["sample"]`: size and seed) pages its whole scope but
classifies only a stable draw of it (`store.selection.sample_ranks`), cut
into batches after the last page.
"""

from __future__ import annotations

import queue
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol, TypeVar

from enrichment.model.spec import ModelSpec
from enrichment.sources import Source
from enrichment.store import runs
from enrichment.store.database import Database
from enrichment.store.runs import ModelRegistration, PreviousRun, unfinished_batches
from enrichment.store.schema import RunStatus

T = TypeVar("T")
SINCE_MARGIN = timedelta(days=1)


class RunKind:
    NIGHTLY = "nightly"
    ON_DEMAND = "on_demand"


QUEUES = {RunKind.NIGHTLY: "enrich.nightly", RunKind.ON_DEMAND: "enrich.on_demand"}


def version_queue(queue_name: str, version: str) -> str:
    """The broker queue of a run's kind (`queue_name`) for one model version.

    Only workers holding that version consume it (`version_queues`), so a
    batch never reaches a worker that would have to refuse it. The version
    (`name@` + 12 hex digits) becomes a slug safe in a queue list
    (`enrich.on_demand.tiny-0123456789ab`).
    """
    return f"{queue_name}.{re.sub(r'[^A-Za-z0-9_-]+', '-', version)}"


def version_queues(version: str) -> tuple[str, ...]:
    """The queues a worker holding `version` consumes, in priority order.

    On-demand before nightly, so on-demand still overtakes a nightly
    backlog; each kind's shared queue (where releases without routing put
    every batch) right after its version queue, so a message left there is
    run, or handed on to its own version's queue, in its turn.
    """
    on_demand, nightly = QUEUES[RunKind.ON_DEMAND], QUEUES[RunKind.NIGHTLY]
    return (
        version_queue(on_demand, version),
        on_demand,
        version_queue(nightly, version),
        nightly,
    )


@dataclass(frozen=True)
class ModelIdentity:
    """What the scheduler needs to know of a model: its version and its classes."""

    version: str
    spec: ModelSpec

    def registration(self) -> ModelRegistration:
        return ModelRegistration(
            version=self.version,
            name=self.spec.name,
            architecture=self.spec.architecture,
            classes=[
                {"key": label.key, "label": label.label, "concept": label.concept}
                for label in self.spec.classes
            ],
            thresholds=[label.threshold for label in self.spec.classes],
            top_k_fallback=self.spec.top_k_fallback,
        )


class Dispatcher(Protocol):
    """Hands batches to whatever executes them: this process, or Celery workers.

    `db` is where the batches are (the in-process pipeline works on it, the
    Celery adapter marks them queued there); `queue` is the broker queue of the
    run's kind and model version (`version_queue`).
    """

    def dispatch(self, db: Database, queue: str, batch_ids: list[int]) -> None: ...


@dataclass(frozen=True)
class RunProgress:
    run_id: int
    records_seen: int
    batches: int


def start_run(
    db: Database, model: ModelIdentity, kind: str, scope: dict[str, Any], full: bool
) -> int:
    """Create the run (status `scheduling`) with its initial checkpoint; nothing is enqueued yet.

    Raises UnfinishedRun (a ScopeBusy) if a run over the same scope has not finished.
    """

    def first_checkpoint(previous: PreviousRun | None) -> dict[str, Any]:
        checkpoint: dict[str, Any] = {"pending": []}
        if "sample" in scope:  # drawn from the whole scope, never only what changed
            checkpoint["sample"] = {**scope["sample"], "chosen": []}
        elif previous is not None and scope["source"] == "europeana":
            since = previous.started_at - SINCE_MARGIN
            checkpoint.update(since=since.strftime("%Y-%m-%dT%H:%M:%SZ"), previous_run=previous.id)
        return checkpoint

    return runs.start_run(
        db, model.registration(), kind, QUEUES[kind], scope, first_checkpoint, full
    )


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
    run = runs.mark_scheduling(db, run_id)
    version, checkpoint = run.model_version, run.checkpoint
    queue_name = version_queue(run.queue, version)
    try:
        if not checkpoint.get("done"):
            for page in prefetched(source.pages(checkpoint.get("position"))):
                committed = runs.commit_page(
                    db,
                    run_id,
                    version,
                    page.records,
                    page.checkpoint,
                    checkpoint,
                    batch_size,
                    full,
                )
                checkpoint = committed.checkpoint
                if committed.batch_ids:
                    dispatcher.dispatch(db, queue_name, committed.batch_ids)
            tail = runs.commit_tail(db, run_id, version, checkpoint, batch_size)
            if tail.batch_ids:
                dispatcher.dispatch(db, queue_name, tail.batch_ids)
    except Exception as error:
        runs.mark_failed(db, run_id, str(error))
        raise
    run = runs.mark_running(db, run_id)
    runs.complete_run_if_done(db, run_id)
    return RunProgress(run_id, run.records_seen, run.batches_total)


def resume_run(
    db: Database, run_id: int, source: Source, dispatcher: Dispatcher, batch_size: int
) -> RunProgress:
    """Re-dispatch the batches that never finished, then page on from the checkpoint.

    A completed run has nothing left to do and is left exactly as it finished
    (its finished_at, and so its rate, stay).
    """
    run = runs.run_state(db, run_id)
    if run.status == RunStatus.COMPLETED:
        return RunProgress(run_id, run.records_seen, run.batches_total)
    leftovers = unfinished_batches(db, run_id)
    if leftovers:
        dispatcher.dispatch(db, version_queue(run.queue, run.model_version), leftovers)
    return fill_run(db, run_id, source, dispatcher, batch_size)


def prefetched(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Iterate `items` on a background thread, `depth` ahead; its exceptions surface here.

    A consumer that stops early (breaks out, raises) stops the producer too:
    every hand-over gives up once told to stop, `items` is closed on its own
    thread, and the thread is joined for a moment. Only a producer still inside
    a slow `next(items)` (a page on its way) outlives that join, as a daemon
    that ends when the page arrives.
    """
    buffer: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(entry: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                buffer.put(entry, timeout=HAND_OVER_POLL)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer(("item", item)):
                    return
            offer(("end", None))
        except BaseException as error:  # handed to the consumer, raised there
            offer(("error", error))
        finally:
            close = getattr(items, "close", None)
            if callable(close):
                close()  # a generator's cleanup (its HTTP session, its file) runs now

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
        thread.join(timeout=STOP_WAIT)


HAND_OVER_POLL = 0.05  # seconds between a blocked producer's looks at the stop flag
STOP_WAIT = 2.0  # seconds a stopping consumer waits for its producer
