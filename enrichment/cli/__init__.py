"""The `enrich` command line: one module per group of subcommands, each a thin layer
over the library."""

import os
import sys

import click

from enrichment.cli import db, export, model, report, runs, worker
from enrichment.cli.base import OUTPUT_FULL, cli
from enrichment.cli.harvest import harvest
from enrichment.cli.publish import publish
from enrichment.cli.review import review

cli.add_command(runs.run)
cli.add_command(runs.resume)
cli.add_command(runs.status)
cli.add_command(runs.results)
cli.add_command(export.export)
cli.add_command(db.db)
cli.add_command(model.model)
cli.add_command(worker.worker)
cli.add_command(report.explain)
cli.add_command(report.report)
cli.add_command(review)
cli.add_command(harvest)
cli.add_command(publish)


def main() -> None:
    try:
        cli(prog_name="enrich")
    except OSError as error:
        # A write that failed for want of room, naming no file (files name themselves:
        # `Commands.invoke`): standard output, a help text or a JSON answer on a full disk.
        if error.errno not in OUTPUT_FULL:
            raise
        click.echo(f"Error: cannot write the output: {os.strerror(error.errno)}", err=True)
        sys.exit(1)
