"""`enrich model`: model directories (inspect, train, calibrate, evaluate) and the versions
in the database (compare two, retire one: docs/rollout.md)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import click

from enrichment.cli.base import FiniteFloat, emit_json, open_db, settings
from enrichment.errors import InvalidValue, OutputError

if TYPE_CHECKING:  # the model commands import their libraries when they run
    from enrichment.model.calibration import ClassThreshold

DATA = click.Path(exists=True, dir_okay=False, path_type=Path)


class RenamedOption(click.Option):
    """An option that still takes its old name (its last one) but shows only the new in --help."""

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        shown, self.opts = self.opts, self.opts[:-1]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = shown


inference_batch_option = click.option(
    "--inference-batch",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Images per forward pass.",
)


@click.group()
def model() -> None:
    """Inspect, train, calibrate and evaluate model directories; compare and retire versions."""


@model.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def info(directory: Path, as_json: bool) -> None:
    """Print a model directory's version, architecture, classes and thresholds (verified)."""
    from enrichment.model.classifier import Classifier

    classifier = Classifier.load(directory)
    spec = classifier.spec
    if as_json:
        emit_json(
            {
                "version": classifier.version,
                "architecture": spec.architecture,
                "input_size": spec.input_size,
                "thresholds_version": spec.thresholds_version,
                "top_k_fallback": spec.top_k_fallback,
                # "labels", as in model.json: scripts written against it keep working.
                "labels": [item.as_json() for item in spec.classes],
            }
        )
        return
    click.echo(
        f"{classifier.version}  {spec.architecture}  input {spec.input_size}px  "
        f"thresholds v{spec.thresholds_version}"
        + (f"  top-{spec.top_k_fallback} fallback" if spec.top_k_fallback else "")
    )
    for item in spec.classes:
        click.echo(f"  {item.key:<20} threshold {item.threshold:<8.5g} {item.concept}")


@model.command()
@click.option("--data", "data_path", type=DATA, required=True, help="Labelled set (.csv/.jsonl).")
@click.option(
    "--out",
    "--output",  # its old name, still taken
    "out",
    cls=RenamedOption,
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="New model directory to write.",
)
@click.option(
    "--vocabulary",
    type=DATA,
    default=None,
    help="{key: concept URI} JSON; default: the shipped 20-class vocabulary.",
)
@click.option("--validation", type=DATA, default=None, help="Validation set; default: a split.")
@click.option(
    "--validation-fraction",
    type=FiniteFloat(0, 0.9, low_open=True),
    default=0.2,
    show_default=True,
)
@click.option("--name", default=None, help="Model name; default: the --out directory's name.")
@click.option("--architecture", default=None, help="torchvision model  [default: resnet50]")
@click.option("--input-size", type=click.IntRange(min=16), default=None, help="[default: 224]")
@click.option("--pretrained", is_flag=True, help="Start from ImageNet weights (downloads once).")
@click.option(
    "--init",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Start from this model directory's weights (and its architecture).",
)
@click.option("--epochs", type=click.IntRange(min=1), default=20, show_default=True)
@click.option(
    "--train-batch",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Images per training step.",
)
@click.option(
    "--lr",
    type=FiniteFloat(0, 10, low_open=True),
    default=1e-3,
    show_default=True,
    help="Learning rate (AdamW, cosine decay): a finite number above 0.",
)
@click.option("--weight-decay", type=FiniteFloat(0, 10), default=1e-4, show_default=True)
@click.option(
    "--patience",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Epochs without a better validation mAP before stopping.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Decoding processes (0: in the training process).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def train(
    data_path: Path,
    out: Path,
    vocabulary: Path | None,
    validation: Path | None,
    validation_fraction: float,
    name: str | None,
    architecture: str | None,
    input_size: int | None,
    pretrained: bool,
    init: Path | None,
    epochs: int,
    train_batch: int,
    lr: float,
    weight_decay: float,
    patience: int,
    seed: int,
    workers: int,
    as_json: bool,
) -> None:
    """Fine-tune a torchvision network on a labelled set and write a model directory.

    Rows name an image (path relative to the file, or URL, fetched with the
    SSRF-safe fetcher) and its label keys; an object/record id column keeps
    each object's images on one side of the validation split. Training stops
    early when validation mAP stops improving, or at Ctrl-C once an epoch is done, and
    keeps the best epoch.
    It ends by choosing each class's threshold on the validation split by best
    F1, so the model is usable at once; `enrich model calibrate` on a separate
    set refines them. --pretrained
    downloads torchvision's ImageNet weights into $TORCH_HOME once; offline,
    place the file there or use --init DIR.
    """
    check_creatable(out)  # before torch is even imported
    from enrichment.media.fetch import Fetcher
    from enrichment.model.labelled import DEFAULT_VOCABULARY, read_labelled, read_vocabulary
    from enrichment.model.training import TrainingOptions
    from enrichment.model.training import train as run_training

    terms = read_vocabulary(vocabulary or DEFAULT_VOCABULARY)
    data = read_labelled(data_path, terms)
    held_out = read_labelled(validation, terms) if validation else None
    options = TrainingOptions(
        name=name or out.resolve().name,
        architecture=architecture,
        input_size=input_size,
        epochs=epochs,
        train_batch=train_batch,
        learning_rate=lr,
        weight_decay=weight_decay,
        patience=patience,
        validation_fraction=validation_fraction,
        seed=seed,
        pretrained=pretrained,
        init=init,
        workers=workers,
        progress=not as_json,
    )
    fetcher = Fetcher(settings())
    try:
        result = run_training(data, terms, options, out, fetcher, held_out)
    finally:
        fetcher.close()
    if as_json:
        emit_json(
            {
                "version": result.version,
                "directory": str(out),
                "best_epoch": result.best_epoch,
                "epochs_run": result.epochs_run,
                "seconds": round(result.seconds, 1),
                "skipped": [item.as_json() for item in result.skipped],
                "validation": result.validation.as_json(),
                "split_fallback": result.split_fallback,
                "interrupted_in_epoch": result.interrupted_in,
                "calibrated": result.calibrated.as_json(),
                "thresholds": {item.key: item.as_json() for item in result.thresholds},
            }
        )
        return
    for item in result.skipped:
        click.echo(f"skipped line {item.line}: {item.reason}: {item.message}", err=True)
    if result.split_fallback:
        click.echo(f"validation: {result.split_fallback}", err=True)
    if result.interrupted_in is not None:
        click.echo(
            f"training stopped by Ctrl-C in epoch {result.interrupted_in}: the best epoch "
            "before it is the model",
            err=True,
        )
    metrics = result.validation
    click.echo(
        f"{result.version} written to {out}: best epoch {result.best_epoch} of "
        f"{result.epochs_run}, validation mAP {metrics.mean_average_precision or 0:.3f}, "
        f"macro F1 {result.calibrated.macro_f1:.3f} at the thresholds chosen on it "
        f"({metrics.macro_f1:.3f} at 0.5) ({result.seconds:.0f} s)"
    )
    echo_thresholds(result.thresholds)


@model.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--data", "data_path", type=DATA, required=True, help="Validation set.")
@click.option(
    "--min-precision",
    "min_precision",
    multiple=True,
    metavar="[KEY=]P",
    help="Most recall at precision >= P instead of best F1; KEY=P for one class. Repeatable.",
)
@click.option(
    "--top-k-fallback",
    type=click.IntRange(min=0),
    default=None,
    help="Label the K best classes when none reaches its threshold (0: off; default: keep).",
)
@inference_batch_option
@click.option("--json", "as_json", is_flag=True, help="Print the thresholds as JSON.")
def calibrate(
    directory: Path,
    data_path: Path,
    min_precision: tuple[str, ...],
    top_k_fallback: int | None,
    inference_batch: int,
    as_json: bool,
) -> None:
    """Choose each class's threshold from a validation set and store it in model.json.

    By default the threshold with the best F1; with --min-precision, the one
    with the most recall whose precision meets the target. A class with fewer
    than 10 positive or 10 negative images in the set keeps its threshold. The
    weights and the model version stay; model.json's thresholds_version goes up
    by one.
    """
    from dataclasses import replace

    from enrichment.media.fetch import Fetcher
    from enrichment.model.calibration import MIN_EXAMPLES, choose_thresholds, write_calibration
    from enrichment.model.classifier import Classifier
    from enrichment.model.evaluation import score_labelled
    from enrichment.model.labelled import read_labelled

    classifier = Classifier.load(directory)
    spec = classifier.spec
    targets = _precision_targets(min_precision, spec.keys)
    data = read_labelled(data_path, {item.key: item.concept for item in spec.classes})
    fetcher = Fetcher(settings())
    try:
        scored = score_labelled(classifier, data, fetcher, inference_batch)
    finally:
        fetcher.close()
    previous = {item.key: item.threshold for item in spec.classes}
    chosen = choose_thresholds(scored, previous, targets, MIN_EXAMPLES)
    if top_k_fallback is not None:
        spec = replace(spec, top_k_fallback=top_k_fallback)
    updated = write_calibration(
        directory, spec, chosen, data.path, len(scored.targets), len(scored.skipped)
    )
    if as_json:
        emit_json(
            {
                "version": classifier.version,
                "thresholds_version": updated.thresholds_version,
                "top_k_fallback": updated.top_k_fallback,
                "calibration": updated.calibration,
            }
        )
        return
    click.echo(
        f"{classifier.version}: thresholds v{updated.thresholds_version} from "
        f"{len(scored.targets)} images ({len(scored.skipped)} skipped)"
    )
    echo_thresholds(chosen)


@model.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--data", "data_path", type=DATA, required=True, help="Test set.")
@inference_batch_option
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def evaluate(directory: Path, data_path: Path, inference_batch: int, as_json: bool) -> None:
    """Per-class precision, recall, F1, support and AP; macro/micro F1 and mAP.

    Labels are decided as the deployed model decides them: its per-class
    thresholds and top-k fallback from model.json.
    """
    from enrichment.media.fetch import Fetcher
    from enrichment.model.classifier import Classifier
    from enrichment.model.evaluation import evaluate as evaluate_model
    from enrichment.model.evaluation import score_labelled
    from enrichment.model.labelled import read_labelled

    classifier = Classifier.load(directory)
    spec = classifier.spec
    data = read_labelled(data_path, {item.key: item.concept for item in spec.classes})
    fetcher = Fetcher(settings())
    try:
        scored = score_labelled(classifier, data, fetcher, inference_batch)
    finally:
        fetcher.close()
    metrics = evaluate_model(classifier, scored)
    if as_json:
        emit_json(
            {
                "version": classifier.version,
                "thresholds_version": spec.thresholds_version,
                "data": str(data.path),
                "images": len(scored.targets),
                "skipped": [item.as_json() for item in scored.skipped],
                **metrics.as_json(),
            }
        )
        return
    click.echo(
        f"{classifier.version}, thresholds v{spec.thresholds_version}, on {data.path.name}: "
        f"{len(scored.targets)} images ({len(scored.skipped)} skipped)"
    )
    header = ("class", "support", "threshold", "precision", "recall", "f1", "AP")
    click.echo(f"  {header[0]:<20}" + "".join(f"{name:>10}" for name in header[1:]))
    for item in metrics.classes:
        ap = "-" if item.average_precision is None else f"{item.average_precision:.3f}"
        click.echo(
            f"  {item.key:<20}{item.support:>10}{item.threshold:>10.5g}{item.precision:>10.3f}"
            f"{item.recall:>10.3f}{item.f1:>10.3f}{ap:>10}"
        )
    mean_ap = metrics.mean_average_precision
    click.echo(
        f"  macro F1 {metrics.macro_f1:.3f}  micro F1 {metrics.micro_f1:.3f}  "
        f"mAP {'-' if mean_ap is None else f'{mean_ap:.3f}'}"
    )


@model.command()
@click.argument("version_a", metavar="A")
@click.argument("version_b", metavar="B")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the comparison as a self-contained HTML page here.",
)
@click.option(
    "--disagreements",
    "list_disagreements",
    is_flag=True,
    help="Instead, list each label only one of them gives (record, class, version giving it), "
    "to hand to curators; the review app shows the same items at /?disagree=A,B.",
)
def compare(
    version_a: str, version_b: str, as_json: bool, html_path: Path | None, list_disagreements: bool
) -> None:
    """Compare model version B with A on the records both classified.

    Per class: labels B adds, removes and keeps, the mean score shift, and
    each version's precision on curator-reviewed labels with a 95% Wilson
    interval (none under 10 reviewed labels: "too few reviews"). A class only
    one version has is marked "(A only)" or "(B only)". A retired version
    (enrich model retire) is refused: its results are gone.
    """
    db = open_db()
    if list_disagreements:
        from enrichment.model.compare import checked_versions
        from enrichment.store.comparison import disagreements

        checked_versions(db, version_a, version_b)
        for item in disagreements(db, version_a, version_b):
            if as_json:
                click.echo(json.dumps(item._asdict()))
            else:
                click.echo(f"{item.record_id}\t{item.label_key}\t{item.labelled_by}")
        return
    from enrichment.model.compare import compare as compare_versions

    comparison = compare_versions(db, version_a, version_b)
    if html_path is not None:
        from enrichment.report.compare import write_comparison

        write_comparison(comparison, html_path)
    if as_json:
        emit_json(comparison.as_json())
        return
    click.echo(f"{version_b} against {version_a}: {comparison.records} records classified by both")
    click.echo(
        f"  {'class':<20}{'added':>8}{'removed':>8}{'kept':>8}{'shift':>8}"
        f"  {'precision A':<30}precision B"
    )
    for item in comparison.classes:
        shift = "-" if item.score_shift is None else f"{item.score_shift:+.3f}"
        # A class one version lacks: its labels are all added or all removed, and no shift.
        only = " (B only)" if not item.in_a else " (A only)" if not item.in_b else ""
        click.echo(
            f"  {item.key + only:<20}{item.added:>8}{item.removed:>8}{item.kept:>8}{shift:>8}"
            f"  {item.precision_a.describe():<30}{item.precision_b.describe()}"
        )
    if html_path is not None:
        click.echo(f"written to {html_path}")


@model.command()
@click.argument("version")
@click.option(
    "--chunk",
    type=click.IntRange(100, 100_000),
    default=5000,
    show_default=True,
    help="Records whose rows go per transaction.",
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def retire(version: str, chunk: int, yes: bool) -> None:
    """Remove a model version's results and labels; keep its reviews and its row, marked retired.

    Refused while the version has live annotations in the publication ledger
    (withdraw them first: enrich publish --withdraw --model-version VERSION)
    or unfinished runs. Rows go in transactions of --chunk records; if
    interrupted, run it again to go on. Runs and exports refuse a retired version.
    """
    from tqdm import tqdm

    from enrichment.store.retire import check_retirable, mark_retired, remove_some

    db = open_db()
    if not yes:
        results = check_retirable(db, version)
        click.confirm(
            f"Remove the {results} results of {version} and their labels (its reviews stay)?",
            abort=True,
        )
    retirement = mark_retired(db, version)
    with tqdm(
        total=retirement.remaining,
        desc=f"retiring {version}",
        unit=" results",
        disable=None,  # on a terminal only
    ) as bar:
        while removed := remove_some(db, version, chunk):
            bar.update(removed)
    click.echo(
        f"{version} retired: {retirement.remaining} results and their labels removed; "
        "its reviews are kept"
    )


def _precision_targets(values: tuple[str, ...], keys: list[str]) -> dict[str, float] | None:
    """`0.9` for every class and/or `map=0.95` for one; None when no option was given."""
    if not values:
        return None
    default: float | None = None
    per_class: dict[str, float] = {}
    for value in values:
        key, _, number = value.rpartition("=")
        try:
            target = float(number)
        except ValueError:
            raise InvalidValue("min_precision", f"{value!r}: expected P or KEY=P") from None
        if not 0.0 < target <= 1.0:
            raise InvalidValue("min_precision", f"{value!r}: P must be in (0, 1]")
        if not key:
            default = target
        elif key not in keys:
            raise InvalidValue("min_precision", f"{value!r}: the model has no class {key!r}")
        else:
            per_class[key] = target
    return {
        key: per_class.get(key, default) for key in keys if key in per_class or default is not None
    }


def check_creatable(directory: Path) -> None:
    """Fail before training, not after it, if the model directory cannot be made.

    Tried for real (a temporary directory made and removed where the first
    missing part would go), since permission bits say nothing under /proc or
    for root; nothing is left behind.
    """
    existing = directory.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot create {directory}: {existing} is not a directory")
    try:
        tempfile.TemporaryDirectory(dir=existing, prefix=".enrich-probe-").cleanup()
    except OSError as error:
        raise OutputError(f"cannot create {directory}: {error.strerror or error}") from None


def echo_thresholds(chosen: list[ClassThreshold]) -> None:
    """The table `train` and `calibrate` end with: each class's threshold and what it gives."""
    click.echo(f"  {'class':<20} {'threshold':>9} {'precision':>9} {'recall':>6} {'f1':>6}")
    for item in chosen:
        note = ""
        if item.kept is not None:
            note = f"  kept: {item.kept}"
        elif item.target_met is False:
            note = f"  precision {item.min_precision} not reachable: most precise threshold"
        click.echo(
            f"  {item.key:<20} {item.threshold:>9.5g} {item.precision:>9.3f} "
            f"{item.recall:>6.3f} {item.f1:>6.3f}{note}"
        )
