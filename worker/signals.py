"""Per-process setup: one GPU per pool process, the model loaded there once, and the heartbeat.

`worker_process_init` runs in each pool process after the fork, so CUDA is
first touched there and never in the parent (CUDA does not survive a fork).
Pool processes are bound to the GPUs in turn, so with ENRICH_PROCESSES_PER_GPU=2
each GPU gets two. The settings are the worker's, read once before the fork
(`worker.app.process_settings`). A process that stops cleanly removes itself
from the live workers at once (`store.workers`).
"""

from __future__ import annotations

import os
from contextlib import suppress

from billiard.process import current_process
from celery.signals import worker_process_init, worker_process_shutdown

from enrichment.media.decode import share_cpus
from enrichment.store.workers import withdraw
from worker.app import process_settings
from worker.tasks import database, node_name, runtime, start_keeper


@worker_process_init.connect
def bind_gpu_and_load_model(**_: object) -> None:
    settings = process_settings()
    # The pool's processes decode side by side: each takes its share of the CPUs.
    share_cpus(max(1, len(settings.gpus)) * settings.processes_per_gpu)
    if settings.gpus:
        index = getattr(current_process(), "index", 0) or 0
        os.environ["CUDA_VISIBLE_DEVICES"] = settings.gpus[index % len(settings.gpus)]
    version = None
    if settings.preload_model:  # the scheduler worker needs no model
        version = runtime()[2].version
    start_keeper(settings, version)


@worker_process_shutdown.connect
def forget_this_process(**_: object) -> None:
    """A clean stop: this process no longer holds its model (a killed one just goes stale)."""
    with suppress(Exception):  # the database is gone too: the row goes stale on its own
        withdraw(database()[1], node_name())
