"""`enrich run`, `resume`, `status` and `results`: starting runs and seeing what they did."""

from __future__ import annotations

import json
from pathlib import Path

import click

from enrichment.cli.base import emit_json, open_db, settings
from enrichment.config import Settings
from enrichment.store import Database


@click.command()
@click.option(
    "--records",
    "records_file",
    type=click.Path(path_type=Path),
    required=True,
    help="JSON Lines or CSV records file: id, image_url (item_uri, provider, timestamp_update).",
)
@click.option(
    "--model",
    "model_dir",
    type=click.Path(path_type=Path),
    help="Model directory (default: $ENRICH_MODEL).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 10_000),
    help="Records per batch (default: $ENRICH_BATCH_SIZE or 128).",
)
@click.option(
    "--full", is_flag=True, help="Enqueue every record in scope, not only new or changed ones."
)
@click.option(
    "--progress/--no-progress", default=True, help="Show a progress bar when running in-process."
)
@click.option("--json", "as_json", is_flag=True, help="Print the run's summary as JSON.")
def run(
    records_file: Path,
    model_dir: Path | None,
    batch_size: int | None,
    full: bool,
    progress: bool,
    as_json: bool,
) -> None:
    """Start a run: schedule the records in batches and classify them.

    Without CELERY_BROKER_URL the batches run in this process and the command
    returns when the run is finished; with it, batches go to the Celery workers
    and the command returns once they are queued. Prints the run id.
    """
    from enrichment.model import read_model_json
    from enrichment.records import read_records_file
    from enrichment.schedule import ModelIdentity, RunKind, schedule_run

    config = settings()
    model_dir = model_dir or config.require_model_dir()
    spec, version, _ = read_model_json(model_dir)
    dispatcher = make_dispatcher(config, model_dir, progress and not as_json)
    db = open_db()
    scheduled = schedule_run(
        db,
        read_records_file(records_file),
        ModelIdentity(version, spec),
        RunKind.ON_DEMAND,
        {"records_file": str(records_file.resolve())},
        batch_size or config.batch_size,
        full=full,
    )
    if not as_json:
        click.echo(
            f"run {scheduled.run_id}: {scheduled.records_seen} records, "
            f"{len(scheduled.batch_ids)} batches for model {version}",
            err=True,
        )
    dispatcher.dispatch(db, scheduled)
    report_run(db, scheduled.run_id, as_json)


@click.command()
@click.argument("run_id", type=int)
@click.option(
    "--model",
    "model_dir",
    type=click.Path(path_type=Path),
    help="Model directory (default: $ENRICH_MODEL).",
)
@click.option(
    "--progress/--no-progress", default=True, help="Show a progress bar when running in-process."
)
@click.option("--json", "as_json", is_flag=True, help="Print the run's summary as JSON.")
def resume(run_id: int, model_dir: Path | None, progress: bool, as_json: bool) -> None:
    """Re-dispatch the batches of RUN_ID that never finished."""
    from enrichment.schedule import QUEUES, ScheduledRun, unfinished_batches

    config = settings()
    db = open_db()
    summary = _summary(db, run_id)
    batch_ids = unfinished_batches(db, run_id)
    dispatcher = make_dispatcher(
        config, model_dir or config.require_model_dir(), progress and not as_json
    )
    dispatcher.dispatch(
        db, ScheduledRun(run_id, QUEUES[summary.kind], batch_ids, summary.records_seen)
    )
    report_run(db, run_id, as_json)


def _summary(db: Database, run_id: int | None):
    from enrichment.query import run_summary

    return run_summary(db, run_id)


def make_dispatcher(config: Settings, model_dir: Path, progress: bool):
    """In-process without a broker; Celery workers with one."""
    if config.broker_url:
        from worker.dispatch import CeleryDispatcher

        return CeleryDispatcher()
    from enrichment.inprocess import InProcessDispatcher
    from enrichment.model import Classifier

    Classifier.load(model_dir)  # fail on a bad model before anything is written
    return InProcessDispatcher(config, model_dir, show_progress=progress)


def report_run(db: Database, run_id: int, as_json: bool) -> None:
    summary = _summary(db, run_id)
    if as_json:
        emit_json(summary.as_json())
        return
    click.echo(f"run {summary.id} {summary.status}")
    print_summary_counts(summary)


def print_summary_counts(summary) -> None:
    click.echo(f"  model          {summary.model_version}")
    click.echo(f"  records        {summary.records_seen} seen, {summary.records_enqueued} enqueued")
    click.echo(
        "  batches        "
        + (", ".join(f"{n} {s}" for s, n in sorted(summary.batches.items())) or "none")
    )
    click.echo(
        "  outcomes       "
        + (", ".join(f"{n} {s}" for s, n in sorted(summary.outcomes.items())) or "none yet")
    )
    for reason, count in summary.errors_by_reason.items():
        click.echo(f"    error {reason:<20} {count}")


@click.command()
@click.argument("run_id", type=int, required=False)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def status(run_id: int | None, as_json: bool) -> None:
    """Show a run's state and its counts by outcome (default: the latest run)."""
    db = open_db()
    summary = _summary(db, run_id)
    if as_json:
        emit_json(summary.as_json())
        return
    click.echo(f"run {summary.id} ({summary.kind}) {summary.status}")
    click.echo(f"  scope          {json.dumps(summary.scope)}")
    print_summary_counts(summary)


@click.command()
@click.option("--run", "run_id", type=int, help="Only records written by this run.")
@click.option(
    "--dataset", "datasets", multiple=True, help="Only records of this dataset (repeatable)."
)
@click.option("--record", "record_ids", multiple=True, help="Only this record id (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def results(
    run_id: int | None, datasets: tuple[str, ...], record_ids: tuple[str, ...], as_json: bool
) -> None:
    """List what happened to each record: outcome, error reason, labels with confidence."""
    from enrichment.query import record_results
    from enrichment.records import normalise_id

    db = open_db()
    wanted = [normalise_id(record_id) for record_id in record_ids]
    for result in record_results(db, run_id, datasets, wanted):
        if as_json:
            click.echo(json.dumps(result.as_json()))
            continue
        if result.labels:
            detail = ", ".join(
                f"{label['key']} {label['confidence']:.3f}" for label in result.labels
            )
        elif result.error_reason:
            detail = f"{result.error_reason}: {result.error_message}"
        else:
            detail = "no label above threshold"
        click.echo(f"{result.record_id}\t{result.status}\t{detail}")
