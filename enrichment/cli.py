"""The `enrich` command: a thin layer over the library, one subcommand per job.

Problems with input or configuration (`EnrichError`) are one line on stderr and
exit status 1; every reporting command has `--json` for scripts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from enrichment import __version__
from enrichment.config import Settings
from enrichment.errors import EnrichError
from enrichment.store import Database


class Commands(click.Group):
    """Turns user-facing errors into one clean line instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EnrichError as error:
            raise click.ClickException(str(error)) from None


def settings() -> Settings:
    return click.get_current_context().obj


def open_db() -> Database:
    db = Database(settings().database_url)
    db.ensure_schema()
    return db


def emit_json(document: Any) -> None:
    click.echo(json.dumps(document, indent=2, default=str))


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="enrich")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Classify images of cultural-heritage records; export the labels as W3C Web Annotations.

    Configuration comes from the environment (DATABASE_URL, CELERY_BROKER_URL,
    ENRICH_MODEL, ...): see the README's configuration table.
    """
    ctx.obj = Settings.from_env()


@cli.command()
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


@cli.command()
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


@cli.command()
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


@cli.command()
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


@cli.command()
@click.option(
    "--out",
    "out_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Output file (default: stdout).",
)
@click.option("--run", "run_id", type=int, help="Only labels written by this run.")
@click.option("--dataset", "datasets", multiple=True, help="Only this dataset (repeatable).")
def export(out_path: Path | None, run_id: int | None, datasets: tuple[str, ...]) -> None:
    """Export labels as a W3C Web Annotation collection in JSON-LD."""
    from enrichment.export import ExportFilter, write_collection

    db = open_db()
    filters = ExportFilter(run_id=run_id, datasets=datasets)
    label = "Image classification labels" + (f" of run {run_id}" if run_id else "")
    if out_path is None:
        count = write_collection(db, filters, sys.stdout, label)
    else:
        partial = out_path.with_name(out_path.name + ".partial")
        with partial.open("w", encoding="utf-8") as out:
            count = write_collection(db, filters, out, label)
        partial.replace(out_path)
        click.echo(f"wrote {count} annotations to {out_path}", err=True)


@cli.group()
def db() -> None:
    """Manage the database schema (Alembic migrations)."""


@db.command()
@click.argument("revision", default="head")
def upgrade(revision: str) -> None:
    """Apply migrations to DATABASE_URL (default: all)."""
    database = Database(settings().database_url)
    database.upgrade(revision)
    click.echo(f"database at revision {database.current_revision()}")


@db.command()
@click.argument("revision")
def downgrade(revision: str) -> None:
    """Revert migrations down to REVISION ('base' removes every table)."""
    database = Database(settings().database_url)
    database.downgrade(revision)
    click.echo(f"database at revision {database.current_revision() or 'base'}")


@cli.group()
def model() -> None:
    """Inspect model directories."""


@model.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def info(directory: Path, as_json: bool) -> None:
    """Print a model directory's version, architecture, labels and thresholds (verified)."""
    from enrichment.model import Classifier

    classifier = Classifier.load(directory)
    spec = classifier.spec
    if as_json:
        emit_json(
            {
                "version": classifier.version,
                "architecture": spec.architecture,
                "input_size": spec.input_size,
                "labels": [label.as_json() for label in spec.labels],
            }
        )
        return
    click.echo(f"{classifier.version}  {spec.architecture}  input {spec.input_size}px")
    for label in spec.labels:
        click.echo(f"  {label.key:<20} threshold {label.threshold:.3f}  {label.concept}")


def main() -> None:
    cli(prog_name="enrich")
