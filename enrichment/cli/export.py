"""`enrich export`: labels as W3C Web Annotations in JSON-LD, for any consumer or for Europeana."""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path

import click

from enrichment.cli.base import open_db, selection_options
from enrichment.publish.annotations import PROFILES
from enrichment.publish.pages import FORMATS


class Moment(click.ParamType):
    """An ISO 8601 date or date-time; without an offset it is UTC, as the database stores."""

    name = "DATE"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None):
        if isinstance(value, datetime):
            return value
        from enrichment.store.schema import as_utc_naive

        try:
            return as_utc_naive(datetime.fromisoformat(str(value)))
        except ValueError:
            self.fail(f"{value!r} is not an ISO 8601 date such as 2024-05-01", param, ctx)


@click.command()
@click.option(
    "--out",
    "out_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Output file (default, or -: stdout). A regular file or new path is written under a "
    "temporary name and renamed when complete; a FIFO or device (/dev/stdout) is written "
    "through; a symlink keeps pointing at its target, which gets the export.",
)
@click.option(
    "--profile",
    type=click.Choice(list(PROFILES)),
    default="w3c",
    show_default=True,
    help="w3c: classifying, image target, confidence; "
    "europeana: tagging, item target, pages for POST /annotations/.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="jsonld",
    show_default=True,
    help="jsonld: one collection (W3C) or AnnotationPage (Europeana); "
    "jsonl: one annotation per line.",
)
@click.option(
    "--split",
    type=click.IntRange(1),
    metavar="N",
    help="N annotations per page, each page in its own file OUT-00001.jsonld, ... "
    "(W3C JSON-LD: OUT holds the collection that links them).",
)
@click.option(
    "--base-url",
    metavar="URL",
    help="The http(s) URL the files will be published under: the collection and page ids "
    "become URLs there (needs --out).",
)
@selection_options(
    model_version_help="Only this model version (default: each record's latest classification).",
    min_confidence_help="Only labels with confidence >= X, on top of the per-class thresholds.",
    reviewed_default="any",
)
@click.option("--since", type=Moment(), help="Only labels classified at or after DATE (UTC).")
@click.option(
    "--thresholds",
    "thresholds",
    type=click.Path(path_type=Path, dir_okay=False),
    help='Re-threshold the stored scores: a JSON object {"label_key": threshold, ...}; '
    "labels it does not name keep their model's threshold.",
)
def export(
    out_path: Path | None,
    profile: str,
    fmt: str,
    split: int | None,
    base_url: str | None,
    datasets: tuple[str, ...],
    run_id: int | None,
    model_version: str | None,
    since: datetime | None,
    min_confidence: float | None,
    thresholds: Path | None,
    labels: tuple[str, ...],
    reviewed: str,
) -> None:
    """Export labels as W3C Web Annotations in JSON-LD, streamed.

    Annotation ids are derived from (record, concept, model version): exporting
    again gives the same ids. Annotations that would not validate are skipped
    and reported on stderr.
    """
    from enrichment.publish.export import (
        ExportFilter,
        Output,
        check_output,
        export,
        read_thresholds,
    )

    filters = ExportFilter(
        datasets=datasets,
        run_id=run_id,
        model_version=model_version,
        since=since,
        min_confidence=min_confidence,
        labels=labels,
        thresholds=read_thresholds(thresholds) if thresholds else None,
        reviewed=reviewed,
    )
    if out_path == Path("-"):  # the usual name for standard output
        out_path = None
    output = check_output(Output(profile, fmt, out_path, split, base_url))  # before the database
    report = export(open_db(), filters, output, sys.stdout)
    if report.skipped:
        click.echo(f"skipped {report.skipped} annotations that would not validate, e.g.:", err=True)
        for problem in report.problems:
            click.echo(f"  {problem}", err=True)
    if out_path is not None:
        click.echo(f"wrote {report.written} annotations to {_files(report.files)}", err=True)


def _files(paths: list[Path]) -> str:
    if len(paths) == 1:
        return str(paths[0])
    names = ", ".join(path.name for path in paths[:3]) + (", ..." if len(paths) > 3 else "")
    return f"{len(paths)} files ({names})" if paths else "no files"
