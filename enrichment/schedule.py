"""The scheduler: turns a scope of records into a durable run cut into batches.

Everything a worker needs (the run, its records, its batches) is committed
before the first batch is handed to a dispatcher, so a crash after this point
loses nothing: `enrich resume` re-dispatches what never finished.

Runs are incremental by default: a record is enqueued only if it has no result
for this model version, or its image URL or source timestamp changed since.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.orm import Session

from enrichment.model import ModelSpec
from enrichment.records import Record
from enrichment.schema import (
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
from enrichment.store import Database, register_model, upsert_statement

CHUNK = 1000


class RunKind:
    NIGHTLY = "nightly"
    ON_DEMAND = "on_demand"


QUEUES = {RunKind.NIGHTLY: "enrich.nightly", RunKind.ON_DEMAND: "enrich.on_demand"}


@dataclass(frozen=True)
class ModelIdentity:
    """What the scheduler needs to know of a model: its version and its labels."""

    version: str
    spec: ModelSpec


@dataclass(frozen=True)
class ScheduledRun:
    run_id: int
    queue: str
    batch_ids: list[int]
    records_seen: int


class Dispatcher(Protocol):
    """Hands batches to whatever executes them: this process, or Celery workers."""

    def dispatch(self, db: Database, run: ScheduledRun) -> None: ...


def schedule_run(
    db: Database,
    records: Iterable[Record],
    model: ModelIdentity,
    kind: str,
    scope: dict[str, Any],
    batch_size: int,
    full: bool = False,
) -> ScheduledRun:
    """Create a run, upsert its records and cut the ones to enqueue into batches.

    One transaction: if reading the records fails halfway (a malformed line),
    nothing of the run is left behind.
    """
    with db.transaction() as session:
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
        )
        run = Run(
            kind=kind,
            scope=scope,
            model_version=model.version,
            status=RunStatus.SCHEDULING,
            queue=QUEUES[kind],
            records_seen=0,
            records_enqueued=0,
            batches_total=0,
            started_at=utc_now(),
        )
        session.add(run)
        session.flush()
        pending: list[Record] = []
        batch_ids: list[int] = []
        seen = enqueued = 0
        for chunk in _chunks(records, CHUNK):
            unique = list({record.id: record for record in chunk}.values())
            seen += len(unique)
            upsert_records(session, unique)
            pending.extend(unique if full else _needing_work(session, unique, model.version))
            while len(pending) >= batch_size:
                batch_ids.append(_add_batch(session, run.id, len(batch_ids), pending[:batch_size]))
                enqueued += batch_size
                del pending[:batch_size]
        if pending:
            batch_ids.append(_add_batch(session, run.id, len(batch_ids), pending))
            enqueued += len(pending)
        run.records_seen = seen
        run.records_enqueued = enqueued
        run.batches_total = len(batch_ids)
        run.status = RunStatus.RUNNING if batch_ids else RunStatus.COMPLETED
        if not batch_ids:
            run.finished_at = utc_now()
        return ScheduledRun(run.id, run.queue, batch_ids, seen)


def upsert_records(session: Session, records: list[Record]) -> None:
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


def _add_batch(session: Session, run_id: int, seq: int, records: list[Record]) -> int:
    batch = Batch(
        run_id=run_id,
        seq=seq,
        status=BatchStatus.PENDING,
        attempts=0,
        record_ids=[record.id for record in records],
    )
    session.add(batch)
    session.flush()
    return batch.id


def _chunks(items: Iterable[Record], size: int) -> Iterator[list[Record]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


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
