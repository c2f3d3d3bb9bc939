"""`enrich worker`: start a Celery worker configured for this machine."""

from __future__ import annotations

import click

from enrichment.cli.base import settings
from enrichment.errors import ConfigError
from enrichment.runs.schedule import QUEUES, RunKind

DEFAULT_QUEUES = f"{QUEUES[RunKind.ON_DEMAND]},{QUEUES[RunKind.NIGHTLY]}"


@click.command()
@click.option(
    "--queues",
    default=DEFAULT_QUEUES,
    show_default=True,
    help="Queues to consume, in priority order.",
)
@click.option(
    "--gpus",
    help="GPU indices, comma-separated, one process each (default: $ENRICH_GPUS or all).",
)
@click.option("--name", help="Worker node name (default: enrich@HOSTNAME).")
@click.option("--loglevel", default="INFO", show_default=True)
def worker(queues: str, gpus: str | None, name: str | None, loglevel: str) -> None:
    """Run a worker: one process per GPU (or one on CPU), the model loaded once in each.

    Needs CELERY_BROKER_URL, DATABASE_URL and ENRICH_MODEL; start one per machine.
    """
    from enrichment.runs.dispatchers import celery_entry

    config = settings()
    if not config.broker_url:
        raise ConfigError("CELERY_BROKER_URL is not set: a worker needs a broker")
    config.require_model_dir()
    chosen = tuple(gpu.strip() for gpu in gpus.split(",") if gpu.strip()) if gpus else config.gpus
    celery_entry("launch")(config, tuple(queues.split(",")), chosen, loglevel, name)
