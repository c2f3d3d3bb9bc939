"""Celery tasks: thin adapters over `enrichment.pipeline` and `enrichment.service`.

The model and the fetcher are created once per worker process, inside that
process (see `worker.signals`). Database and broker blips are retried with
exponential backoff and jitter; a batch that has used up its attempts is given
up with an error result for each of its records.
"""

from __future__ import annotations

import os
from functools import cache

from celery import Task
from sqlalchemy.exc import DBAPIError, OperationalError

from enrichment.config import Settings
from enrichment.fetch import Fetcher
from enrichment.model import Classifier
from enrichment.pipeline import PoisonBatch, fail_batch, note_batch_error, process_batch
from enrichment.store import Database
from worker.app import app

BLIPS = (OperationalError, DBAPIError, ConnectionError, TimeoutError)


def max_attempts() -> int:
    return int(os.environ.get("ENRICH_MAX_ATTEMPTS", "3"))


@cache
def runtime() -> tuple[Settings, Database, Classifier, Fetcher]:
    settings = Settings.from_env()
    return (
        settings,
        Database(settings.database_url),
        Classifier.load(settings.require_model_dir()),
        Fetcher(settings),
    )


@app.task(
    name="enrichment.process_batch",
    bind=True,
    autoretry_for=BLIPS,
    retry_backoff=2,
    retry_backoff_max=120,
    retry_jitter=True,
    max_retries=10,
)
def process_batch_task(self: Task, batch_id: int) -> dict:
    _, db, classifier, fetcher = runtime()
    try:
        report = process_batch(db, batch_id, classifier, fetcher, max_attempts=max_attempts())
    except PoisonBatch as error:
        fail_batch(db, batch_id, "batch_failed", str(error))
        return {"batch": batch_id, "given_up": str(error)}
    except BLIPS:
        raise  # retried by Celery with backoff; the attempt is already counted
    except Exception as error:
        note_batch_error(db, batch_id, f"{type(error).__name__}: {error}")
        raise self.retry(exc=error, countdown=5) from error
    return {"batch": report.batch_id, "run": report.run_id, "skipped": report.skipped}
