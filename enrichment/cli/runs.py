"""`enrich run`, `resume`, `status` and `results`: starting runs and seeing what they did."""

from __future__ import annotations

import json
from pathlib import Path

import click

from enrichment.cli.base import (
    batch_size_option,
    emit_json,
    model_dir_option,
    open_db,
    progress_option,
    settings,
)
from enrichment.sources.europeana import IMAGE_SOURCES, REUSABILITY
from enrichment.store.database import Database

SCOPE_HELP = "Exactly one of --records, --dataset, --query or --all says what to enrich."


@click.command()
@click.option(
    "--records",
    "records_file",
    type=click.Path(path_type=Path),
    help="JSON Lines or CSV records file: id, image_url (item_uri, provider, timestamp_update).",
)
@click.option("--dataset", "datasets", multiple=True, help="A Europeana dataset id (repeatable).")
@click.option("--query", help="Any Europeana Search API query.")
@click.option(
    "--all", "everything", is_flag=True, help="The whole collection the key can see (TYPE:IMAGE)."
)
@click.option("--qf", multiple=True, help="Extra Search API filter query (repeatable).")
@click.option("--reusability", type=click.Choice(REUSABILITY))
@click.option(
    "--media", is_flag=True, default=None, help="Only records with a resolvable media file."
)
@click.option(
    "--thumbnail", is_flag=True, default=None, help="Only records with a generated thumbnail."
)
@click.option(
    "--image-source",
    type=click.Choice(IMAGE_SOURCES),
    default="auto",
    show_default=True,
    help="preview: Europeana's thumbnail; full: edmIsShownBy; auto: preview, else full.",
)
@model_dir_option
@batch_size_option
@click.option(
    "--full", is_flag=True, help="Enqueue every record in scope, not only new or changed ones."
)
@progress_option
@click.option("--json", "as_json", is_flag=True, help="Print the run's summary as JSON.")
def run(
    records_file: Path | None,
    datasets: tuple[str, ...],
    query: str | None,
    everything: bool,
    qf: tuple[str, ...],
    reusability: str | None,
    media: bool | None,
    thumbnail: bool | None,
    image_source: str,
    model_dir: Path | None,
    batch_size: int | None,
    full: bool,
    progress: bool,
    as_json: bool,
) -> None:
    """Start a run: page through the scope, cut it into batches and classify them.

    Without CELERY_BROKER_URL the batches run in this process and the command
    returns when the run is finished; with it, batches go to the Celery workers
    (`--all` on the nightly queue, everything else on the on-demand queue) and
    the command returns once they are queued. Prints the run id first.
    """
    from enrichment.model.spec import read_model_json
    from enrichment.runs import service
    from enrichment.runs.schedule import ModelIdentity, RunKind
    from enrichment.sources.europeana import SearchQuery, dataset_query, whole_collection_query

    chosen = [bool(records_file), bool(datasets), query is not None, everything]
    if sum(chosen) != 1:
        raise click.UsageError(SCOPE_HELP)
    if records_file is not None:
        scope = service.records_scope(records_file)
    else:
        queries = (
            [dataset_query(dataset) for dataset in datasets]
            if datasets
            else [whole_collection_query() if everything else SearchQuery(query or "*")]
        )
        queries = [
            SearchQuery(q.query, (*q.qf, *qf), reusability, media, thumbnail) for q in queries
        ]
        scope = service.europeana_scope(queries, image_source)
    config = settings()
    model_dir = model_dir or config.require_model_dir()
    spec, version, _ = read_model_json(model_dir)
    service.check_scope(scope, config)
    db = open_db()

    def announce(run_id: int) -> None:
        if not as_json:
            click.echo(f"run {run_id} started for model {version}", err=True)

    from enrichment.runs.dispatchers import make_dispatcher

    with make_dispatcher(config, model_dir, progress and not as_json) as dispatcher:
        started = service.start(
            db,
            config,
            scope,
            RunKind.NIGHTLY if everything else RunKind.ON_DEMAND,
            ModelIdentity(version, spec),
            dispatcher,
            batch_size or config.batch_size,
            full=full,
            on_start=announce,
        )
    report_run(db, started.run_id, as_json)


@click.command()
@click.argument("run_id", type=int)
@model_dir_option
@batch_size_option
@progress_option
@click.option("--json", "as_json", is_flag=True, help="Print the run's summary as JSON.")
def resume(
    run_id: int, model_dir: Path | None, batch_size: int | None, progress: bool, as_json: bool
) -> None:
    """Continue RUN_ID from its checkpoint and re-dispatch its batches that never finished."""
    from enrichment.runs import service

    config = settings()
    db = open_db()
    model_dir = model_dir or config.require_model_dir()
    from enrichment.runs.dispatchers import make_dispatcher

    with make_dispatcher(config, model_dir, progress and not as_json) as dispatcher:
        service.resume(db, config, run_id, dispatcher, batch_size or config.batch_size)
    report_run(db, run_id, as_json)


def _summary(db: Database, run_id: int | None):
    from enrichment.store.query import run_summary

    return run_summary(db, run_id)


def report_run(db: Database, run_id: int, as_json: bool) -> None:
    summary = _summary(db, run_id)
    if as_json:
        emit_json(summary.as_json())
        return
    click.echo(f"run {summary.id} {summary.status}")
    print_summary_counts(summary)


def print_summary_counts(summary) -> None:
    click.echo(f"  model          {summary.model_version}")
    click.echo(
        f"  records        {summary.records_seen} seen, {summary.records_enqueued} enqueued, "
        f"{summary.records_done} done, {summary.outcomes.get('error', 0)} failed"
    )
    if summary.rate is not None:
        eta = f", about {summary.eta_seconds:.0f} s left" if summary.eta_seconds else ""
        click.echo(f"  rate           {summary.rate:g} records/s{eta}")
    batches = ", ".join(f"{n} {s}" for s, n in sorted(summary.batches.items())) or "none"
    outcomes = ", ".join(f"{n} {s}" for s, n in sorted(summary.outcomes.items())) or "none yet"
    click.echo(f"  batches        {batches}")
    click.echo(f"  outcomes       {outcomes}")
    for reason, count in summary.errors_by_reason.items():
        click.echo(f"    error {reason:<20} {count}")
    if summary.error:
        click.echo(f"  stopped by     {summary.error}")


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
    from enrichment.sources.records_file import normalise_id
    from enrichment.store.query import record_results

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
