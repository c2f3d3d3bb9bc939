"""Processing one batch: fetch -> decode -> classify -> threshold -> store.

Fetching and decoding run on the fetcher's threads ahead of the model: every
image of the batch is submitted at once and the model takes them in
model-sized chunks as they become ready, so inference of one chunk overlaps
the network wait of the next. The whole batch is written in one transaction,
idempotently, so a batch that runs twice leaves the same rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa

from enrichment.media.decode import ImageError, decode
from enrichment.media.fetch import Fetcher
from enrichment.model.classifier import Classifier
from enrichment.runs.schedule import complete_run_if_done
from enrichment.store.database import Database
from enrichment.store.schema import Batch, BatchStatus, Outcome, RecordRow, Result, Run, utc_now
from enrichment.store.writes import RecordOutcome, save_outcomes

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
    db: Database, batch_id: int, max_attempts: int
) -> tuple[Batch, Run, list[RecordRow]] | None:
    """Count an attempt and load the batch's records; None if it already finished.

    The attempt is committed before any work, so a worker killed mid-batch
    (SIGKILL, OOM, a crashing decoder) still leaves its count behind, and the
    delivery after the last allowed attempt raises PoisonBatch instead of
    looping forever.
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
        run = session.get(Run, batch.run_id)
        assert run is not None
        rows = session.scalars(sa.select(RecordRow).where(RecordRow.id.in_(batch.record_ids))).all()
        by_id = {row.id: row for row in rows}
        records = [by_id[record_id] for record_id in batch.record_ids if record_id in by_id]
        return batch, run, records


def process_batch(
    db: Database,
    batch_id: int,
    classifier: Classifier,
    fetcher: Fetcher,
    max_attempts: int,
    model_batch: int = DEFAULT_MODEL_BATCH,
) -> BatchReport:
    """Classify one batch and commit its results; a finished batch is skipped.

    Raises PoisonBatch once the batch has used up its attempts; callers then
    give it up with `fail_batch`.
    """
    started = start_batch(db, batch_id, max_attempts)
    if started is None:
        with db.transaction() as session:
            batch = session.get(Batch, batch_id)
            assert batch is not None
            return BatchReport(batch_id, batch.run_id, True, {})
    batch, run, records = started
    if run.model_version != classifier.version:
        raise RuntimeError(
            f"run {run.id} was scheduled for model {run.model_version}, "
            f"this worker has {classifier.version}"
        )
    classified = classify_records(
        records, classifier, fetcher, model_batch, stored_scores(db, classifier.version)
    )
    outcomes = classified.outcomes
    with db.transaction() as session:
        save_outcomes(session, run.id, classifier.version, outcomes)
        session.execute(
            sa.update(Batch)
            .where(Batch.id == batch_id)
            .values(status=BatchStatus.DONE, error=None, updated_at=utc_now())
        )
    complete_run_if_done(db, run.id)
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
    return BatchReport(batch_id, run.id, False, counts, classified.model_inputs, classified.reused)


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


def classify_records(
    records: Sequence[RecordRow],
    classifier: Classifier,
    fetcher: Fetcher,
    model_batch: int,
    lookup: ScoreLookup | None = None,
) -> Classified:
    """One outcome per record, in order; a bad image never fails the others.

    Identical images (same SHA-256), whether reached through several records
    or URLs in this batch or already classified by this model version before,
    go through the model once.
    """
    preprocessing = classifier.spec.preprocessing

    def prepare(record: RecordRow) -> _Prepared:
        if not record.image_url:
            failure = RecordOutcome.failed(
                record.id, "no_image", "the record has no usable image URL"
            )
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

    futures: list[Future[_Prepared]] = [fetcher.submit(prepare, record) for record in records]
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
    """Keep the last error on the batch, for the message when it is finally given up."""
    with db.transaction() as session:
        session.execute(sa.update(Batch).where(Batch.id == batch_id).values(error=message[:2000]))


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
        run_id = run.id
    complete_run_if_done(db, run_id)
