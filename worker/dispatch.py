"""Handing batches to Celery workers: one message per batch, on the run's queue."""

from __future__ import annotations

from enrichment.runs.schedule import mark_queued
from enrichment.store.database import Database
from worker.app import app


class CeleryDispatcher:
    def __enter__(self) -> CeleryDispatcher:
        return self

    def __exit__(self, *_: object) -> None:
        pass

    def dispatch(self, db: Database, run_id: int, queue: str, batch_ids: list[int]) -> None:
        for batch_id in batch_ids:
            app.send_task("enrichment.process_batch", args=[batch_id], queue=queue)
        mark_queued(db, batch_ids)
