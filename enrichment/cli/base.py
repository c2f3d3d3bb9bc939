"""The `enrich` command group and what every subcommand shares.

Problems with input or configuration (`EnrichError`), a database that fails
and a file that cannot be read or written are one line on stderr and exit
status 1; every reporting command has `--json` for scripts. The settings are
read once, when the command starts (`enrichment.bootstrap`).
"""

from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path
from typing import Any

import click
import sqlalchemy as sa

from enrichment import __version__, bootstrap
from enrichment.config import Settings
from enrichment.errors import EnrichError, InvalidValue
from enrichment.sources.europeana import IMAGE_SOURCES, reusability_groups
from enrichment.store.database import Database, database_failure
from enrichment.store.runs import UnfinishedRun


class RunId(click.ParamType):
    """A run id. One beyond what a database stores names no run, and says so in one line."""

    name = "integer"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        from enrichment.store.query import check_run_id

        return check_run_id(click.INT.convert(value, param, ctx))


RUN_ID = RunId()
INTERRUPTED_EXIT = 130  # 128 + SIGINT, as a shell reports a command Ctrl-C ended
# A write that failed for want of room (or a dying disk): no file named, so standard output.
OUTPUT_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})


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


class Reusability(click.ParamType):
    """Europeana's reusability groups, one or several comma-separated: `open,permission`."""

    name = "groups"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        try:
            return reusability_groups(str(value))
        except InvalidValue as error:
            self.fail(str(error), param, ctx)


class Commands(click.Group):
    """The CLI's error boundary: user-facing errors become one clean line, not a traceback.

    A library error about a value (`InvalidValue`) names the field; here it is
    told as click tells a bad option, with the option of the command that
    takes that field. A database that fails under a command (a damaged file, a
    dropped table, a server gone, a read-only file, directory or server) is one
    line too, with the URL's password hidden: the same message `Database` gives
    when it cannot connect. A file
    that cannot be read or written names its path.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except InvalidValue as error:
            raise click.ClickException(self._invalid_value(ctx, error)) from None
        except UnfinishedRun as error:
            raise click.ClickException(
                f"{error}: follow it with `enrich status --run {error.run_id}` "
                f"or continue it with `enrich resume --run {error.run_id}`"
            ) from None
        except EnrichError as error:
            raise click.ClickException(str(error)) from None
        except sa.exc.DBAPIError as error:
            url = ctx.obj.database_url if isinstance(ctx.obj, Settings) else ""
            raise click.ClickException(str(database_failure(url, error))) from None
        except OSError as error:
            if error.filename is None:
                raise  # standard output on a full disk, say (`cli.main`)
            raise click.ClickException(path_failure(error)) from None
        except KeyboardInterrupt:
            # Ctrl-C: what a shell reports for a command it ended (128 + SIGINT), where
            # click would say "Aborted!" and exit 1. Commands whose work goes on later say
            # how first (`run`, `resume`, `publish`); an export's files are as they were.
            click.echo("interrupted", err=True)
            raise SystemExit(INTERRUPTED_EXIT) from None

    def _invalid_value(self, ctx: click.Context, error: InvalidValue) -> str:
        """`Invalid value for '--opt': message`, or the message alone if no option has the field."""
        hints = {
            param.get_error_hint(ctx)
            for param in _parameters(self.get_command(ctx, ctx.invoked_subcommand or ""))
            if param.name == error.field
        }
        if len(hints) != 1:
            return str(error)
        return f"Invalid value for {hints.pop()}: {error}"


def _parameters(command: click.Command | None) -> list[click.Parameter]:
    """A command's parameters; a group's, with those of its subcommands."""
    if command is None:
        return []
    found = list(command.params)
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            found += _parameters(sub)
    return found


def path_failure(error: OSError) -> str:
    """`cannot write PATH: reason` (or read): an OSError about a file, in one line."""
    path = Path(os.fsdecode(error.filename))
    verb = "read" if _was_reading(error, path) else "write"
    return f"cannot {verb} {path}: {error.strerror or error}"


def _was_reading(error: OSError, path: Path) -> bool:
    """Only what cannot be a write: a missing file in a folder that exists, or one that is
    there but not readable. Anything else at this boundary is an output path."""
    if error.errno == errno.ENOENT:
        return path.parent.is_dir()
    if error.errno in (errno.EACCES, errno.EPERM):
        return path.exists() and not os.access(path, os.R_OK)
    return False


def settings() -> Settings:
    """This command's settings, read from the environment when it started."""
    return click.get_current_context().obj


def open_db(create: bool = False) -> Database:
    """The database of the settings, at this code's schema; made only with `create`."""
    return bootstrap.open_database(settings(), create)


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
    ctx.obj = bootstrap.read_settings()


def run_option(required: bool):
    """The run as `--run N`, as every command names it; `RUN` alone, the older form, works too."""

    def apply(command):
        command = click.option(
            "--run",
            "run_id",
            type=RUN_ID,
            help="The run"
            + ("" if required else " (default: the latest)")
            + "; RUN alone works too.",
        )(command)
        return click.argument("run_alias", metavar="[RUN]", type=RUN_ID, required=False)(command)

    return apply


def chosen_run(run_id: int | None, run_alias: int | None, required: bool) -> int | None:
    """The run named by `--run N` or by the old positional form, which must agree."""
    if run_id is not None and run_alias is not None and run_id != run_alias:
        raise click.UsageError(f"two runs given: --run {run_id} and {run_alias}")
    chosen = run_id if run_id is not None else run_alias
    if chosen is None and required:
        raise click.UsageError("Missing option '--run'.")
    return chosen


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
inference_batch_option = click.option(
    "--inference-batch",
    type=click.IntRange(1, 4096),
    help="Images per forward pass when batches run in this process "
    "(default: $ENRICH_INFERENCE_BATCH or 32; Celery workers use their own).",
)
# One form in `run` and `harvest`: the groups the Search API's `reusability` takes.
reusability_option = click.option(
    "--reusability",
    type=Reusability(),
    default=(),
    help="Only records whose rights fall in these groups: open, restricted, permission, "
    "or several comma-separated (e.g. open,permission).",
)
progress_option = click.option(
    "--progress/--no-progress",
    default=True,
    help="Show a progress bar when running in-process, on a terminal.",
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
            "--class",
            "--label",
            "labels",
            multiple=True,
            metavar="KEY",
            help="Only labels of this class (repeatable).",
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
