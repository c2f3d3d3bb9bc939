"""Celery tasks: thin adapters over `enrichment.runs.pipeline` and `enrichment.runs.service`.

The model and the fetcher are created once per worker process, inside that
process (see `worker.signals`); torch is imported only there, so the scheduler
worker that runs the nightly task never loads it. Database and broker blips are retried with
exponential backoff and jitter; a batch that has used up its attempts is given
up with an error result for each of its records.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

from celery import Task
from celery.utils.log import get_task_logger
from sqlalchemy.exc import DBAPIError, OperationalError

from enrichment.config import Settings
from enrichment.errors import EnrichError
from enrichment.media.fetch import Fetcher
from enrichment.model.spec import read_model_json
from enrichment.runs import service
from enrichment.runs.pipeline import PoisonBatch, fail_batch, note_batch_error, process_batch
from enrichment.runs.schedule import ModelIdentity, RunKind
from enrichment.sources.europeana import whole_collection_query
from enrichment.store.database import Database
from worker.app import app
from worker.dispatch import CeleryDispatcher

log = get_task_logger(__name__)

if TYPE_CHECKING:
    from enrichment.model.classifier import Classifier

BLIPS = (OperationalError, DBAPIError, ConnectionError, TimeoutError)


@cache
def runtime() -> tuple[Settings, Database, Classifier, Fetcher]:
    from enrichment.model.classifier import Classifier

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
    settings, db, classifier, fetcher = runtime()
    try:
        report = process_batch(db, batch_id, classifier, fetcher, settings.max_attempts)
    except PoisonBatch as error:
        fail_batch(db, batch_id, "batch_failed", str(error))
        return {"batch": batch_id, "given_up": str(error)}
    except BLIPS:
        raise  # retried by Celery with backoff; the attempt is already counted
    except Exception as error:
        note_batch_error(db, batch_id, f"{type(error).__name__}: {error}")
        raise self.retry(exc=error, countdown=5) from error
    return {"batch": report.batch_id, "run": report.run_id, "skipped": report.skipped}


@app.task(name="enrichment.nightly_run")
def nightly_run_task() -> dict:
    """The incremental nightly run over the whole collection, as `enrich run --all` starts it."""
    settings = Settings.from_env()
    db = Database(settings.database_url)
    db.ensure_schema()
    spec, version, _ = read_model_json(settings.require_model_dir())
    scope = service.europeana_scope([whole_collection_query()])
    try:
        with CeleryDispatcher() as dispatcher:
            progress = service.start(
                db,
                settings,
                scope,
                RunKind.NIGHTLY,
                ModelIdentity(version, spec),
                dispatcher,
                settings.batch_size,
            )
    except EnrichError as error:  # e.g. last night's run still holds the scope
        log.warning("nightly run not started: %s", error)
        return {"started": False, "reason": str(error)}
    return {"started": True, "run": progress.run_id, "records_seen": progress.records_seen}
