"""Processing one batch: fetch -> decode -> classify -> threshold -> store, in three stages.

`begin_batch` counts the attempt and submits every image of the batch to the
fetcher's threads (fetch and decode); `classify_started` takes them in
model-sized chunks as they become ready, so inference of one chunk overlaps
the network wait of the next; `commit_batch` writes the whole batch in one
transaction, idempotently, so a batch that runs twice leaves the same rows.
`process_batch` runs the three in turn (a Celery task); the in-process
dispatcher overlaps them across batches (`enrichment.runs.inprocess`).

A failure tied to one record (a bad image, a decoder that raises anything at
all) becomes that record's error reason; only what concerns the whole batch
(the database, the model) fails the batch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import numpy as np
import sqlalchemy as sa

from enrichment.media.decode import ImageError, decode
from enrichment.media.fetch import Fetcher
from enrichment.runs.schedule import complete_run_if_done
from enrichment.store.database import Database
from enrichment.store.schema import Batch, BatchStatus, Outcome, RecordRow, Result, Run, utc_now
from enrichment.store.writes import RecordOutcome, save_outcomes

if TYPE_CHECKING:  # the scheduler worker imports this module and never loads a model
    from enrichment.model.classifier import Classifier

DEFAULT_MODEL_BATCH = 32


@dataclass(frozen=True)
class BatchReport:
    batch_id: int
    run_id: int
    skipped: bool
    outcomes: dict[str, int]
    model_inputs: int = 0  # images the model actually ran on
    reused: int = 0  # records whose image (by SHA-256) already had scores


@dataclass(frozen=True)
class Classified:
    outcomes: list[RecordOutcome]
    model_inputs: int
    reused: int


ScoreLookup = Callable[[Sequence[str]], dict[str, list[float]]]


@dataclass(frozen=True)
class _Prepared:
    """A record's decoded input, or the outcome that stands in for it."""

    record: RecordRow
    inputs: np.ndarray | None
    sha256: str | None
    failure: RecordOutcome | None


class PoisonBatch(Exception):
    """A batch started more often than allowed: something in it keeps killing its worker."""


def start_batch(
    db: Database, batch_id: int, max_attempts: int, heartbeat: bool = False
) -> tuple[Batch, Run, list[RecordRow]] | None:
    """Count an attempt and load the batch's records (each once); None if it already finished.

    The attempt is committed before any work, so a worker killed mid-batch
    (SIGKILL, OOM, a crashing decoder) still leaves its count behind, and the
    delivery after the last allowed attempt raises PoisonBatch instead of
    looping forever. With `heartbeat`, the batch's heartbeat starts now: a
    worker that dies stops touching it, and the sweep (`sweep_stale`) re-sends it.
    """
    with db.transaction() as session:
        batch = session.get(Batch, batch_id, with_for_update=db.dialect == "postgresql")
        if batch is None:
            raise LookupError(f"batch {batch_id} does not exist")
        if batch.status in BatchStatus.FINISHED:
            return None
        if batch.attempts >= max_attempts:
            raise PoisonBatch(
                f"batch {batch_id} was started {batch.attempts} times without finishing"
                + (f"; last error: {batch.error}" if batch.error else "")
            )
        batch.attempts += 1
        if heartbeat:
            batch.heartbeat_at = utc_now()
        run = session.get(Run, batch.run_id)
        assert run is not None
        wanted = list(dict.fromkeys(batch.record_ids))  # a record listed twice is done once
        rows = session.scalars(sa.select(RecordRow).where(RecordRow.id.in_(wanted))).all()
        by_id = {row.id: row for row in rows}
        records = [by_id[record_id] for record_id in wanted if record_id in by_id]
        return batch, run, records


@dataclass
class StartedBatch:
    """A batch whose attempt is counted and whose images are being fetched and decoded."""

    batch_id: int
    run_id: int
    records: list[RecordRow]
    prepared: list[Future[_Prepared]]


def begin_batch(
    db: Database,
    batch_id: int,
    classifier: Classifier,
    fetcher: Fetcher,
    max_attempts: int,
    heartbeat: bool = False,
) -> StartedBatch | None:
    """Start a batch: count the attempt, submit its images; None if it already finished.

    Raises PoisonBatch once the batch has used up its attempts.
    """
    started = start_batch(db, batch_id, max_attempts, heartbeat)
    if started is None:
        return None
    _, run, records = started
    if run.model_version != classifier.version:
        raise RuntimeError(
            f"run {run.id} was scheduled for model {run.model_version}, "
            f"this worker has {classifier.version}"
        )
    preprocessing = classifier.spec.preprocessing
    prepared = [
        fetcher.submit(prepare_record, record, fetcher, preprocessing) for record in records
    ]
    return StartedBatch(batch_id, run.id, records, prepared)


def classify_started(
    db: Database, started: StartedBatch, classifier: Classifier, model_batch: int
) -> Classified:
    """The model stage: one outcome per record, as its images become ready."""
    return classify_prepared(
        started.prepared, classifier, model_batch, stored_scores(db, classifier.version)
    )


def commit_batch(
    db: Database, started: StartedBatch, version: str, classified: Classified
) -> BatchReport:
    """Write the batch's outcomes and mark it done, in one transaction; then maybe the run."""
    with db.transaction() as session:
        save_outcomes(session, started.run_id, version, classified.outcomes)
        session.execute(
            sa.update(Batch)
            .where(Batch.id == started.batch_id)
            .values(status=BatchStatus.DONE, error=None, heartbeat_at=None, updated_at=utc_now())
        )
    complete_run_if_done(db, started.run_id)
    counts: dict[str, int] = {}
    for outcome in classified.outcomes:
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
    return BatchReport(
        started.batch_id,
        started.run_id,
        False,
        counts,
        classified.model_inputs,
        classified.reused,
    )


def skipped_report(db: Database, batch_id: int) -> BatchReport:
    with db.transaction() as session:
        batch = session.get(Batch, batch_id)
        assert batch is not None
        return BatchReport(batch_id, batch.run_id, True, {})


def process_batch(
    db: Database,
    batch_id: int,
    classifier: Classifier,
    fetcher: Fetcher,
    max_attempts: int,
    model_batch: int = DEFAULT_MODEL_BATCH,
    heartbeat: Heartbeat | None = None,
) -> BatchReport:
    """Classify one batch and commit its results; a finished batch is skipped.

    Raises PoisonBatch once the batch has used up its attempts; callers then
    give it up with `fail_batch`. With a `heartbeat`, the batch is kept alive in
    the database while it runs, so that a dead worker's batch is found and re-sent.
    """
    started = begin_batch(db, batch_id, classifier, fetcher, max_attempts, heartbeat is not None)
    if started is None:
        return skipped_report(db, batch_id)
    with heartbeat.beating(batch_id) if heartbeat is not None else nullcontext():
        classified = classify_started(db, started, classifier, model_batch)
        return commit_batch(db, started, classifier.version, classified)


def stored_scores(db: Database, version: str) -> ScoreLookup:
    """Scores this model version already gave to images with these SHA-256s, from any record."""

    def lookup(digests: Sequence[str]) -> dict[str, list[float]]:
        with db.transaction() as session:
            rows = session.execute(
                sa.select(Result.image_sha256, Result.scores).where(
                    Result.model_version == version,
                    Result.image_sha256.in_(digests),
                    Result.status.in_([Outcome.LABELLED, Outcome.BELOW_THRESHOLD]),
                )
            )
            return {digest: scores for digest, scores in rows if scores}

    return lookup


def prepare_record(record: RecordRow, fetcher: Fetcher, preprocessing) -> _Prepared:
    """Fetch and decode one record's image, on a fetch thread; whatever goes wrong is its own.

    Fetching never raises and decoding raises ImageError for bad bytes; anything
    else (a decoder bug, memory running out on one huge file) is still this
    record's error, never its batch's.
    """
    try:
        return _prepare(record, fetcher, preprocessing)
    except Exception as error:
        failure = RecordOutcome.failed(
            record.id,
            "decode_error",
            f"{type(error).__name__}: {error}"[:500],
            image_url=record.image_url,
            source_timestamp=record.timestamp_update,
        )
        return _Prepared(record, None, None, failure)


def _prepare(record: RecordRow, fetcher: Fetcher, preprocessing) -> _Prepared:
    if not record.image_url:
        failure = RecordOutcome.failed(record.id, "no_image", "the record has no usable image URL")
        return _Prepared(record, None, None, failure)
    fetched = fetcher.fetch(record.image_url)
    if fetched.content is None:
        failure = RecordOutcome.failed(
            record.id,
            fetched.error_reason or "fetch_error",
            fetched.error_message or "",
            image_url=record.image_url,
            source_timestamp=record.timestamp_update,
        )
        return _Prepared(record, None, None, failure)
    try:
        inputs = decode(fetched.content, preprocessing, fetcher.settings.max_image_pixels)
    except ImageError as error:
        failure = RecordOutcome.failed(
            record.id,
            error.reason,
            error.message,
            image_url=record.image_url,
            image_sha256=fetched.sha256,
            source_timestamp=record.timestamp_update,
        )
        return _Prepared(record, None, fetched.sha256, failure)
    return _Prepared(record, inputs, fetched.sha256, None)


def classify_prepared(
    futures: Sequence[Future[_Prepared]],
    classifier: Classifier,
    model_batch: int,
    lookup: ScoreLookup | None = None,
) -> Classified:
    """Run the model over prepared records in chunks, in order, as they become ready.

    Identical images (same SHA-256), whether reached through several records
    or URLs in this batch or already classified by this model version before,
    go through the model once.
    """
    outcomes: list[RecordOutcome] = []
    known: dict[str, np.ndarray] = {}  # image SHA-256 -> scores, as stored
    model_inputs = reused = 0
    for start in range(0, len(futures), model_batch):
        chunk = [future.result() for future in futures[start : start + model_batch]]
        ready = [item for item in chunk if item.failure is None]
        unseen = sorted({item.sha256 for item in ready if item.sha256 not in known})
        if lookup is not None and unseen:
            for digest, scores in lookup(unseen).items():
                known[digest] = np.asarray(scores, dtype=np.float64)
        to_run: dict[str, _Prepared] = {}
        for item in ready:
            if item.sha256 not in known:
                to_run.setdefault(item.sha256, item)
        if to_run:
            scores = classifier.scores(np.stack([item.inputs for item in to_run.values()]))
            # Stored scores keep 6 decimals; thresholds see exactly what is stored, so a
            # reused or re-run image gives the same labels and confidences to the digit.
            known.update(zip(to_run, np.round(scores.astype(np.float64), 6), strict=True))
        model_inputs += len(to_run)
        reused += len(ready) - len(to_run)
        for item in chunk:
            if item.failure is not None:
                outcomes.append(item.failure)
                continue
            vector = known[item.sha256]
            labels = classifier.labels_above_threshold(vector)
            outcomes.append(
                RecordOutcome(
                    record_id=item.record.id,
                    status=Outcome.LABELLED if labels else Outcome.BELOW_THRESHOLD,
                    scores=[float(score) for score in vector],
                    labels=labels,
                    image_url=item.record.image_url,
                    image_sha256=item.sha256,
                    source_timestamp=item.record.timestamp_update,
                )
            )
    return Classified(outcomes, model_inputs, reused)


def note_batch_error(db: Database, batch_id: int, message: str) -> None:
    """Keep the last error on the batch, for the message when it is finally given up.

    Its heartbeat stops too: the caller retries the batch itself, and the sweep
    must not send it a second time meanwhile.
    """
    with db.transaction() as session:
        session.execute(
            sa.update(Batch)
            .where(Batch.id == batch_id)
            .values(error=message[:2000], heartbeat_at=None)
        )


def fail_batch(db: Database, batch_id: int, reason: str, message: str) -> None:
    """Give up on a batch: each of its records gets an error result saying why."""
    with db.transaction() as session:
        batch = session.get(Batch, batch_id)
        if batch is None or batch.status in BatchStatus.FINISHED:
            return
        run = session.get(Run, batch.run_id)
        assert run is not None
        outcomes = [
            RecordOutcome.failed(record_id, reason, message) for record_id in batch.record_ids
        ]
        save_outcomes(session, run.id, run.model_version, outcomes)
        batch.status = BatchStatus.FAILED
        batch.error = message
        batch.heartbeat_at = None
        run_id = run.id
    complete_run_if_done(db, run_id)


class Heartbeat:
    """Keeps the batches this process is working on alive in the database.

    One thread per worker process touches `batches.heartbeat_at` of every batch
    in progress each `interval` seconds. A worker that dies (SIGKILL, a machine
    taken away) stops touching them; `sweep_stale`, run by every live worker,
    then finds them and sends them again, long before the broker's visibility
    timeout would.
    """

    def __init__(self, db: Database, interval: float) -> None:
        self.db = db
        self.interval = interval
        self._batches: set[int] = set()
        self._lock = threading.Lock()

    def beating(self, batch_id: int) -> _Beating:
        return _Beating(self, batch_id)

    def in_progress(self) -> list[int]:
        with self._lock:
            return sorted(self._batches)

    def touch(self) -> None:
        """One beat for every batch in progress here."""
        batch_ids = self.in_progress()
        if not batch_ids:
            return
        with self.db.transaction() as session:
            session.execute(
                sa.update(Batch)
                .where(
                    Batch.id.in_(batch_ids),
                    Batch.status.not_in(BatchStatus.FINISHED),
                    Batch.heartbeat_at.is_not(None),
                )
                .values(heartbeat_at=utc_now())
            )


class _Beating:
    def __init__(self, heartbeat: Heartbeat, batch_id: int) -> None:
        self.heartbeat = heartbeat
        self.batch_id = batch_id

    def __enter__(self) -> None:
        with self.heartbeat._lock:
            self.heartbeat._batches.add(self.batch_id)

    def __exit__(self, *_: object) -> None:
        with self.heartbeat._lock:
            self.heartbeat._batches.discard(self.batch_id)


def sweep_stale(db: Database, stale_after: float) -> list[tuple[int, str]]:
    """Claim the batches whose worker stopped beating; (batch id, queue) for each, to re-send.

    A claim is one conditional UPDATE per batch (its heartbeat cleared, its
    status back to queued), so of several live workers sweeping at once exactly
    one re-sends each batch. The attempt the dead worker used stays counted: the
    next start counts its own, and a batch that kills every worker it reaches is
    still stopped by the attempts limit.
    """
    cutoff = utc_now() - timedelta(seconds=stale_after)
    claimed: list[tuple[int, str]] = []
    with db.transaction() as session:
        stale = session.execute(
            sa.select(Batch.id, Batch.heartbeat_at, Run.queue)
            .join(Run, Run.id == Batch.run_id)
            .where(
                Batch.status.not_in(BatchStatus.FINISHED),
                Batch.heartbeat_at.is_not(None),
                Batch.heartbeat_at < cutoff,
            )
        ).all()
    for batch_id, seen, queue in stale:
        with db.transaction() as session:
            won = session.execute(
                sa.update(Batch)
                .where(Batch.id == batch_id, Batch.heartbeat_at == seen)
                .values(heartbeat_at=None, status=BatchStatus.QUEUED, updated_at=utc_now())
            )
            if won.rowcount == 1:
                claimed.append((batch_id, queue))
    return claimed
