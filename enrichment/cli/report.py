"""`enrich explain` and `enrich report`: what curators look at before labels enter a catalogue."""

from __future__ import annotations

from pathlib import Path

import click

from enrichment.cli.base import (
    chosen_run,
    emit_json,
    model_dir_option,
    open_db,
    run_option,
    settings,
)
from enrichment.errors import EnrichError

# What names an image file rather than a record (ids may hold dots, not such endings).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".tif", ".tiff", ".webp", ".bmp"})


@click.command()
@click.argument("target")
@model_dir_option
@click.option(
    "--class",
    "--label",
    "label_keys",
    multiple=True,
    metavar="KEY",
    help="Explain this class (repeatable; default: the labels the image gets).",
)
@click.option(
    "--layer",
    metavar="NAME",
    help="The convolutional layer to explain, e.g. layer4 or features.7 "
    "(default: the last stage of the architecture's family).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("explanations"),
    show_default=True,
    help="Directory for the PNG overlays.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the labels and files as JSON.")
def explain(
    target: str,
    model_dir: Path | None,
    label_keys: tuple[str, ...],
    layer: str | None,
    out_dir: Path,
    as_json: bool,
) -> None:
    """Draw Grad-CAM heatmaps of what drove each label, for one image.

    TARGET is an http(s) URL (fetched with the same safeguards as a run), a
    local image file, or the id of a record in the database (its image URL is
    fetched). One PNG per label is written to --out, with the label and its
    confidence drawn in. Runs on the CPU when there is no GPU.
    """
    from enrichment.model import explain as explaining
    from enrichment.model.classifier import Classifier
    from enrichment.thresholds import confidence_text

    config = settings()
    model = model_dir or config.require_model_dir()
    # The image first: a mistyped path is said before minutes of loading a model.
    if "://" in target:
        source = explaining.from_url(target, config)
    elif Path(target).is_file():
        source = explaining.from_file(Path(target))
    else:
        # A name with an image's ending is most likely a mistyped file (a record id may end
        # so too: it is looked up all the same).
        missing_file = f"no such file: {target}"
        a_file = Path(target).suffix.lower() in IMAGE_SUFFIXES
        try:
            db = open_db()
        except EnrichError as error:
            raise EnrichError(
                missing_file if a_file else f"{target} is no file and no URL; as a record: {error}"
            ) from None
        try:
            source = explaining.from_record(db, target, config)
        except explaining.NoSuchRecord:
            if a_file:
                raise EnrichError(missing_file) from None
            raise
    classifier = Classifier.load(model)
    explanations = explaining.explain(
        classifier, source.data, label_keys, layer, config.max_image_pixels
    )
    paths = explaining.write_overlays(source, explanations, out_dir, config.max_image_pixels)
    if as_json:
        emit_json(
            [
                {
                    "label": item.key,
                    "confidence": round(item.confidence, 6),
                    "threshold": item.threshold,
                    "path": str(path),
                }
                for item, path in zip(explanations, paths, strict=True)
            ]
        )
        return
    for item, path in zip(explanations, paths, strict=True):
        click.echo(f"{item.key}\t{confidence_text(item.confidence)}\t{path}")


@click.command()
@run_option(required=False)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Directory for the page; it is written as run-RUN_ID.html.",
)
@click.option(
    "--per-class",
    type=click.IntRange(1, 50),
    default=4,
    show_default=True,
    help="Gallery size: this many of the most and of the least confident labels per class.",
)
def report(run_id: int | None, run_alias: int | None, out_dir: Path, per_class: int) -> None:
    """Write a self-contained HTML report of a run (default: the latest) from its stored results.

    Summary, labels per class, confidence histograms with the thresholds,
    error reasons, and thumbnails of the labels to check. The page loads
    nothing from the network: charts and thumbnails are inline.
    """
    from enrichment.report.report import write_report

    chosen = chosen_run(run_id, run_alias, required=False)
    path = write_report(open_db(), chosen, out_dir, settings(), per_class)
    click.echo(str(path))
