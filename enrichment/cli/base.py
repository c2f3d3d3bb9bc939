"""The `enrich` command group and what every subcommand shares.

Problems with input or configuration (`EnrichError`) are one line on stderr and
exit status 1; every reporting command has `--json` for scripts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click
import sqlalchemy as sa

from enrichment import __version__
from enrichment.config import Settings
from enrichment.errors import EnrichError
from enrichment.sources.europeana import IMAGE_SOURCES
from enrichment.store.database import Database, database_failure


class RunId(click.ParamType):
    """A run id. One beyond what a database stores names no run, and says so in one line."""

    name = "integer"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        from enrichment.store.query import check_run_id

        return check_run_id(click.INT.convert(value, param, ctx))


RUN_ID = RunId()


class FiniteFloat(click.ParamType):
    """A finite number within bounds. click.FloatRange lets NaN through (NaN compares false)."""

    name = "number"

    def __init__(
        self, low: float | None = None, high: float | None = None, low_open: bool = False
    ) -> None:
        self.low, self.high, self.low_open = low, high, low_open

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.low is not None and (number < self.low or (self.low_open and number == self.low)):
            self.fail(
                f"{number:g} must be {'above' if self.low_open else 'at least'} {self.low:g}",
                param,
                ctx,
            )
        if self.high is not None and number > self.high:
            self.fail(f"{number:g} must be at most {self.high:g}", param, ctx)
        return number


class Commands(click.Group):
    """Turns user-facing errors into one clean line instead of a traceback.

    A database that fails under a command (a damaged file, a dropped table, a
    server gone) is one line too, with the URL's password hidden: the same
    message `Database` gives when it cannot connect.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EnrichError as error:
            raise click.ClickException(str(error)) from None
        except sa.exc.DBAPIError as error:
            url = ctx.obj.database_url if isinstance(ctx.obj, Settings) else ""
            raise click.ClickException(str(database_failure(url, error))) from None


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


model_dir_option = click.option(
    "--model-dir",
    type=click.Path(path_type=Path),
    help="Model directory (default: $ENRICH_MODEL).",
)
batch_size_option = click.option(
    "--batch-size",
    type=click.IntRange(1, 10_000),
    help="Records per batch (default: $ENRICH_BATCH_SIZE or 128).",
)
image_source_option = click.option(
    "--image-source",
    type=click.Choice(IMAGE_SOURCES),
    default="auto",
    show_default=True,
    help="preview: Europeana's thumbnail; full: edmIsShownBy; auto: preview, else full.",
)
progress_option = click.option(
    "--progress/--no-progress", default=True, help="Show a progress bar when running in-process."
)


def selection_options(model_version_help: str, min_confidence_help: str, reviewed_default: str):
    """The options that choose labels, shared by `export` and `publish` (one ExportFilter)."""
    from enrichment.store.reviews import REVIEWED

    options = [
        click.option(
            "--dataset", "datasets", multiple=True, help="Only this dataset (repeatable)."
        ),
        click.option("--run", "run_id", type=RUN_ID, help="Only labels written by this run."),
        click.option("--model-version", metavar="VERSION", help=model_version_help),
        click.option(
            "--min-confidence", type=FiniteFloat(0, 1), metavar="X", help=min_confidence_help
        ),
        click.option(
            "--label", "labels", multiple=True, metavar="KEY", help="Only this label (repeatable)."
        ),
        click.option(
            "--reviewed",
            type=click.Choice(REVIEWED),
            default=reviewed_default,
            show_default=True,
            help="Curators' decisions (enrich review): any ignores them, not-rejected leaves "
            "out rejected labels, accepted keeps only accepted ones.",
        ),
    ]

    def apply(command):
        for option in reversed(options):
            command = option(command)
        return command

    return apply
