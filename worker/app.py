"""The Celery application: JSON only, late acks, one batch at a time per process.

Configuration comes from the same environment as the CLI. Delivery settings:
- `task_acks_late` + `worker_prefetch_multiplier=1`: a batch is acknowledged
  only after its results are committed, and a worker holds one batch at a time.
- `task_reject_on_worker_lost=True`: if the worker process dies mid-batch
  (OOM, SIGKILL) the message is requeued instead of silently acknowledged.
  This is safe because batches are idempotent, and a batch that keeps killing
  its worker is stopped by the attempts counter kept in the database.
- The Redis visibility timeout is set for the broker and the result backend
  alike and stays well above the task time limit.
"""

from __future__ import annotations

from celery import Celery

from enrichment.config import Settings
from enrichment.schedule import QUEUES

VISIBILITY_TIMEOUT = 3600
TASK_TIME_LIMIT = 1800


def make_app(settings: Settings) -> Celery:
    app = Celery(
        "enrichment",
        broker=settings.broker_url or "redis://localhost:6379/0",
        include=["worker.tasks"],
    )
    transport = {"visibility_timeout": VISIBILITY_TIMEOUT}
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=TASK_TIME_LIMIT,
        task_soft_time_limit=TASK_TIME_LIMIT - 60,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        broker_connection_retry_on_startup=True,
        task_default_queue=QUEUES["on_demand"],
        task_create_missing_queues=True,
        worker_hijack_root_logger=False,
    )
    return app


app = make_app(Settings.from_env())
