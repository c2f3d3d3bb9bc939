"""Celery tasks: thin adapters over `enrichment.pipeline`.

The model and the fetcher are created once per worker process, lazily, inside
that process: CUDA is never initialised before a fork.
"""

from __future__ import annotations

from functools import cache

from celery import Task

from enrichment.config import Settings
from enrichment.fetch import Fetcher
from enrichment.model import Classifier
from enrichment.pipeline import fail_batch, process_batch
from enrichment.store import Database
from worker.app import app

MAX_ATTEMPTS = 3


@cache
def _runtime() -> tuple[Settings, Database, Classifier, Fetcher]:
    settings = Settings.from_env()
    return (
        settings,
        Database(settings.database_url),
        Classifier.load(settings.require_model_dir()),
        Fetcher(settings),
    )


@app.task(name="enrichment.process_batch", bind=True, max_retries=MAX_ATTEMPTS)
def process_batch_task(self: Task, batch_id: int) -> dict:
    _, db, classifier, fetcher = _runtime()
    try:
        report = process_batch(db, batch_id, classifier, fetcher)
    except Exception as error:
        if self.request.retries >= MAX_ATTEMPTS - 1:
            fail_batch(db, batch_id, "batch_failed", f"{type(error).__name__}: {error}")
            raise
        raise self.retry(exc=error, countdown=2**self.request.retries) from error
    return {
        "batch": report.batch_id,
        "run": report.run_id,
        "skipped": report.skipped,
        "outcomes": report.outcomes,
    }
