"""`enrich worker`: start a Celery worker configured for this machine."""

from __future__ import annotations

import click

from enrichment.cli.base import settings
from enrichment.errors import ConfigError


@click.command()
@click.option(
    "--queues",
    help="Queues to consume, in priority order (default: those of the model's version, "
    "on-demand first).",
)
@click.option(
    "--gpus",
    help="GPU indices, comma-separated, one process each (default: $ENRICH_GPUS or all).",
)
@click.option("--name", help="Worker node name (default: enrich@HOSTNAME).")
@click.option("--loglevel", default="INFO", show_default=True)
def worker(queues: str | None, gpus: str | None, name: str | None, loglevel: str) -> None:
    """Run a worker: one process per GPU (or one on CPU), the model loaded once in each.

    Needs CELERY_BROKER_URL, DATABASE_URL and ENRICH_MODEL; start one per machine.
    It takes only the batches of its model's version: a run for another
    version waits for a worker holding that one.
    """
    from enrichment.runs.dispatchers import celery_entry
    from enrichment.runs.schedule import version_queues
    from enrichment.runs.service import model_identity

    config = settings()
    if not config.broker_url:
        raise ConfigError("CELERY_BROKER_URL is not set: a worker needs a broker")
    # The weights hashed before any message is taken: a worker whose processes could not
    # load them took each batch and dropped it, and the run waited for ever.
    version = model_identity(config.require_model_dir(), with_weights=True).version
    chosen_queues = (
        tuple(q.strip() for q in queues.split(",") if q.strip())
        if queues
        else version_queues(version)
    )
    chosen = tuple(gpu.strip() for gpu in gpus.split(",") if gpu.strip()) if gpus else config.gpus
    click.echo(f"worker for model {version}: queues {', '.join(chosen_queues)}", err=True)
    celery_entry("launch")(config, chosen_queues, chosen, loglevel, name)
