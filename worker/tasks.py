"""Celery tasks: thin adapters over `enrichment.runs.pipeline` and `enrichment.runs.service`.

The model, the fetcher and the decoding (its feeder processes, or the GPU's
decoder) are created once per worker process, inside that process (see
`worker.signals`); torch is imported only there, so the scheduler worker that
runs the nightly task never loads it. Database and broker blips are retried
with exponential backoff and jitter; a batch that has used up its attempts is
given up with an error result for each of its records.

Every worker process also runs a keeper thread: it beats the heartbeat of the
batch in progress there and sweeps for batches whose worker stopped beating
(a machine that died), sending them again. With the defaults a dead worker's
batch is re-sent within about two and a half minutes (8 beats of 15 s, plus a
sweep), rather than after the broker's visibility timeout of an hour. The
same beat reports the model version the process holds (`store.workers`), so
`enrich status` can tell a run that waits for a worker with its model.

A batch whose run is for another model version than this process holds (a
message from a release before routing by version, or a run moved meanwhile)
is handed back to its version's queue, its attempts untouched: it waits for a
worker of its own, and is never failed for reaching the wrong one.
"""

from __future__ import annotations

import os
import socket
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
from enrichment.runs.schedule import RunKind, version_queue
from enrichment.sources.europeana import whole_collection_query
from enrichment.store.batches import (
    AttemptsExhausted,
    Misrouted,
    claim_stale_batches,
    note_batch_error,
    restart_heartbeats,
)
from enrichment.store.database import TRANSIENT_ERRORS, Database
from enrichment.store.workers import advertise
from worker.app import app, process_settings
from worker.dispatch import CeleryDispatcher

log = get_task_logger(__name__)

if TYPE_CHECKING:
    from enrichment.media.fetch import Fetcher
    from enrichment.model.classifier import Classifier
    from enrichment.runs.pipeline import Decoding

BLIPS = (*TRANSIENT_ERRORS, ConnectionError, TimeoutError)


@cache
def database() -> tuple[Settings, Database]:
    """This process's settings and its one engine, shared by the tasks and the keeper."""
    settings = process_settings()
    return settings, Database(settings.database_url)


@cache
def runtime() -> tuple[Settings, Database, Classifier, Fetcher, Decoding]:
    settings, db = database()
    classifier = bootstrap.load_classifier(settings.require_model_dir())
    decoding = bootstrap.new_decoding(settings, classifier, settings.processes_per_gpu)
    return settings, db, classifier, bootstrap.new_fetcher(settings), decoding


@cache
def heartbeat() -> Heartbeat:
    settings, db = database()
    return Heartbeat(db, settings.heartbeat_interval)


def node_name() -> str:
    """This worker process, as the table of live workers names it."""
    return f"{socket.gethostname()}:{os.getpid()}"


def start_keeper(settings: Settings, version: str | None) -> threading.Thread:
    """The heartbeat-and-sweep thread of this worker process; `version` is the model it holds
    (None on the scheduler worker, which holds none)."""
    thread = threading.Thread(target=keep, args=(settings, version), name="keeper", daemon=True)
    thread.start()
    return thread


def keep(settings: Settings, version: str | None) -> None:
    beat = heartbeat()
    stale_after = settings.heartbeat_interval * settings.heartbeat_stale
    node = node_name()
    while True:
        try:
            if version is not None:
                advertise(beat.db, node, version)
            beat.touch()
            resend_stale(beat.db, stale_after)
        except Exception as error:  # a database blip: the next beat tries again
            log.warning("heartbeat or sweep failed: %s", error)
        time.sleep(settings.heartbeat_interval)


def resend_stale(db: Database, stale_after: float) -> list[int]:
    """Send again each batch whose worker stopped beating, to its model version's queue;
    this process claimed each alone."""
    sent: list[int] = []
    claimed = claim_stale_batches(db, stale_after)
    for stale in claimed:
        try:
            app.send_task(
                "enrichment.process_batch",
                args=[stale.batch_id],
                queue=version_queue(stale.queue, stale.model_version),
            )
        except Exception:
            # Not sent, this one and the rest claimed with it: let a later sweep claim them.
            restart_heartbeats(db, [c.batch_id for c in claimed if c.batch_id not in sent])
            raise
        log.warning(
            "batch %s: its worker stopped beating; sent again to %s",
            stale.batch_id,
            version_queue(stale.queue, stale.model_version),
        )
        sent.append(stale.batch_id)
    return sent


def hand_back(misrouted: Misrouted) -> str:
    """Send a batch that reached this worker to its own version's queue; that queue."""
    queue = version_queue(misrouted.queue, misrouted.model_version)
    # Retried through a broker blip: this message is acknowledged once the task returns.
    app.send_task("enrichment.process_batch", args=[misrouted.batch_id], queue=queue, retry=True)
    log.warning("%s: handed back to %s", misrouted, queue)
    return queue


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
    settings, db, classifier, fetcher, decoding = runtime()
    try:
        report = process_batch(
            db,
            batch_id,
            classifier,
            fetcher,
            settings.max_attempts,
            settings.inference_batch,
            heartbeat=heartbeat(),
            decoding=decoding,
        )
    except Misrouted as misrouted:
        return {"batch": batch_id, "handed_back": hand_back(misrouted)}
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
