"""`enrich run`, `resume`, `status` and `results`: starting runs and seeing what they did."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NoReturn

import click
from click.core import ParameterSource

from enrichment import bootstrap
from enrichment.cli.base import (
    INTERRUPTED_EXIT,
    RUN_ID,
    batch_size_option,
    chosen_run,
    emit_json,
    image_source_option,
    inference_batch_option,
    model_dir_option,
    open_db,
    progress_option,
    reusability_option,
    run_option,
    settings,
)
from enrichment.errors import EnrichError
from enrichment.store.database import Database
from enrichment.store.query import INTERRUPTED
from enrichment.store.schema import RunStatus

SCOPE_HELP = "Exactly one of --records, --dataset, --query or --all says what to enrich."
# `enrich run` and `resume`: the run completed but not one record got a result, so a
# cron job can tell (1 stays "the command could not run", 2 a usage error).
EVERY_RECORD_FAILED = 3


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
@reusability_option
@click.option(
    "--media", is_flag=True, default=None, help="Only records with a resolvable media file."
)
@click.option(
    "--thumbnail", is_flag=True, default=None, help="Only records with a generated thumbnail."
)
@image_source_option
@model_dir_option
@batch_size_option
@inference_batch_option
@click.option(
    "--full", is_flag=True, help="Enqueue every record in scope, not only new or changed ones."
)
@click.option(
    "--sample",
    type=click.IntRange(min=1),
    help="Classify only a stable random draw of N records of the scope, preferring records "
    "another model version classified and curators reviewed (to compare versions).",
)
@click.option(
    "--seed",
    type=int,
    help="The draw of --sample: the same N and seed give the same records (default: 0).",
)
@progress_option
@click.option("--json", "as_json", is_flag=True, help="Print the run's summary as JSON.")
def run(
    records_file: Path | None,
    datasets: tuple[str, ...],
    query: str | None,
    everything: bool,
    qf: tuple[str, ...],
    reusability: tuple[str, ...],
    media: bool | None,
    thumbnail: bool | None,
    image_source: str,
    model_dir: Path | None,
    batch_size: int | None,
    inference_batch: int | None,
    full: bool,
    sample: int | None,
    seed: int | None,
    progress: bool,
    as_json: bool,
) -> None:
    """Start a run: page through the scope, cut it into batches and classify them.

    Without CELERY_BROKER_URL the batches run in this process and the command
    returns when the run is finished; with it, batches go to the Celery workers
    (`--all` on the nightly queue, everything else on the on-demand queue) and
    the command returns once they are queued. Prints the run id first.
    """
    from enrichment.runs import service
    from enrichment.runs.schedule import RunKind
    from enrichment.sources.europeana import (
        SearchPageError,
        SearchQuery,
        dataset_query,
        whole_collection_query,
    )

    chosen = [bool(records_file), bool(datasets), query is not None, everything]
    if sum(chosen) != 1:
        raise click.UsageError(SCOPE_HELP)
    if records_file is not None:
        given = click.get_current_context().get_parameter_source
        searching = [
            f"--{name.replace('_', '-')}"
            for name in ("qf", "reusability", "media", "thumbnail", "image_source")
            if given(name) is not ParameterSource.DEFAULT
        ]
        if searching:
            raise click.UsageError(
                f"{', '.join(searching)}: for Search API scopes only; a records file is "
                "read as it is, each record with its own image_url"
            )
        scope = service.records_scope(records_file)
    else:
        queries = (
            [dataset_query(dataset) for dataset in datasets]
            if datasets
            else [whole_collection_query() if everything else SearchQuery(query or "*")]
        )
        queries = [
            SearchQuery(q.query, (*q.qf, *qf), ",".join(reusability) or None, media, thumbnail)
            for q in queries
        ]
        scope = service.europeana_scope(queries, image_source)
    if seed is not None and sample is None:
        raise click.UsageError("--seed draws a sample: give --sample N too")
    if sample is not None:
        scope = service.sampled(scope, sample, seed or 0)
    config = settings()
    model_dir = model_dir or config.require_model_dir()
    request = service.RunRequest(
        scope,
        RunKind.NIGHTLY if everything else RunKind.ON_DEMAND,
        model_dir,
        batch_size or config.batch_size,
        full,
    )
    checked = service.check(request, config)
    db = open_db(create=True)
    begun: list[int] = []

    def announce(run_id: int, version: str) -> None:
        begun.append(run_id)
        if not as_json:
            click.echo(f"run {run_id} started for model {version}", err=True)

    try:
        started = service.enrich(
            db,
            config,
            checked,
            lambda: bootstrap.dispatcher(
                config, model_dir, inference_batch, progress and not as_json
            ),
            on_start=announce,
        )
    except KeyboardInterrupt:
        _interrupted(begun[0] if begun else None)
    except SearchPageError as error:
        if not begun:
            raise
        raise _resumable(error, begun[0]) from None
    report_run(db, started.run_id, as_json)


@click.command()
@run_option(required=True)
@model_dir_option
@batch_size_option
@inference_batch_option
@progress_option
@click.option("--json", "as_json", is_flag=True, help="Print the run's summary as JSON.")
def resume(
    run_id: int | None,
    run_alias: int | None,
    model_dir: Path | None,
    batch_size: int | None,
    inference_batch: int | None,
    progress: bool,
    as_json: bool,
) -> None:
    """Continue a run from its checkpoint and re-dispatch its batches that never finished.

    With --model-dir naming another model version than the run's, the run's
    unfinished batches (and pages still to come) move to that version first;
    without it a run keeps its version, and waits for workers that hold it.
    """
    from enrichment.runs import service
    from enrichment.sources.europeana import SearchPageError

    chosen = chosen_run(run_id, run_alias, required=True)
    assert chosen is not None
    config = settings()
    move_to = service.model_identity(model_dir) if model_dir is not None else None
    model_dir = model_dir or config.require_model_dir()
    runs_here = None if config.broker_url else service.model_identity(model_dir).version
    db = open_db()
    try:
        service.resume(
            db,
            config,
            chosen,
            lambda: bootstrap.dispatcher(
                config, model_dir, inference_batch, progress and not as_json
            ),
            batch_size or config.batch_size,
            move_to,
            runs_here,
        )
    except KeyboardInterrupt:
        _interrupted(chosen)
    except SearchPageError as error:
        raise _resumable(error, chosen) from None
    if move_to is not None and not as_json:
        click.echo(f"run {chosen} is for model {move_to.version}", err=True)
    report_run(db, chosen, as_json)


def _resumable(error: EnrichError, run_id: int) -> EnrichError:
    """A Search API page that kept failing: the run stopped at the page before, and a
    resume pages on from there once the API answers again."""
    return EnrichError(
        f"{error}; run {run_id} stopped there: continue it with `enrich resume --run {run_id}`"
    )


def _interrupted(run_id: int | None) -> NoReturn:
    """Ctrl-C: what became of the run and how to go on, and the exit status of a command a
    signal ended (128 + SIGINT), where click would say only "Aborted!"."""
    if run_id is None:
        click.echo("interrupted before the run began: nothing was started", err=True)
    else:
        click.echo(
            f"run {run_id} interrupted: the records it finished are kept; continue it with "
            f"`enrich resume --run {run_id}`",
            err=True,
        )
    raise SystemExit(INTERRUPTED_EXIT)


def _summary(db: Database, run_id: int | None):
    from enrichment.store.locks import LockLiveness
    from enrichment.store.query import run_summary

    return run_summary(db, run_id, LockLiveness(db))


def report_run(db: Database, run_id: int, as_json: bool) -> None:
    """The run's summary; exits with EVERY_RECORD_FAILED when it completed with no result."""
    summary = _summary(db, run_id)
    waiting = waiting_for(db, summary)
    if as_json:
        emit_json({**summary.as_json(), "waiting_for_model": waiting})
    else:
        click.echo(f"run {summary.id} {summary.status}")
        print_summary_counts(summary)
        print_waiting(summary.id, waiting)
    failed = summary.outcomes.get("error", 0)
    if (
        summary.status == RunStatus.COMPLETED
        and summary.records_done
        and failed == sum(summary.outcomes.values())
    ):
        click.echo(
            f"every record of run {summary.id} failed: see `enrich results --run {summary.id}`",
            err=True,
        )
        raise SystemExit(EVERY_RECORD_FAILED)


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
    # A completed run's outcomes are what it did, counted when it completed: new thresholds,
    # a later run or a retirement since change what the records hold (`enrich results`).
    when = " (when it completed)" if summary.status == RunStatus.COMPLETED else ""
    click.echo(f"  outcomes       {outcomes}{when}")
    for reason, count in summary.errors_by_reason.items():
        click.echo(f"    error {reason:<20} {count}")
    if summary.error:
        click.echo(f"  stopped by     {summary.error}")
    if summary.relabelling_after is not None:
        where = f" (after record {after})" if (after := summary.relabelling_after) else ""
        click.echo(
            f"  relabelling    by the model's new thresholds, not finished{where}: "
            "a run or `enrich resume` of the model, or an export, finishes it"
        )
    if summary.status == INTERRUPTED:
        click.echo(
            "  interrupted    no process is scheduling it: "
            f"continue with `enrich resume --run {summary.id}`"
        )


@click.command()
@run_option(required=False)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def status(run_id: int | None, run_alias: int | None, as_json: bool) -> None:
    """Show a run's state and its counts by outcome (default: the latest run)."""
    chosen = chosen_run(run_id, run_alias, required=False)  # a usage error comes first
    db = open_db()
    summary = _summary(db, chosen)
    waiting = waiting_for(db, summary)
    if as_json:
        emit_json({**summary.as_json(), "waiting_for_model": waiting})
        return
    click.echo(f"run {summary.id} ({summary.kind}) {summary.status}")
    click.echo(f"  scope          {json.dumps(summary.scope)}")
    print_summary_counts(summary)
    print_waiting(summary.id, waiting)


def print_waiting(run_id: int, waiting: str | None) -> None:
    if waiting is not None:
        click.echo(
            f"  waiting        for a worker with model {waiting}: no live worker holds it; "
            f"start one with that model, or move the run with "
            f"`enrich resume --run {run_id} --model-dir NEW`"
        )


def waiting_for(db: Database, summary) -> str | None:
    """The model version a run's queued batches wait for, when no live worker holds it.

    Only batches handed to a broker wait for workers (an in-process run's are
    `pending`); a worker counts as live while it reports within the window
    that makes its batches stale (`store.workers`).
    """
    from enrichment.store.schema import BatchStatus
    from enrichment.store.workers import live_versions

    if summary.status not in (RunStatus.SCHEDULING, RunStatus.RUNNING):
        return None
    if not summary.batches.get(BatchStatus.QUEUED):
        return None
    config = settings()
    window = config.heartbeat_interval * config.heartbeat_stale
    if summary.model_version in live_versions(db, window):
        return None
    return summary.model_version


@click.command()
@click.option("--run", "run_id", type=RUN_ID, help="Only records written by this run.")
@click.option(
    "--dataset", "datasets", multiple=True, help="Only records of this dataset (repeatable)."
)
@click.option("--record", "record_ids", multiple=True, help="Only this record id (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def results(
    run_id: int | None, datasets: tuple[str, ...], record_ids: tuple[str, ...], as_json: bool
) -> None:
    """List what happened to each record: outcome, error reason, labels with confidence.

    One line per record and model version (record, outcome, labels or error, model
    version), fields separated by tabs; a tab, newline or backslash inside a field is
    written as \\t, \\n or \\\\. With
    --record, a line follows for each annotation published (or about to be) for
    the record: its state, label, annotation id and model version, and the
    Annotations API that holds it. When nothing matches, says so on stderr and
    exits with status 1.
    """
    from enrichment.sources.records_file import normalise_id
    from enrichment.store.ledger import publications_for_record
    from enrichment.store.query import record_results, run_exists

    wanted = [normalise_id(record_id) for record_id in record_ids]
    db = open_db()
    found = 0
    shown: set[str] = set()
    for result in record_results(db, run_id, datasets, wanted):
        found += 1
        # Asked for by id: what was published to Europeana for it too, once per record.
        published = []
        if wanted and result.record_id not in shown:
            shown.add(result.record_id)
            published = publications_for_record(db, result.record_id)
        if as_json:
            document = result.as_json()
            if published:
                document["publications"] = published
            click.echo(json.dumps(document))
            continue
        if result.labels:
            detail = ", ".join(
                f"{label['key']} {label['confidence']:.3f}" for label in result.labels
            )
        elif result.error_reason:
            detail = f"{result.error_reason}: {result.error_message}"
        else:
            detail = "no label above threshold"
        # The version last: two versions' lines for one record were otherwise alike.
        fields = (result.record_id, result.status, detail, result.model_version)
        click.echo("\t".join(map(tsv_field, fields)))
        for entry in published:
            where = f"{entry['label']} {entry['annotation_id'] or '-'} ({entry['model_version']})"
            sent = "published" if entry["sent"] else "intent"
            # The API's URL last: a record published to a test and a production API has a
            # row for each, and the ids alone do not say which server holds them.
            fields = (result.record_id, f"{sent}:{entry['state']}", where, entry["api_url"])
            click.echo("\t".join(map(tsv_field, fields)))
    if found:
        return
    if run_id is not None and not run_exists(db, run_id):
        raise EnrichError(f"run {run_id} does not exist")
    asked = [f"--run {run_id}"] if run_id is not None else []
    asked += [f"--dataset {tsv_field(dataset)}" for dataset in datasets]
    asked += [f"--record {record_id}" for record_id in wanted]
    raise EnrichError(
        f"no results match {' '.join(asked)}" if asked else "no results yet: run `enrich run`"
    )


def tsv_field(text: str) -> str:
    """A field that cannot break its line or column: backslash, tab, CR and LF escaped.

    Other control and bidi characters are shown as \\uXXXX, so an id or an
    error message can never rewrite what the terminal shows.
    """
    return _UNSAFE.sub(_escape, text)


_UNSAFE = re.compile(r"[\\\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(match: re.Match[str]) -> str:
    character = match.group()
    return _NAMED.get(character) or f"\\u{ord(character):04x}"
