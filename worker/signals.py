"""Per-process setup: one GPU per pool process, and the model loaded there, once.

`worker_process_init` runs in each pool process after the fork, so CUDA is
first touched there and never in the parent (CUDA does not survive a fork).
"""

from __future__ import annotations

import os

from billiard.process import current_process
from celery.signals import worker_process_init

from worker.tasks import runtime


@worker_process_init.connect
def bind_gpu_and_load_model(**_: object) -> None:
    gpus = [gpu for gpu in os.environ.get("ENRICH_GPUS", "").split(",") if gpu.strip()]
    if gpus:
        index = getattr(current_process(), "index", 0) or 0
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)].strip()
    if os.environ.get("ENRICH_PRELOAD_MODEL", "1") != "0":  # the scheduler worker needs no model
        runtime()
