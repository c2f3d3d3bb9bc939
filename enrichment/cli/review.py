"""`enrich review`: the curator review app, and what its decisions feed (stats, labelled sets,
Label Studio)."""

from __future__ import annotations

from pathlib import Path

import click

from enrichment.cli.base import RUN_ID, emit_json, open_db, settings
from enrichment.files import output_target

DEFAULT_PORT = 8765
SKIPPED_SHOWN = 10  # skipped Label Studio tasks listed one by one; the rest are counted


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
@click.option(
    "--behind-proxy",
    is_flag=True,
    envvar="ENRICH_REVIEW_BEHIND_PROXY",
    help="Trust one reverse proxy's X-Forwarded-Proto/-Host/-Port/-For/-Prefix "
    "(a TLS-terminating proxy in front of the app). Off by default.",
)
@click.pass_context
def review(
    ctx: click.Context,
    host: str,
    port: int,
    cache_dir: Path | None,
    threads: int,
    behind_proxy: bool,
) -> None:
    """Serve the curator review web app over DATABASE_URL (or run a subcommand).

    A queue per class, most uncertain first, a grid with bulk accept/reject, a
    record view, keyboard shortcuts; decisions go to the reviews table, which
    `enrich export --reviewed`, `review stats` and `review export` read.
    """
    if ctx.invoked_subcommand is not None:
        return
    import socket

    import waitress.server

    from enrichment.errors import InvalidValue
    from enrichment.review.app import create_app
    from enrichment.store.review_queue import QueueFilter, queue_progress

    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise InvalidValue("host", f"{host} does not resolve: {reason}") from None
    db = open_db()
    app = create_app(
        db, settings(), cache_dir or default_cache_dir(), bound_to=host, behind_proxy=behind_proxy
    )
    try:
        server = waitress.server.create_server(
            app, host=host, port=port, threads=threads, ident="enrich-review"
        )
    except OSError as error:
        raise InvalidValue("port", f"cannot listen on {host}:{port}: {error.strerror}") from None
    progress = queue_progress(db, QueueFilter())
    pending = progress.pending
    shown = f"[{host}]" if ":" in host else host
    database = db.engine.url.render_as_string(hide_password=True)
    click.echo(
        f"review app on http://{shown}:{port}/ over {database}:"
        f" {pending}{'+' if progress.pending_capped else ''} pending item"
        f"{'' if pending == 1 else 's'}{' (behind a proxy)' if behind_proxy else ''}"
        " (Ctrl-C stops it)",
        err=True,
    )
    server.run()


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

    click.echo(stats_table(rows))


def stats_table(rows) -> str:
    """The stats as an aligned text table, with the page's three decimals."""
    from enrichment.review.stats import MIN_DECISIONS

    def interval(value) -> str:
        if value is None:
            return "-"
        return f"{value.estimate:.3f} [{value.low:.3f}, {value.high:.3f}]"

    def suggested(row) -> str:
        value = "-" if row.suggested_threshold is None else f"{row.suggested_threshold:.3f}"
        if row.too_few_decisions:
            return f"{value} (too few decisions: {row.reviewed} < {MIN_DECISIONS})"
        return value

    header = (
        "model",
        "class",
        "thr",
        "reviewed",
        "acc",
        "rej",
        "added",
        "precision (95% CI)",
        "audit",
        "audit precision",
        "suggested",
    )
    table = [header] + [
        (
            row.model_version,
            row.key,
            f"{row.threshold:.3f}",
            str(row.reviewed),
            str(row.accepted),
            str(row.rejected_above),
            str(row.added),
            interval(row.precision),
            str(row.audited),
            interval(row.audit_precision),
            suggested(row),
        )
        for row in rows
    ]
    widths = [max(len(line[column]) for line in table) for column in range(len(header))]
    left = {0, 1, len(header) - 1}  # text columns; the rest are numbers, right-aligned
    return "\n".join(
        "  ".join(
            cell.ljust(width) if column in left else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in table
    )


@review.command("export")
@click.option(
    "--out",
    "out_path",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="The labelled set to write (.jsonl; - for standard output), for `enrich model "
    "calibrate` or `train`.",
)
@with_filters
def export_reviewed(
    out_path: Path, datasets: tuple[str, ...], run_id: int | None, model_version: str | None
) -> None:
    """The reviewed records as a labelled set: image URL, labels, record id as the group."""
    import sys

    from enrichment.publish.pages import AtomicFiles
    from enrichment.review.exchange import write_labelled_set
    from enrichment.sources.tabular import CSV, table_format
    from enrichment.store.review_queue import QueueFilter

    # Written as JSON Lines: a `.csv` name would be read back as CSV by calibrate and train.
    if table_format(out_path) == CSV:
        raise click.BadParameter(
            f"{out_path}: the labelled set is JSON Lines; name it .jsonl", param_hint="'--out'"
        )
    filters = QueueFilter(datasets=datasets, run_id=run_id, model_version=model_version)
    db = open_db()
    if out_path == Path("-"):  # the usual name for standard output
        written = write_labelled_set(db, filters, sys.stdout)
        click.echo(f"wrote {written} reviewed records", err=True)
        return
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
    if config_path is None:
        _, regular = output_target(out_path)
        if not regular:  # /dev/stdout.xml would be a new file in /dev
            raise click.UsageError("give --config when --out is a device or a pipe")
        config_path = out_path.with_suffix(".xml")
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
    for problem in report.skipped[:SKIPPED_SHOWN]:
        click.echo(f"  {problem}", err=True)
    if len(report.skipped) > SKIPPED_SHOWN:
        click.echo(f"  … and {len(report.skipped) - SKIPPED_SHOWN} more", err=True)
    if report.skipped and len(report.skipped) == report.tasks:
        # Not one task read: another project's export, or this database is not the one the
        # tasks came from; a script must not take it for a done import.
        raise click.ClickException(f"no task of {path} could be imported (reasons above)")
