"""The command line `enrich worker` runs: a Celery worker configured for this machine.

`ENRICH_PROCESSES_PER_GPU` pool processes per GPU (each bound to its GPU in
`worker.signals`), or that many on a CPU-only machine. Each process runs one
batch at a time, fetching and decoding on its own threads beside the model;
with two per GPU, one process's batch downloads while the other's is
classified and written, so the GPU never waits on the network or a commit.
The queues are those of the model version it holds (`version_queues`), unless
the operator names others.
"""

from __future__ import annotations

import os
import socket
import sys

from enrichment.config import Settings


def visible_gpus() -> list[str]:
    """GPU indices as CUDA_VISIBLE_DEVICES would name them, counted without initialising CUDA."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [str(index) for index in range(count)]


def worker_argv(
    queues: tuple[str, ...],
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


def launch(
    settings: Settings,
    queues: tuple[str, ...],
    gpus: tuple[str, ...],
    loglevel: str,
    name: str | None,
) -> None:
    """Replace this process with the Celery worker; `gpus` empty means every visible GPU.

    The worker is a new program: it reads its settings once as its app is
    configured (`worker.app`), from this environment, the chosen GPUs included.
    """
    from enrichment.media.cpus import usable_cpus

    chosen = list(gpus) or visible_gpus()
    if chosen:
        os.environ["ENRICH_GPUS"] = ",".join(chosen)  # the worker's settings.gpus
    processes = max(1, len(chosen)) * settings.processes_per_gpu
    if not chosen and not os.environ.get("OMP_NUM_THREADS"):
        # On CPU the processes share the cores rather than each taking them all.
        os.environ["OMP_NUM_THREADS"] = str(max(1, usable_cpus() // processes))
    argv = worker_argv(queues, processes, loglevel, name)
    os.execv(argv[0], argv)
