"""A batch's state changes, one transaction each: started, done, errored, given up, swept.

A batch's attempt is counted when it starts, before any work, so a worker
killed mid-batch still leaves its count behind; a batch that has used up its
attempts is refused (`AttemptsExhausted`) and then given up with an error
result per record. Workers touch the heartbeat of the batches they run; a
batch whose heartbeat went stale is claimed by exactly one sweeping worker
(one conditional UPDATE) and sent again.

A batch that reaches a worker holding another model version (a message
from before routing by version, or a run moved to another version while its
batch was running) is refused with `Misrouted` before its attempt is counted:
the worker hands it back to its version's queue, and it is never failed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

import numpy as np
import sqlalchemy as sa

from enrichment.store.columns import Scores
from enrichment.store.current import CLASSIFIED
from enrichment.store.database import Database
from enrichment.store.schema import (
    FINISHED_BATCHES,
    IMAGE_VERSION,
    Batch,
    BatchStatus,
    ModelRow,
    Outcome,
    RecordRow,
    Result,
    Run,
    utc_now,
)
from enrichment.store.writes import LabelScore, RecordOutcome, save_outcomes
from enrichment.thresholds import DecisionRule


class AttemptsExhausted(Exception):
    """A batch started as often as allowed without finishing: something in it keeps killing
    its worker. The caller gives it up (`give_up_batch`)."""


class Misrouted(Exception):
    """The batch's run is for another model version than the worker's; nothing was counted.

    `queue` is the run's queue (its kind's), `model_version` the version whose
    workers must run it.
    """

    def __init__(self, batch_id: int, queue: str, model_version: str, held: str) -> None:
        super().__init__(f"batch {batch_id} is for model {model_version}, this worker holds {held}")
        self.batch_id = batch_id
        self.queue = queue
        self.model_version = model_version


@dataclass(frozen=True)
class StaleBatch:
    """A batch claimed from a worker that stopped beating, to be sent again."""

    batch_id: int
    queue: str
    model_version: str


@dataclass(frozen=True)
class BatchRecord:
    """A record of a batch, as the pipeline needs it to fetch and classify its image."""

    id: str
    image_url: str | None
    timestamp_update: datetime | None


@dataclass(frozen=True)
class BatchAttempt:
    """A batch whose attempt is counted: its run's model version and its records, each once."""

    batch_id: int
    run_id: int
    model_version: str
    records: list[BatchRecord]


def start_batch(
    db: Database,
    batch_id: int,
    max_attempts: int,
    heartbeat: bool = False,
    version: str | None = None,
) -> BatchAttempt | None:
    """Count an attempt and load the batch's records; None if the batch already finished.

    The batch row is locked (PostgreSQL) while its attempt is counted, so two
    deliveries of one batch count two attempts. Raises Misrouted, counting
    nothing, if its run is for another model version than `version` (the
    worker's); AttemptsExhausted once it has used `max_attempts`. With
    `heartbeat`, its heartbeat starts now.
    """
    with db.transaction() as session:
        batch = session.get(Batch, batch_id, with_for_update=db.dialect == "postgresql")
        if batch is None:
            raise LookupError(f"batch {batch_id} does not exist")
        if batch.status in FINISHED_BATCHES:
            return None
        run = session.get(Run, batch.run_id)
        assert run is not None
        if version is not None and run.model_version != version:
            raise Misrouted(batch_id, run.queue, run.model_version, version)
        if batch.attempts >= max_attempts:
            raise AttemptsExhausted(
                f"batch {batch_id} was started {batch.attempts} times without finishing"
                + (f"; last error: {batch.error}" if batch.error else "")
            )
        batch.attempts += 1
        if heartbeat:
            batch.heartbeat_at = utc_now()
        wanted = list(dict.fromkeys(batch.record_ids))  # a record listed twice is done once
        rows = session.execute(
            sa.select(RecordRow.id, RecordRow.image_url, RecordRow.timestamp_update).where(
                RecordRow.id.in_(wanted)
            )
        ).all()
        by_id = {row.id: BatchRecord(*row) for row in rows}
        records = [by_id[record_id] for record_id in wanted if record_id in by_id]
        return BatchAttempt(batch.id, run.id, run.model_version, records)


def batch_run(db: Database, batch_id: int) -> int:
    """The run a batch belongs to."""
    with db.transaction() as session:
        run_id = session.scalar(sa.select(Batch.run_id).where(Batch.id == batch_id))
        if run_id is None:
            raise LookupError(f"batch {batch_id} does not exist")
        return run_id


def finish_batch(
    db: Database,
    batch_id: int,
    run_id: int,
    model_version: str,
    outcomes: Sequence[RecordOutcome],
    decided_by: DecisionRule | None = None,
) -> None:
    """Write a batch's outcomes and mark it done, in one transaction (idempotently).

    Raises Misrouted, writing nothing, if the run was moved to another model
    version while the batch ran (`move_run`): its new version's workers run it.
    With `decided_by`, the rule the worker labelled by, labels follow the rule
    registered for the version instead where the two differ (`as_registered`).
    """
    with db.transaction() as session:
        run = session.get(Run, run_id)
        if run is not None and run.model_version != model_version:
            raise Misrouted(batch_id, run.queue, run.model_version, model_version)
        if decided_by is not None:
            outcomes = as_registered(session.connection(), model_version, outcomes, decided_by)
        save_outcomes(session, run_id, model_version, outcomes)
        session.execute(
            sa.update(Batch)
            .where(Batch.id == batch_id)
            .values(status=BatchStatus.DONE, error=None, heartbeat_at=None, updated_at=utc_now())
        )


def as_registered(
    connection: sa.Connection,
    model_version: str,
    outcomes: Sequence[RecordOutcome],
    decided_by: DecisionRule,
) -> Sequence[RecordOutcome]:
    """The outcomes with the labels (and status) the version's registered rule gives, where
    the worker decided them by another: a worker started before a recalibration was
    registered still holds the old thresholds, and the relabelling after the registration
    (`store.relabel`) may already have passed over the records it writes now.

    On PostgreSQL the version's row is read FOR SHARE: a registration changing the rule,
    and each chunk of the relabelling, update that row, so they wait for batches being
    written to commit, and a batch written meanwhile waits for them and reads the rule
    registered. SQLite has one writer at a time.
    """
    query = sa.select(ModelRow.classes, ModelRow.thresholds, ModelRow.top_k_fallback).where(
        ModelRow.version == model_version
    )
    if connection.dialect.name == "postgresql":
        query = query.with_for_update(read=True)
    model = connection.execute(query).one_or_none()
    if model is None:
        return outcomes
    registered = DecisionRule.of(model.thresholds, model.top_k_fallback)
    deciding = [o for o in outcomes if o.scores is not None and o.status in CLASSIFIED]
    if registered == decided_by or not deciding:
        return outcomes
    chosen = registered.decide(np.asarray([outcome.scores for outcome in deciding]))
    again: dict[str, RecordOutcome] = {}
    for outcome, given in zip(deciding, chosen.tolist(), strict=True):
        labels = [
            LabelScore(entry["key"], entry["concept"], score)
            for entry, score, on in zip(model.classes, outcome.scores or (), given, strict=True)
            if on
        ]
        status = Outcome.LABELLED if labels else Outcome.BELOW_THRESHOLD
        again[outcome.record_id] = replace(outcome, labels=labels, status=status)
    return [again.get(outcome.record_id, outcome) for outcome in outcomes]


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


def give_up_batch(db: Database, batch_id: int, reason: str, message: str) -> int | None:
    """Mark a batch failed with an error result per record saying why; its run's id.

    None, and nothing written, if the batch does not exist or already finished.
    """
    with db.transaction() as session:
        batch = session.get(Batch, batch_id)
        if batch is None or batch.status in FINISHED_BATCHES:
            return None
        run = session.get(Run, batch.run_id)
        assert run is not None
        outcomes = [
            RecordOutcome.failed(record_id, reason, message) for record_id in batch.record_ids
        ]
        save_outcomes(session, run.id, run.model_version, outcomes)
        batch.status = BatchStatus.FAILED
        batch.error = message
        batch.heartbeat_at = None
        return run.id


def touch_heartbeats(db: Database, batch_ids: Sequence[int]) -> None:
    """One beat for each of these batches still running with a heartbeat."""
    if not batch_ids:
        return
    with db.transaction() as session:
        session.execute(
            sa.update(Batch)
            .where(
                Batch.id.in_(batch_ids),
                Batch.status.not_in(FINISHED_BATCHES),
                Batch.heartbeat_at.is_not(None),
            )
            .values(heartbeat_at=utc_now())
        )


def restart_heartbeats(db: Database, batch_ids: Sequence[int]) -> None:
    """Claimed batches that could not be sent again: beating again, so a later sweep
    finds them stale and claims them once more."""
    with db.transaction() as session:
        session.execute(
            sa.update(Batch).where(Batch.id.in_(batch_ids)).values(heartbeat_at=utc_now())
        )


def claim_stale_batches(db: Database, stale_after: float) -> list[StaleBatch]:
    """Claim the batches whose worker stopped beating, to re-send each to its version's queue.

    A claim is one conditional UPDATE per batch (its heartbeat cleared, its
    status back to queued), so of several live workers sweeping at once exactly
    one claims each batch. The attempt the dead worker used stays counted: the
    next start counts its own, and a batch that kills every worker it reaches is
    still stopped by the attempts limit.
    """
    cutoff = utc_now() - timedelta(seconds=stale_after)
    claimed: list[StaleBatch] = []
    with db.transaction() as session:
        stale = session.execute(
            sa.select(Batch.id, Batch.heartbeat_at, Run.queue, Run.model_version)
            .join(Run, Run.id == Batch.run_id)
            .where(
                Batch.status.not_in(FINISHED_BATCHES),
                Batch.heartbeat_at.is_not(None),
                Batch.heartbeat_at < cutoff,
            )
        ).all()
    for batch_id, seen, queue, version in stale:
        with db.transaction() as session:
            won = session.execute(
                sa.update(Batch)
                .where(Batch.id == batch_id, Batch.heartbeat_at == seen)
                .values(heartbeat_at=None, status=BatchStatus.QUEUED, updated_at=utc_now())
            )
            if won.rowcount == 1:
                claimed.append(StaleBatch(batch_id, queue, version))
    return claimed


# PostgreSQL: one row a digest, found by the index of digest and version
# (`schema.IMAGE_VERSION`), so that an image many records share (a placeholder) is read
# once, not once a record, and other versions' rows of it not at all.
STORED_SCORES_SQL = sa.text(f"""
SELECT wanted.n, found.scores
FROM unnest(CAST(:keys AS text[])) WITH ORDINALITY AS wanted (key, n)
CROSS JOIN LATERAL (
    SELECT r.scores FROM results r
    WHERE {IMAGE_VERSION.text} = wanted.key
        AND r.status IN ({", ".join(repr(str(status)) for status in CLASSIFIED)})
        AND r.scores IS NOT NULL
    LIMIT 1
) AS found
""").columns(sa.column("n", sa.Integer), sa.column("scores", Scores()))


def stored_scores(db: Database, version: str, digests: Sequence[str]) -> dict[str, list[float]]:
    """Scores this model version already gave to images with these SHA-256s, from any record."""
    with db.transaction() as session:
        if db.dialect == "postgresql":
            # By the index whatever the statistics say (a small or new table's say a scan
            # of it all is cheaper: 3 scans of 3,000 rows for 3 digests, in a test).
            session.execute(sa.text("SET LOCAL enable_seqscan = off"))
            wanted = list(dict.fromkeys(digests))
            rows = session.execute(
                STORED_SCORES_SQL, {"keys": [digest + version for digest in wanted]}
            )
            return {wanted[n - 1]: scores for n, scores in rows if scores}
        rows = session.execute(
            sa.select(Result.image_sha256, Result.scores).where(
                Result.model_version == version,
                Result.image_sha256.in_(digests),
                Result.status.in_(CLASSIFIED),
            )
        )
        return {digest: scores for digest, scores in rows if scores}
