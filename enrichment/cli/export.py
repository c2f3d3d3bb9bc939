"""`enrich export`: labels as W3C Web Annotations in JSON-LD."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from enrichment.cli.base import open_db


@click.command()
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
