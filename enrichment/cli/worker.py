"""`enrich worker`: start a Celery worker configured for this machine."""

from __future__ import annotations

import os

import click

from enrichment.cli.base import settings
from enrichment.errors import ConfigError


@click.command()
@click.option(
    "--queues",
    default="enrich.on_demand,enrich.nightly",
    show_default=True,
    help="Queues to consume, in priority order.",
)
@click.option(
    "--gpus",
    help="Comma-separated GPU indices, one process each (default: every visible GPU).",
)
@click.option("--name", help="Worker node name (default: enrich@HOSTNAME).")
@click.option("--loglevel", default="INFO", show_default=True)
def worker(queues: str, gpus: str | None, name: str | None, loglevel: str) -> None:
    """Run a worker: one process per GPU (or one on CPU), the model loaded once in each.

    Needs CELERY_BROKER_URL, DATABASE_URL and ENRICH_MODEL; start one per machine.
    """
    from worker.launch import visible_gpus, worker_argv

    config = settings()
    if not config.broker_url:
        raise ConfigError("CELERY_BROKER_URL is not set: a worker needs a broker")
    config.require_model_dir()
    chosen = [gpu.strip() for gpu in gpus.split(",")] if gpus else visible_gpus()
    if chosen:
        os.environ["ENRICH_GPUS"] = ",".join(chosen)
    argv = worker_argv(tuple(queues.split(",")), max(1, len(chosen)), loglevel, name)
    os.execv(argv[0], argv)
