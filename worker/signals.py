"""Per-process setup: one GPU per pool process, and the model loaded there, once.

`worker_process_init` runs in each pool process after the fork, so CUDA is
first touched there and never in the parent (CUDA does not survive a fork).
"""

from __future__ import annotations

import os

from billiard.process import current_process
from celery.signals import worker_process_init

from enrichment.config import Settings
from worker.tasks import runtime


@worker_process_init.connect
def bind_gpu_and_load_model(**_: object) -> None:
    settings = Settings.from_env()
    if settings.gpus:
        index = getattr(current_process(), "index", 0) or 0
        os.environ["CUDA_VISIBLE_DEVICES"] = settings.gpus[index % len(settings.gpus)]
    if settings.preload_model:  # the scheduler worker needs no model
        runtime()
