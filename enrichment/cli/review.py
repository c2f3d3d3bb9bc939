"""`enrich review`: the curator review app, and what its decisions feed (stats, labelled sets,
Label Studio)."""

from __future__ import annotations

from pathlib import Path

import click

from enrichment.cli.base import RUN_ID, emit_json, open_db, settings

DEFAULT_PORT = 8765


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "enrichment-review"


filter_options = [
    click.option("--dataset", "datasets", multiple=True, help="Only this dataset (repeatable)."),
    click.option("--run", "run_id", type=RUN_ID, help="Only results of this run."),
    click.option(
        "--model-version",
        metavar="VERSION",
        help="Only this model version (default: each record's latest classification).",
    ),
]


def with_filters(function):
    """The options that choose which results' items a command reads."""
    for option in reversed(filter_options):
        function = option(function)
    return function


@click.group(invoke_without_command=True)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; anything but loopback needs ENRICH_REVIEW_TOKEN.",
)
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True)
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Where fetched images are kept, shrunk (default: ~/.cache/enrichment-review).",
)
@click.option("--threads", type=click.IntRange(1, 64), default=8, show_default=True)
@click.pass_context
def review(ctx: click.Context, host: str, port: int, cache_dir: Path | None, threads: int) -> None:
    """Serve the curator review web app over DATABASE_URL (or run a subcommand).

    A queue per class, most uncertain first, a grid with bulk accept/reject, a
    record view, keyboard shortcuts; decisions go to the reviews table, which
    `enrich export --reviewed`, `review stats` and `review export` read.
    """
    if ctx.invoked_subcommand is not None:
        return
    import waitress

    from enrichment.review.app import create_app

    app = create_app(open_db(), settings(), cache_dir or default_cache_dir(), bound_to=host)
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"review app on http://{shown}:{port}/ (Ctrl-C stops it)", err=True)
    waitress.serve(app, host=host, port=port, threads=threads, ident="enrich-review")


@review.command()
@with_filters
@click.option(
    "--class", "--label", "classes", multiple=True, metavar="KEY", help="Only this class."
)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def stats(
    datasets: tuple[str, ...],
    run_id: int | None,
    model_version: str | None,
    classes: tuple[str, ...],
    as_json: bool,
) -> None:
    """Per class: decisions, observed precision (95% Wilson interval), additions, a threshold."""
    from enrichment.review.stats import class_stats
    from enrichment.store.review_queue import QueueFilter

    filters = QueueFilter(
        classes=classes, datasets=datasets, run_id=run_id, model_version=model_version
    )
    rows = class_stats(open_db(), filters)
    if as_json:
        emit_json([row.as_json() for row in rows])
        return
    if not rows:
        click.echo("no decisions yet")
        return

    def interval(value) -> str:
        if value is None:
            return "-"
        return f"{value.estimate:.2f} [{value.low:.2f}, {value.high:.2f}]"

    header = (
        f"{'model':<22} {'class':<16} {'thr':>5} {'reviewed':>8} {'acc':>5} {'rej':>5} "
        f"{'added':>5} {'precision (95% CI)':>20} {'audit':>5} {'audit precision':>20} "
        f"{'suggested':>9}"
    )
    click.echo(header)
    for row in rows:
        suggested = "-" if row.suggested_threshold is None else f"{row.suggested_threshold:.3f}"
        click.echo(
            f"{row.model_version:<22} {row.key:<16} {row.threshold:>5.2f} {row.reviewed:>8} "
            f"{row.accepted:>5} {row.rejected_above:>5} {row.added:>5} "
            f"{interval(row.precision):>20} {row.audited:>5} "
            f"{interval(row.audit_precision):>20} {suggested:>9}"
        )


@review.command("export")
@click.option(
    "--out",
    "out_path",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="The labelled set to write (.jsonl), for `enrich model calibrate` or `train`.",
)
@with_filters
def export_reviewed(
    out_path: Path, datasets: tuple[str, ...], run_id: int | None, model_version: str | None
) -> None:
    """The reviewed records as a labelled set: image URL, labels, record id as the group."""
    from enrichment.publish.pages import AtomicFiles
    from enrichment.review.exchange import write_labelled_set
    from enrichment.store.review_queue import QueueFilter

    filters = QueueFilter(datasets=datasets, run_id=run_id, model_version=model_version)
    db = open_db()
    with AtomicFiles() as atomic, atomic.create(out_path) as out:
        written = write_labelled_set(db, filters, out)
    click.echo(f"wrote {written} reviewed records to {out_path}", err=True)


@review.group("label-studio")
def label_studio() -> None:
    """Trade tasks and annotations with Label Studio."""


@label_studio.command("export")
@click.option(
    "--out",
    "out_path",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="Tasks to import into Label Studio (a JSON list).",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The labelling config to paste into the project (default: OUT with .xml).",
)
@with_filters
@click.option(
    "--class",
    "--label",
    "classes",
    multiple=True,
    metavar="KEY",
    help="Only records labelled with this class.",
)
@click.option("--pending", is_flag=True, help="Only records nobody has reviewed yet.")
def ls_export(
    out_path: Path,
    config_path: Path | None,
    datasets: tuple[str, ...],
    run_id: int | None,
    model_version: str | None,
    classes: tuple[str, ...],
    pending: bool,
) -> None:
    """Tasks with the model's predictions (one choices result per label), and a config."""
    from enrichment.review.exchange import write_label_studio
    from enrichment.store.review_queue import QueueFilter

    filters = QueueFilter(
        classes=classes,
        datasets=datasets,
        run_id=run_id,
        model_version=model_version,
        state="pending" if pending else "any",
    )
    config_path = config_path or out_path.with_suffix(".xml")
    count = write_label_studio(open_db(), filters, out_path, config_path)
    click.echo(
        f"wrote {count} tasks to {out_path} and the labelling config to {config_path}", err=True
    )


@label_studio.command("import")
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option(
    "--reviewer",
    default="label-studio",
    show_default=True,
    help="Who decided, where an annotation does not name its annotator.",
)
def ls_import(path: Path, reviewer: str) -> None:
    """Read a Label Studio JSON export back as review decisions."""
    from enrichment.review.exchange import import_label_studio

    report = import_label_studio(open_db(), path, reviewer)
    click.echo(
        f"{report.tasks} tasks: {report.decisions} decisions recorded, "
        f"{report.unchanged} already standing, {len(report.skipped)} tasks skipped",
        err=True,
    )
    for problem in report.skipped[:10]:
        click.echo(f"  {problem}", err=True)
