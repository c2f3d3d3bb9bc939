"""Handing a run's batches to Celery workers: one message per batch, on the run's queue."""

from __future__ import annotations

from enrichment.schedule import ScheduledRun, mark_queued
from enrichment.store import Database
from worker.app import app


class CeleryDispatcher:
    def dispatch(self, db: Database, run: ScheduledRun) -> None:
        for batch_id in run.batch_ids:
            app.send_task("enrichment.process_batch", args=[batch_id], queue=run.queue)
        mark_queued(db, run.batch_ids)
