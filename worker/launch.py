"""The command line `enrich worker` runs: a Celery worker configured for this machine.

One pool process per GPU (each bound to its GPU in `worker.signals`), or one on
a CPU-only machine, where torch already uses every core. Each process fetches
and decodes on its own threads beside the model.
"""

from __future__ import annotations

import os
import socket
import sys

from enrichment.runs.schedule import QUEUES, RunKind

DEFAULT_QUEUES = (QUEUES[RunKind.ON_DEMAND], QUEUES[RunKind.NIGHTLY])


def visible_gpus() -> list[str]:
    """GPU indices as CUDA_VISIBLE_DEVICES would name them, counted without initialising CUDA."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [str(index) for index in range(count)]


def worker_argv(
    queues: tuple[str, ...] = DEFAULT_QUEUES,
    processes: int = 1,
    loglevel: str = "INFO",
    name: str | None = None,
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "--app",
        "worker.app",
        "worker",
        "--queues",
        ",".join(queues),  # order matters: on-demand is drained first
        "--pool",
        "prefork",
        "--concurrency",
        str(processes),
        "--prefetch-multiplier",
        "1",
        "--optimization",
        "fair",
        "--without-gossip",
        "--without-mingle",
        "--hostname",
        name or f"enrich@{socket.gethostname()}",
        "--loglevel",
        loglevel,
    ]


def launch(queues: tuple[str, ...], gpus: tuple[str, ...], loglevel: str, name: str | None) -> None:
    """Replace this process with the Celery worker; `gpus` empty means every visible GPU."""
    chosen = list(gpus) or visible_gpus()
    if chosen:
        os.environ["ENRICH_GPUS"] = ",".join(chosen)  # read by each pool process's Settings
    argv = worker_argv(queues, max(1, len(chosen)), loglevel, name)
    os.execv(argv[0], argv)
