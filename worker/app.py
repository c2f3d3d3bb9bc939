"""The Celery application: JSON only, late acks, one batch at a time per process.

The app exists at import (Celery's own command line loads `worker.app:app`)
but reads nothing then: it is configured from the settings when its
configuration is first needed, by `configure(settings)` where a caller holds
settings already (`enrich run` dispatching to workers), or else once from the
environment through the composition root (a worker or beat process started by
`enrich worker` or by `celery --app worker.app`). Pool processes inherit it
when they fork. Delivery settings:
- `task_acks_late` + `worker_prefetch_multiplier=1`: a batch is acknowledged
  only after its results are committed, and a process holds one batch at a time.
- `task_reject_on_worker_lost=True`: if the process running a batch dies
  (SIGKILL, OOM, a crashing native decoder) the message is requeued instead of
  acknowledged and lost. This is safe because a batch is idempotent, and a
  batch that keeps killing its worker is stopped by the attempts counter kept
  in the database (`ENRICH_MAX_ATTEMPTS`), not by Celery.
- One visibility timeout (`ENRICH_VISIBILITY_TIMEOUT`) is given to every place
  Celery reads it (broker and result backend transport options); the task
  time limits are derived from it and stay well below it, so a slow batch is
  never redelivered while it is still running. Kombu looks for messages past
  it every `unacked_restore_interval` (10 s) but by default scans only every
  tenth time; `unacked_restore_throttle=1` makes it every time (one small Redis
  query), so a message whose worker machine died comes back within the timeout
  plus 10 s rather than plus 100 s.
- `queue_order_strategy="priority"`: a worker always drains the on-demand queue
  before the nightly one, so `enrich run --dataset X` overtakes a nightly backlog.
- Celery beat starts the incremental nightly run (`enrichment.nightly_run`) at
  ENRICH_NIGHTLY_AT on the scheduler queue; the scope lock keeps nightly runs
  from overlapping.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.schedules import crontab

from enrichment import bootstrap
from enrichment.config import Settings
from enrichment.runs.schedule import QUEUES, RunKind

SCHEDULER_QUEUE = "enrich.scheduler"
DEFAULT_BROKER_URL = "redis://localhost:6379/0"

app = Celery("enrichment", include=["worker.tasks", "worker.signals"])
_settings: Settings | None = None


def configure(settings: Settings) -> Celery:
    """Configure the app from `settings`; the same settings again change nothing."""
    global _settings
    if settings != _settings:
        _settings = settings
        app.config_from_object(celery_config(settings))
    return app


def process_settings() -> Settings:
    """This process's settings: those the app was configured with, read once if it was not."""
    if _settings is None:
        configure(bootstrap.read_settings())
    assert _settings is not None
    return _settings


@app.on_configure.connect
def _configure_on_first_use(sender: Celery, **_: Any) -> None:
    process_settings()


def celery_config(settings: Settings) -> dict[str, Any]:
    """The app's configuration for these settings."""
    timeout = settings.visibility_timeout
    hard_limit = timeout // 2
    transport = {
        "visibility_timeout": timeout,
        "unacked_restore_throttle": 1,
        "queue_order_strategy": "priority",
    }
    return dict(
        broker_url=settings.broker_url or DEFAULT_BROKER_URL,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        event_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_proc_alive_timeout=300,  # loading a large model in a fresh process takes time
        task_time_limit=hard_limit,
        task_soft_time_limit=max(hard_limit - 60, hard_limit * 9 // 10),
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        broker_connection_retry_on_startup=True,
        task_default_queue=QUEUES[RunKind.ON_DEMAND],
        task_create_missing_queues=True,
        worker_hijack_root_logger=False,
        enable_utc=True,
        # The nightly run pages the API on a small scheduler worker, never on a GPU worker.
        task_routes={"enrichment.nightly_run": {"queue": SCHEDULER_QUEUE}},
        beat_schedule={
            "nightly-enrichment": {
                "task": "enrichment.nightly_run",
                "schedule": crontab(hour=settings.nightly_at[0], minute=settings.nightly_at[1]),
            }
        },
    )
