"""Processing one batch: fetch -> decode -> classify -> threshold -> store, in three stages.

`begin_batch` counts the attempt and starts every image of the batch on the
fetcher (fetched on its event loop, then decoded on its handler threads);
`classify_started` takes them in chunks of `inference_batch` images as they
become ready, so inference of one chunk overlaps the network wait of the next;
`commit_batch` writes the whole batch in one transaction, idempotently, so a
batch that runs twice leaves the same rows.
The batch's state changes around this compute (attempts, giving up, the
heartbeat) are `enrichment.runs.lifecycle` and `enrichment.store.batches`.
`process_batch` runs the three in turn (a Celery task); the in-process
dispatcher overlaps them across batches (`enrichment.runs.inprocess`).

Where fetched bytes become model input is the run's `Decoding`: on the fetcher's
handler threads (the default), in feeder processes past this process's GIL
(`enrichment.media.feeders`), or, where the model is on CUDA, on the GPU a
chunk at a time (`enrichment.model.batch_decode`); `decoding_for` chooses.

A failure tied to one record (a bad image, a decoder that raises anything at
all) becomes that record's error reason; only what concerns the whole batch
(the database, the model) fails the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from enrichment.media.decode import ImageError, Preprocessing, decode
from enrichment.media.feeders import FeederPool
from enrichment.media.fetch import Fetcher, FetchResult
from enrichment.runs.lifecycle import Heartbeat, commit_outcomes
from enrichment.store import batches
from enrichment.store.batches import BatchRecord
from enrichment.store.database import Database
from enrichment.store.schema import Outcome
from enrichment.store.writes import RecordOutcome

if TYPE_CHECKING:  # the scheduler worker imports this module and never loads a model
    import torch

    from enrichment.model.batch_decode import BatchDecoder
    from enrichment.model.classifier import Classifier

DEFAULT_INFERENCE_BATCH = 32  # images per forward pass


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
class Decoding:
    """Where fetched bytes become model input; neither set: on the fetcher's handler threads.

    `feeders`: decoded in those processes (the handler threads wait for them).
    `on_device`: the bytes are kept, and decoded a chunk at a time on the model's
    device just before inference. Whoever made it closes it.
    """

    feeders: FeederPool | None = None
    on_device: BatchDecoder | None = None

    def close(self) -> None:
        if self.feeders is not None:
            self.feeders.close()


IN_THREAD = Decoding()


def decoding_for(classifier: Classifier, feeders: int, max_pixels: int) -> Decoding:
    """The GPU where the model is on CUDA (its `batch_decoder` decodes JPEGs there),
    else `feeders` processes where there are more than one, else the handler threads."""
    make = getattr(classifier, "batch_decoder", None)  # benchmarks' stand-in models have none
    if make is not None:
        decoder = make(max_pixels)
        if decoder.on_gpu:
            return Decoding(on_device=decoder)
    if feeders > 1:
        return Decoding(feeders=FeederPool(feeders, classifier.spec.preprocessing, max_pixels))
    return IN_THREAD


@dataclass(frozen=True)
class _Prepared:
    """A record's decoded input (or its bytes, for `on_device`), or the outcome in its place."""

    record: BatchRecord
    inputs: np.ndarray | None
    sha256: str | None
    failure: RecordOutcome | None
    body: bytes | None = None


@dataclass
class StartedBatch:
    """A batch whose attempt is counted and whose images are being fetched and decoded."""

    batch_id: int
    run_id: int
    records: list[BatchRecord]
    prepared: list[Future[_Prepared]]
    decoding: Decoding = IN_THREAD


def begin_batch(
    db: Database,
    batch_id: int,
    classifier: Classifier,
    fetcher: Fetcher,
    max_attempts: int,
    heartbeat: bool = False,
    decoding: Decoding = IN_THREAD,
) -> StartedBatch | None:
    """Start a batch: count the attempt, submit its images; None if it already finished.

    The attempt is committed before any work, so a worker killed mid-batch
    (SIGKILL, OOM, a crashing decoder) still leaves its count behind, and the
    delivery after the last allowed attempt raises AttemptsExhausted instead of
    looping forever. A batch whose run is for another model version raises
    `Misrouted` before anything is counted: the caller hands it back. With
    `heartbeat`, the batch's heartbeat starts now: a worker that dies stops
    touching it, and the sweep re-sends it.
    """
    attempt = batches.start_batch(db, batch_id, max_attempts, heartbeat, classifier.version)
    if attempt is None:
        return None
    preprocessing = classifier.spec.preprocessing
    prepared = [
        prepare_record(record, fetcher, preprocessing, decoding) for record in attempt.records
    ]
    return StartedBatch(batch_id, attempt.run_id, attempt.records, prepared, decoding)


def classify_started(
    db: Database, started: StartedBatch, classifier: Classifier, inference_batch: int
) -> Classified:
    """The model stage: one outcome per record, as its images become ready."""
    lookup = partial(batches.stored_scores, db, classifier.version)
    on_device = started.decoding.on_device
    return classify_prepared(started.prepared, classifier, inference_batch, lookup, on_device)


def commit_batch(
    db: Database, started: StartedBatch, classifier: Classifier, classified: Classified
) -> BatchReport:
    """Write the batch's outcomes and mark it done, in one transaction; then maybe the run.

    The classifier's rule goes with them: a recalibration registered since it was loaded
    decides their labels instead (`store.batches.as_registered`)."""
    commit_outcomes(
        db,
        started.batch_id,
        started.run_id,
        classifier.version,
        classified.outcomes,
        classifier.rule,
    )
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
    return BatchReport(batch_id, batches.batch_run(db, batch_id), True, {})


def process_batch(
    db: Database,
    batch_id: int,
    classifier: Classifier,
    fetcher: Fetcher,
    max_attempts: int,
    inference_batch: int = DEFAULT_INFERENCE_BATCH,
    heartbeat: Heartbeat | None = None,
    decoding: Decoding = IN_THREAD,
) -> BatchReport:
    """Classify one batch and commit its results; a finished batch is skipped.

    Raises AttemptsExhausted once the batch has used up its attempts; callers
    then give it up with `lifecycle.fail_batch`. With a `heartbeat`, the batch is kept alive in
    the database while it runs, so that a dead worker's batch is found and re-sent.
    """
    started = begin_batch(
        db, batch_id, classifier, fetcher, max_attempts, heartbeat is not None, decoding
    )
    if started is None:
        return skipped_report(db, batch_id)
    with heartbeat.beating(batch_id) if heartbeat is not None else nullcontext():
        classified = classify_started(db, started, classifier, inference_batch)
        return commit_batch(db, started, classifier, classified)


def prepare_record(
    record: BatchRecord,
    fetcher: Fetcher,
    preprocessing: Preprocessing,
    decoding: Decoding = IN_THREAD,
) -> Future[_Prepared]:
    """Start fetching one record's image; it is decoded on the fetcher's handler threads.

    No thread waits for the download itself (`Fetcher.fetch_then`). Whatever goes
    wrong is this record's own: fetching never raises, decoding raises ImageError
    for bad bytes, and anything else (a decoder bug, memory running out on one huge
    file) is still this record's error, never its batch's.
    """
    if not record.image_url:
        failure = RecordOutcome.failed(record.id, "no_image", "the record has no usable image URL")
        done: Future[_Prepared] = Future()
        done.set_result(_Prepared(record, None, None, failure))
        return done
    prepare = partial(_prepared, record, preprocessing, decoding, fetcher.settings.max_image_pixels)
    return fetcher.fetch_then(record.image_url, prepare)


def _prepared(
    record: BatchRecord,
    preprocessing: Preprocessing,
    decoding: Decoding,
    max_pixels: int,
    fetched: FetchResult,
) -> _Prepared:
    try:
        return _decoded(record, preprocessing, decoding, max_pixels, fetched)
    except Exception as error:
        failure = RecordOutcome.failed(
            record.id,
            "decode_error",
            f"{type(error).__name__}: {error}"[:500],
            image_url=record.image_url,
            source_timestamp=record.timestamp_update,
        )
        return _Prepared(record, None, None, failure)


def _decoded(
    record: BatchRecord,
    preprocessing: Preprocessing,
    decoding: Decoding,
    max_pixels: int,
    fetched: FetchResult,
) -> _Prepared:
    if fetched.content is None:
        failure = RecordOutcome.failed(
            record.id,
            fetched.error_reason or "fetch_error",
            fetched.error_message or "",
            image_url=record.image_url,
            source_timestamp=record.timestamp_update,
        )
        return _Prepared(record, None, None, failure)
    if decoding.on_device is not None:  # decoded with its chunk, on the model's device
        return _Prepared(record, None, fetched.sha256, None, fetched.content)
    try:
        if decoding.feeders is not None:
            inputs = decoding.feeders.decode(fetched.content)
        else:
            inputs = decode(fetched.content, preprocessing, max_pixels)
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
    inference_batch: int,
    lookup: ScoreLookup | None = None,
    on_device: BatchDecoder | None = None,
) -> Classified:
    """Run the model over prepared records in chunks, in order, as they become ready.

    Identical images (same SHA-256), whether reached through several records
    or URLs in this batch or already classified by this model version before,
    go through the model once (and, with `on_device`, are decoded once: an
    image whose scores are stored is never decoded at all).
    """
    outcomes: list[RecordOutcome] = []
    known: dict[str, np.ndarray] = {}  # image SHA-256 -> scores, as stored
    model_inputs = reused = 0
    for start in range(0, len(futures), inference_batch):
        chunk = [future.result() for future in futures[start : start + inference_batch]]
        ready = [item for item in chunk if item.failure is None]
        unseen = sorted({item.sha256 for item in ready if item.sha256 not in known})
        if lookup is not None and unseen:
            for digest, scores in lookup(unseen).items():
                known[digest] = np.asarray(scores, dtype=np.float64)
        to_run: dict[str, _Prepared] = {}
        for item in ready:
            if item.sha256 not in known:
                to_run.setdefault(item.sha256, item)
        failed: dict[str | None, ImageError] = {}
        if to_run:
            inputs, failed = _model_inputs(list(to_run.values()), on_device)
            ran = [digest for digest in to_run if digest not in failed]
            if ran:
                scores = classifier.scores(inputs)
                # Stored scores keep 6 decimals; thresholds see exactly what is stored, so a
                # reused or re-run image gives the same labels and confidences to the digit.
                known.update(zip(ran, np.round(scores.astype(np.float64), 6), strict=True))
            model_inputs += len(ran)
        reused += sum(item.sha256 not in failed for item in ready) - (len(to_run) - len(failed))
        scored = [known[item.sha256] for item in ready if item.sha256 not in failed]
        # The chunk's thresholds in one call, and its scores as Python floats in one
        # conversion: per image, numpy's set-up cost more than the work.
        matrix = np.stack(scored) if scored else np.empty((0, len(classifier.spec.classes)))
        labelled = iter(zip(matrix.tolist(), classifier.labels_of(matrix), strict=True))
        for item in chunk:
            if item.failure is not None:
                outcomes.append(item.failure)
                continue
            if item.sha256 in failed:
                error = failed[item.sha256]
                outcomes.append(
                    RecordOutcome.failed(
                        item.record.id,
                        error.reason,
                        error.message,
                        image_url=item.record.image_url,
                        image_sha256=item.sha256,
                        source_timestamp=item.record.timestamp_update,
                    )
                )
                continue
            vector, labels = next(labelled)
            outcomes.append(
                RecordOutcome(
                    record_id=item.record.id,
                    status=Outcome.LABELLED if labels else Outcome.BELOW_THRESHOLD,
                    scores=vector,
                    labels=labels,
                    image_url=item.record.image_url,
                    image_sha256=item.sha256,
                    source_timestamp=item.record.timestamp_update,
                )
            )
    return Classified(outcomes, model_inputs, reused)


def _model_inputs(
    items: list[_Prepared], on_device: BatchDecoder | None
) -> tuple[np.ndarray | torch.Tensor, dict[str | None, ImageError]]:
    """The chunk's inputs, one row per image that decoded, and why the others did not.

    Decoded already (on the handler threads or the feeders): stacked. Bytes kept for
    `on_device`: decoded together there, JPEGs on the GPU, with the CPU path's reasons.
    """
    if on_device is None or items[0].body is None:
        return np.stack([item.inputs for item in items]), {}
    decoded = on_device.decode([item.body for item in items])  # type: ignore[misc]
    failed = {items[position].sha256: error for position, error in decoded.errors.items()}
    return decoded.inputs, failed
