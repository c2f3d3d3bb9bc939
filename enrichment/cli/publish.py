"""`enrich publish`: keep Europeana's Annotations API in step with the labels (docs/publish.md)."""

from __future__ import annotations

import click

from enrichment.cli.base import FiniteFloat, emit_json, open_db, selection_options, settings
from enrichment.errors import ConfigError


@click.command()
@selection_options(
    model_version_help="Only this model version (default: each record's latest classification). "
    "With --withdraw: what this version published.",
    min_confidence_help="Only labels with confidence >= X; published ones below it are withdrawn.",
    # A label a curator rejected is no longer current: publishing withdraws it.
    reviewed_default="not-rejected",
)
@click.option(
    "--withdraw",
    "withdraw_all",
    is_flag=True,
    help="Withdraw every published annotation of the selection instead of publishing.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="List what would be created, updated and withdrawn (one line each), and change nothing.",
)
@click.option(
    "--min-precision",
    type=FiniteFloat(0, 1),
    metavar="P",
    default=None,
    help="Only classes whose reviewed precision's 95% lower bound is >= P (and that have "
    "10 reviewed labels); the others are listed and left as they are on the server.",
)
@click.option("--status", "show_status", is_flag=True, help="Summarise the publication ledger.")
@click.option(
    "--concurrency",
    type=click.IntRange(1, 32),
    default=4,
    show_default=True,
    help="Requests at once.",
)
@click.option(
    "--page-size",
    type=click.IntRange(1, 1000),
    default=100,
    show_default=True,
    help="New annotations per AnnotationPage.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def publish(
    datasets: tuple[str, ...],
    run_id: int | None,
    model_version: str | None,
    min_confidence: float | None,
    labels: tuple[str, ...],
    reviewed: str,
    withdraw_all: bool,
    dry_run: bool,
    min_precision: float | None,
    show_status: bool,
    concurrency: int,
    page_size: int,
    as_json: bool,
) -> None:
    """Publish labels to Europeana's Annotations API and keep them in step.

    The selection is the export's: Europeana then holds exactly its current
    labels. New ones are created, changed ones updated by their Europeana id,
    ones no longer current withdrawn; every annotation is recorded in the
    publication ledger. Needs EUROPEANA_ANNOTATION_TOKEN (an OAuth access
    token with write access); EUROPEANA_ANNOTATION_API_URL names the API.
    """
    from enrichment.publish.annotations_api import AnnotationsAPI
    from enrichment.publish.export import ExportFilter
    from enrichment.publish.sync import Publisher
    from enrichment.store.ledger import publication_status

    config = settings()
    api_url = config.europeana_annotation_api_url
    db = open_db()
    if show_status:
        status = publication_status(db, api_url)
        if as_json:
            emit_json(status)
            return
        _print_status(status)
        return
    filters = ExportFilter(
        datasets=datasets,
        run_id=run_id,
        model_version=model_version,
        min_confidence=min_confidence,
        labels=labels,
        reviewed=reviewed,
    )
    api = None
    if not dry_run:
        if config.europeana_annotation_token is None:
            raise ConfigError(
                "publishing needs EUROPEANA_ANNOTATION_TOKEN, an OAuth access token with "
                "write access to the Annotations API (or use --dry-run)"
            )
        api = AnnotationsAPI(
            api_url, config.europeana_annotation_token, config.europeana_api_key, concurrency
        )
    try:
        publisher = Publisher(db, api_url, api, concurrency=concurrency, page_size=page_size)
        report = publisher.publish(
            filters, withdraw_all=withdraw_all, list_changes=dry_run, min_precision=min_precision
        )
    except KeyboardInterrupt:
        if api is not None:
            click.echo(
                "publish interrupted: the requests in flight were cut off, and their rows are "
                "left as intents; run `enrich publish` again, which settles them first",
                err=True,
            )
        raise
    finally:
        if api is not None:
            api.close()
    if as_json:
        emit_json(report.as_json())
    elif dry_run:
        for change in report.changes:
            held = f"\t{change['annotation_id']}" if change["annotation_id"] else ""
            click.echo(
                f"would {change['action']}\t{change['record_id']}\t{change['label']}"
                f"\t{change['model_version']}{held}"
            )
        click.echo(
            f"dry run against {api_url}: would create {report.created}, update {report.updated}, "
            f"withdraw {report.withdrawn}; {report.unchanged} unchanged"
            + (f"; {report.unsettled} unsettled rows to resolve first" if report.unsettled else "")
        )
    else:
        click.echo(
            f"published to {api_url}: {report.created} created, {report.updated} updated, "
            f"{report.withdrawn} withdrawn, {report.unchanged} unchanged"
            + (
                f"; of the unsettled, {report.adopted} adopted, {report.forgotten} forgotten"
                if report.adopted or report.forgotten
                else ""
            )
        )
    if report.refused_classes and not as_json:
        click.echo(
            f"refused by --min-precision {min_precision:g} ({report.held_back} labels held back; "
            "class, model version, reviewed labels, lower bound):",
            err=True,
        )
        for refused in report.refused_classes:
            low = "too few reviews" if refused["low"] is None else f"{refused['low']:.3f}"
            click.echo(
                f"  {refused['key']}\t{refused['model_version']}\t{refused['reviewed']}\t{low}",
                err=True,
            )
    if report.left_out_by_reviews and not as_json:
        click.echo(
            f"{report.left_out_by_reviews} labels left out by the curators' reviews "
            f"(--reviewed {reviewed})"
        )
    if report.rejected or report.invalid or report.not_owned or report.unusable:
        click.echo(
            f"{report.rejected} refused by the server, {report.invalid} not valid, "
            f"{report.not_owned} owned by another account, {report.unusable} answers "
            "that could not be recorded, e.g.:",
            err=True,
        )
    for problem in report.problems:
        click.echo(f"  {problem}", err=True)


def _print_status(status: dict) -> None:
    click.echo(f"publication ledger for {status['api_url']}")
    states = ", ".join(f"{n} {s}" for s, n in sorted(status["by_state"].items())) or "empty"
    click.echo(f"  annotations    {states}")
    for version, states_of in status["by_model_version"].items():
        counts = ", ".join(f"{n} {s}" for s, n in sorted(states_of.items()))
        click.echo(f"  {version:<30} {counts}")
    if status["last_change"]:
        click.echo(f"  last change    {status['last_change']}")
    for error in status["rejected"]:
        click.echo(f"  rejected       {error}")
