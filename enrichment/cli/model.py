"""`enrich model`: inspecting model directories."""

from __future__ import annotations

from pathlib import Path

import click

from enrichment.cli.base import emit_json


@click.group()
def model() -> None:
    """Inspect model directories."""


@model.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def info(directory: Path, as_json: bool) -> None:
    """Print a model directory's version, architecture, labels and thresholds (verified)."""
    from enrichment.model import Classifier

    classifier = Classifier.load(directory)
    spec = classifier.spec
    if as_json:
        emit_json(
            {
                "version": classifier.version,
                "architecture": spec.architecture,
                "input_size": spec.input_size,
                "labels": [label.as_json() for label in spec.labels],
            }
        )
        return
    click.echo(f"{classifier.version}  {spec.architecture}  input {spec.input_size}px")
    for label in spec.labels:
        click.echo(f"  {label.key:<20} threshold {label.threshold:.3f}  {label.concept}")
