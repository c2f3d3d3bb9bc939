"""Celery tasks: thin adapters over `enrichment.runs.pipeline` and `enrichment.runs.service`.

The model and the fetcher are created once per worker process, inside that
process (see `worker.signals`); torch is imported only there, so the scheduler
worker that runs the nightly task never loads it. Database and broker blips are retried with
exponential backoff and jitter; a batch that has used up its attempts is given
up with an error result for each of its records.

Every worker process also runs a keeper thread: it beats the heartbeat of the
batch in progress there and sweeps for batches whose worker stopped beating
(a machine that died), sending them again. With the defaults a dead worker's
batch is re-sent within about two and a half minutes (8 beats of 15 s, plus a
sweep), rather than after the broker's visibility timeout of an hour.
"""

from __future__ import annotations

import threading
import time
from contextlib import suppress
from functools import cache
from typing import TYPE_CHECKING

from celery import Task
from celery.utils.log import get_task_logger

from enrichment import bootstrap
from enrichment.config import Settings
from enrichment.errors import ScopeBusy
from enrichment.runs import service
from enrichment.runs.lifecycle import Heartbeat, fail_batch
from enrichment.runs.pipeline import process_batch
from enrichment.runs.schedule import RunKind
from enrichment.sources.europeana import whole_collection_query
from enrichment.store.batches import (
    AttemptsExhausted,
    claim_stale_batches,
    note_batch_error,
    restart_heartbeats,
)
from enrichment.store.database import TRANSIENT_ERRORS, Database
from worker.app import app, process_settings
from worker.dispatch import CeleryDispatcher

log = get_task_logger(__name__)

if TYPE_CHECKING:
    from enrichment.media.fetch import Fetcher
    from enrichment.model.classifier import Classifier

BLIPS = (*TRANSIENT_ERRORS, ConnectionError, TimeoutError)


@cache
def database() -> tuple[Settings, Database]:
    """This process's settings and its one engine, shared by the tasks and the keeper."""
    settings = process_settings()
    return settings, Database(settings.database_url)


@cache
def runtime() -> tuple[Settings, Database, Classifier, Fetcher]:
    settings, db = database()
    classifier = bootstrap.load_classifier(settings.require_model_dir())
    return settings, db, classifier, bootstrap.new_fetcher(settings)


@cache
def heartbeat() -> Heartbeat:
    settings, db = database()
    return Heartbeat(db, settings.heartbeat_interval)


def start_keeper(settings: Settings) -> threading.Thread:
    """The heartbeat-and-sweep thread of this worker process."""
    thread = threading.Thread(target=keep, args=(settings,), name="keeper", daemon=True)
    thread.start()
    return thread


def keep(settings: Settings) -> None:
    beat = heartbeat()
    stale_after = settings.heartbeat_interval * settings.heartbeat_stale
    while True:
        time.sleep(settings.heartbeat_interval)
        try:
            beat.touch()
            resend_stale(beat.db, stale_after)
        except Exception as error:  # a database blip: the next beat tries again
            log.warning("heartbeat or sweep failed: %s", error)


def resend_stale(db: Database, stale_after: float) -> list[int]:
    """Send again each batch whose worker stopped beating; this process claimed each alone."""
    sent: list[int] = []
    claimed = claim_stale_batches(db, stale_after)
    for batch_id, queue in claimed:
        try:
            app.send_task("enrichment.process_batch", args=[batch_id], queue=queue)
        except Exception:
            # Not sent, this one and the rest claimed with it: let a later sweep claim them.
            restart_heartbeats(db, [claim for claim, _ in claimed if claim not in sent])
            raise
        log.warning("batch %s: its worker stopped beating; sent again", batch_id)
        sent.append(batch_id)
    return sent


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
        report = process_batch(
            db,
            batch_id,
            classifier,
            fetcher,
            settings.max_attempts,
            settings.inference_batch,
            heartbeat=heartbeat(),
        )
    except AttemptsExhausted as error:
        fail_batch(db, batch_id, "batch_failed", str(error))
        return {"batch": batch_id, "given_up": str(error)}
    except BLIPS as error:
        # Celery retries it with backoff (the attempt is already counted). Where the
        # database answers again, stop its heartbeat now, so that the sweep does not
        # send it a second time while that retry waits; where it does not, a sweep
        # after the outage may, and the batch's idempotent writes absorb the extra try.
        with suppress(*BLIPS):
            note_batch_error(db, batch_id, f"{type(error).__name__}: {error}")
        raise
    except Exception as error:
        note_batch_error(db, batch_id, f"{type(error).__name__}: {error}")
        raise self.retry(exc=error, countdown=5) from error
    return {"batch": report.batch_id, "run": report.run_id, "skipped": report.skipped}


@app.task(name="enrichment.nightly_run")
def nightly_run_task() -> dict:
    """The incremental nightly run over the whole collection, as `enrich run --all` starts it.

    Last night's run still going is the one expected refusal: it is logged and
    the task ends. Anything else (a missing or refused API key, a page that
    failed mid-run, an unreachable broker) fails the task, visibly.
    """
    settings, db = database()
    db.ensure_schema()
    model = service.model_identity(settings.require_model_dir())
    scope = service.europeana_scope([whole_collection_query()])
    try:
        with CeleryDispatcher(settings) as dispatcher:
            progress = service.start(
                db,
                settings,
                scope,
                RunKind.NIGHTLY,
                model,
                dispatcher,
                settings.batch_size,
            )
    except ScopeBusy as error:  # last night's run still holds the scope: the normal refusal
        log.warning("nightly run not started: %s", error)
        return {"started": False, "reason": str(error)}
    return {"started": True, "run": progress.run_id, "records_seen": progress.records_seen}
