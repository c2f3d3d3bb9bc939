"""Train, calibrate and evaluate through the real CLI, on a synthetic multilabel image set.

Two independent labels a small CNN must learn from pixels: `red_background`
(against green, blue, grey, yellow and orange grounds) and `circle` (against a
bar or no shape). Each object is photographed twice, so the object column
matters for the validation split. The model is trained once per module.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageDraw
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    precision_recall_curve,
    precision_recall_fscore_support,
)

from enrichment.cli import cli
from enrichment.config import Settings
from enrichment.errors import EnrichError, InvalidValue, ModelError
from enrichment.media.decode import decode
from enrichment.media.fetch import Fetcher
from enrichment.model.classifier import Classifier, head_parameter_names
from enrichment.model.labelled import read_labelled
from enrichment.model.spec import read_model_json
from enrichment.model.split import joined_by_image, split_by_group, split_groups_or_rows
from enrichment.model.training import (
    Augmentation,
    InferenceView,
    TrainingOptions,
    starting_point,
    train,
)
from tests.conftest import REPO, enrich, enrich_here, pseudo_terminal, read_terminal

KEYS = ["red_background", "circle"]
VOCABULARY = {
    "red_background": "http://example.org/concept/red-background",
    "circle": "http://example.org/concept/circle",
}
RED = (200, 40, 40)
OTHER_GROUNDS = [(40, 160, 60), (50, 70, 190), (128, 128, 128), (210, 190, 60), (225, 125, 45)]
STATED_MACRO_F1 = 0.85  # on held-out images, at the thresholds training chose
STATED_MAP = 0.9
TRAIN_ARGS = ("--architecture", "resnet18", "--input-size", "32", "--epochs", "8")
TRAIN_ARGS += ("--patience", "3", "--lr", "0.003", "--seed", "0", "--workers", "0")


def picture(rng: np.random.Generator, red: bool, circle: bool) -> Image.Image:
    ground = RED if red else OTHER_GROUNDS[rng.integers(len(OTHER_GROUNDS))]
    colour = tuple(int(np.clip(c + rng.integers(-30, 31), 0, 255)) for c in ground)
    image = Image.new("RGB", (40, 32), colour)
    draw = ImageDraw.Draw(image)
    ink = (255, 255, 255) if rng.random() < 0.5 else (0, 0, 0)
    r = int(rng.integers(6, 11))
    x, y = int(rng.integers(r, 40 - r)), int(rng.integers(r, 32 - r))
    if circle:
        draw.ellipse((x - r, y - r, x + r, y + r), fill=ink)
    elif rng.random() < 0.5:
        draw.rectangle((4, y - 2, 36, y + 2), fill=ink)
    return image


def write_set(directory: Path, name: str, objects: int, seed: int) -> Path:
    """`objects` objects with two PNG views each, listed in `name`.csv."""
    rng = np.random.default_rng(seed)
    (directory / name).mkdir(parents=True)
    rows = []
    for number in range(objects):
        red, circle = bool(rng.random() < 0.4), bool(rng.random() < 0.3)
        labels = " ".join(key for key, on in zip(KEYS, (red, circle), strict=True) if on)
        for view in range(2):
            path = f"{name}/{number:03d}_{view}.png"
            picture(rng, red, circle).save(directory / path)
            rows.append({"object_id": f"{name}-{number}", "image": path, "labels": labels})
    target = directory / f"{name}.csv"
    with target.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["object_id", "image", "labels"])
        writer.writeheader()
        writer.writerows(rows)
    return target


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("synthetic")
    write_set(directory, "train", 130, seed=1)
    write_set(directory, "validation", 60, seed=2)
    write_set(directory, "test", 60, seed=3)
    (directory / "vocabulary.json").write_text(json.dumps(VOCABULARY))
    return directory


@pytest.fixture(scope="module")
def trained(synthetic: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The model, trained once through `enrich model train`, and its --json report."""
    output = tmp_path_factory.mktemp("trained") / "shapes"
    started = time.monotonic()
    result = enrich(
        "model", "train",
        "--data", str(synthetic / "train.csv"),
        "--vocabulary", str(synthetic / "vocabulary.json"),
        "--out", str(output),
        *TRAIN_ARGS,
        "--json",
        env={},
        timeout=300,  # the time budget; training takes 6-15 s on 2 idle CPU cores
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    report["wall_seconds"] = time.monotonic() - started
    return output, report


@pytest.fixture(scope="module")
def calibrated(trained: tuple[Path, dict], synthetic: Path, tmp_path_factory) -> tuple[Path, dict]:
    """A copy of the trained model, calibrated through `enrich model calibrate`."""
    directory = Path(shutil.copytree(trained[0], tmp_path_factory.mktemp("calibrated") / "m"))
    result = enrich(
        "model", "calibrate", str(directory),
        "--data", str(synthetic / "validation.csv"),
        "--json",
        env={},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return directory, json.loads(result.stdout)


def reference_scores(directory: Path, data: Path) -> tuple[np.ndarray, np.ndarray]:
    """Truth and scores computed without the evaluation module: decode, score, compare."""
    classifier = Classifier.load(directory)
    with data.open() as handle:
        rows = list(csv.DictReader(handle))
    inputs = np.stack(
        [decode((data.parent / row["image"]).read_bytes(), classifier.spec.preprocessing)
         for row in rows]
    )  # fmt: skip
    truth = np.array([[key in row["labels"].split() for key in KEYS] for row in rows])
    return truth, classifier.scores(inputs)


def test_training_learns_the_labels(trained: tuple[Path, dict], synthetic: Path) -> None:
    directory, report = trained
    spec, version, _ = read_model_json(directory)
    assert report["version"] == version == Classifier.load(directory).version
    assert spec.architecture == "resnet18" and spec.input_size == 32
    assert spec.keys == KEYS
    assert [item.concept for item in spec.classes] == list(VOCABULARY.values())
    # Training ends by choosing each threshold on its validation split, by best F1.
    assert spec.thresholds_version == 1
    assert spec.calibration["data"].startswith("the validation split of training (20% of")
    assert spec.calibration["images"] == 52
    for item in spec.classes:
        stored = spec.calibration["classes"][item.key]
        assert stored["method"] == "max_f1" and stored["previous"] == 0.5
        assert stored["threshold"] == item.threshold
        assert type(item.threshold) is float
    assert spec.metrics["validation"]["thresholds"] == "calibrated"
    assert spec.metrics["validation_at_0.5"]["mAP"] == spec.metrics["validation"]["mAP"]
    assert spec.metrics["validation"]["macro_f1"] >= spec.metrics["validation_at_0.5"]["macro_f1"]
    assert spec.training["loss"] == "BCEWithLogitsLoss"
    assert set(spec.training["pos_weight"]) == set(KEYS)
    assert spec.training["pos_weight"]["circle"] > 1.0  # the rarer label weighs more
    assert spec.metrics["validation"]["mAP"] == report["validation"]["mAP"]

    truth, scores = reference_scores(directory, synthetic / "test.csv")
    thresholds = np.array(spec.thresholds)  # float64, as `decide` compares
    macro_f1 = f1_score(truth, scores >= thresholds, average="macro")
    at_half = f1_score(truth, scores >= 0.5, average="macro")
    mean_ap = average_precision_score(truth, scores, average="macro")
    print(
        f"\ntrained in {report['seconds']} s ({report['wall_seconds']:.1f} s wall, "
        f"{report['epochs_run']} epochs, best {report['best_epoch']}); held-out macro-F1 "
        f"{macro_f1:.3f} at the trained thresholds ({at_half:.3f} at 0.5), mAP {mean_ap:.3f}"
    )
    assert macro_f1 >= STATED_MACRO_F1
    assert mean_ap >= STATED_MAP


def test_validation_split_keeps_each_objects_views_together(trained: tuple[Path, dict]) -> None:
    training = read_model_json(trained[0])[0].training
    assert training["images"] == {"train": 208, "validation": 52, "skipped": 0}
    assert "by object_id" in training["validation"]
    groups = [f"o{i // 3}" for i in range(30)] + ["lonely"]
    train_rows, val_rows = split_by_group(groups, 0.25, seed=7)
    assert sorted(train_rows + val_rows) == list(range(31))
    assert {groups[i] for i in train_rows}.isdisjoint(groups[i] for i in val_rows)
    assert 8 <= len(val_rows) <= 10
    assert split_by_group(groups, 0.25, seed=7) == (train_rows, val_rows)
    with pytest.raises(EnrichError, match="single object"):
        split_by_group(["same"] * 5, 0.2, seed=0)


def test_too_few_groups_fall_back_to_a_split_by_image_and_say_so() -> None:
    kept = split_groups_or_rows([f"o{i // 3}" for i in range(30)], 0.2, seed=0)
    assert kept.fallback is None and 3 <= len(kept.validation) <= 12
    one = split_groups_or_rows(["2048128"] * 10, 0.2, seed=0)
    assert len(one.validation) == 2 and sorted(one.train + one.validation) == list(range(10))
    assert one.fallback is not None and one.fallback.startswith("1 group cannot give")
    # Two groups, one holding nearly everything: a whole group would be 5 % or 95 %.
    skewed = split_groups_or_rows(["big"] * 19 + ["small"], 0.2, seed=0)
    assert skewed.fallback is not None and "2 groups" in skewed.fallback
    assert len(skewed.validation) == 4
    with pytest.raises(EnrichError, match="single image"):
        split_groups_or_rows(["only"], 0.2, seed=0)


def test_an_image_is_never_on_both_sides_of_the_split() -> None:
    """Records sharing an image (Europeana's often do; a review export groups by record):
    8 of 10 validation images were in training too, where a record's copy went."""
    groups = [f"/d/r{i}" for i in range(24)] + [f"/d/copy{i}" for i in range(24)]
    images = [f"img{i}.png" for i in range(24)] * 2
    for seed in range(5):
        split = split_groups_or_rows(groups, 0.2, seed, images)
        trained_on = {images[i] for i in split.train}
        assert not trained_on & {images[i] for i in split.validation}
        assert sorted(split.train + split.validation) == list(range(48))
    # Split by image (one group): each image's rows on one side all the same.
    one = split_groups_or_rows(["2048128"] * 20, 0.2, 0, [f"i{n % 10}" for n in range(20)])
    assert one.fallback is not None
    assert not {n % 10 for n in one.train} & {n % 10 for n in one.validation}
    # Groups joined through a chain of shared images are one.
    assert joined_by_image(["a", "b", "c", "d"], ["x", "x", "y", "y"]) == ["a", "a", "c", "c"]
    assert joined_by_image(["a", "b", "b"], ["x", "y", "x"]) == ["a", "a", "a"]


def test_early_stopping_keeps_the_best_epoch(trained: tuple[Path, dict]) -> None:
    training = read_model_json(trained[0])[0].training
    history = training["history"]
    assert len(history) == training["epochs_run"] <= 8
    best = max(history, key=lambda row: (row["val_mAP"], -row["val_loss"]))
    assert training["best_epoch"] == best["epoch"]


def test_ctrl_c_in_training_keeps_the_best_epoch_so_far(synthetic: Path, tmp_path: Path) -> None:
    """An operator stops a long training with Ctrl-C (the terminal's SIGINT): the epochs
    done are not lost, the best of them is the model, and the output says so."""
    output = tmp_path / "stopped"
    controller, terminal = pseudo_terminal()
    process = subprocess.Popen(
        [
            sys.executable, "-m", "enrichment", "model", "train",
            "--data", str(synthetic / "train.csv"),
            "--vocabulary", str(synthetic / "vocabulary.json"),
            "--out", str(output),
            *TRAIN_ARGS, "--epochs", "500", "--patience", "500",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=terminal,
        text=True,
    )  # fmt: skip
    os.close(terminal)
    try:
        read_terminal(controller, until=b"epoch 3/500")  # two epochs done
        process.send_signal(signal.SIGINT)
        stdout, _ = process.communicate(timeout=120)
        shown = read_terminal(controller).decode()
    finally:
        process.kill()
        os.close(controller)
    assert process.returncode == 0, shown
    training = read_model_json(output)[0].training
    stopped = training["interrupted_in_epoch"]
    assert stopped >= 3 and training["epochs_run"] == stopped - 1 == len(training["history"])
    assert 1 <= training["best_epoch"] < stopped
    assert f"training stopped by Ctrl-C in epoch {stopped}" in shown
    assert "written to" in stdout and "Traceback" not in shown


def test_training_and_inference_see_the_same_input(synthetic: Path, trained) -> None:
    spec = read_model_json(trained[0])[0]
    data = (synthetic / "test" / "000_0.png").read_bytes()
    torch.manual_seed(0)
    augmented = Augmentation(spec.preprocessing)(data)
    plain = InferenceView(spec.preprocessing)(data)
    assert augmented.shape == plain.shape == (3, 32, 32)
    assert torch.equal(plain, torch.from_numpy(decode(data, spec.preprocessing)))
    # Same normalisation: mild augmentation keeps the mean colour close.
    assert torch.allclose(augmented.mean(dim=(1, 2)), plain.mean(dim=(1, 2)), atol=0.6)


def test_calibration_raises_or_keeps_each_class_f1(calibrated, trained, synthetic) -> None:
    directory, report = calibrated
    spec, version, _ = read_model_json(directory)
    assert version == read_model_json(trained[0])[1]  # same weights, same version
    assert report["thresholds_version"] == spec.thresholds_version == 2
    assert Classifier.load(directory).version == version  # hash check still passes

    truth, scores = reference_scores(directory, synthetic / "validation.csv")
    thresholds = np.array(spec.thresholds)  # float64, as `decide` compares
    before = f1_score(truth, scores >= 0.5, average=None)
    after = f1_score(truth, scores >= thresholds, average=None)
    print("\ncalibration F1 on validation (0.5 -> calibrated):")
    for key, old, new, threshold in zip(KEYS, before, after, thresholds, strict=True):
        print(f"  {key:<15} {old:.3f} -> {new:.3f} at threshold {threshold:.4f}")
    assert np.all(after >= before)
    for column, key in enumerate(KEYS):
        stored = report["calibration"]["classes"][key]
        p, r, f, _ = precision_recall_fscore_support(
            truth[:, column], scores[:, column] >= thresholds[column], average="binary"
        )
        assert stored["threshold"] == pytest.approx(float(thresholds[column]))
        assert (stored["precision"], stored["recall"], stored["f1"]) == pytest.approx((p, r, f))
        assert stored["support"] == truth[:, column].sum()
        assert stored["previous"] == read_model_json(trained[0])[0].classes[column].threshold
        # No other threshold does better on the validation set.
        precision, recall, _ = precision_recall_curve(truth[:, column], scores[:, column])
        best = np.max(np.nan_to_num(2 * precision * recall / (precision + recall)))
        assert f == pytest.approx(best)


def test_min_precision_calibration(trained, synthetic: Path, tmp_path: Path) -> None:
    directory = Path(shutil.copytree(trained[0], tmp_path / "m"))
    result = enrich_here(
        "model", "calibrate", str(directory),
        "--data", str(synthetic / "validation.csv"),
        "--min-precision", "0.9", "--min-precision", "circle=0.99",
        env={},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "thresholds v2" in result.stdout
    spec = read_model_json(directory)[0]
    truth, scores = reference_scores(directory, synthetic / "validation.csv")
    for column, (key, target) in enumerate(zip(KEYS, (0.9, 0.99), strict=True)):
        stored = spec.calibration["classes"][key]
        assert stored["method"] == "min_precision" and stored["min_precision"] == target
        predicted = scores[:, column] >= spec.classes[column].threshold
        p, r, _, _ = precision_recall_fscore_support(truth[:, column], predicted, average="binary")
        precision, recall, _ = precision_recall_curve(truth[:, column], scores[:, column])
        reachable = recall[precision >= target]
        assert stored["target_met"] == bool(reachable.size)
        if reachable.size:
            assert p >= target and r == pytest.approx(reachable.max())


def test_evaluate_table_and_json_match_sklearn(calibrated, synthetic: Path) -> None:
    directory, _ = calibrated
    as_json = enrich_here(
        "model", "evaluate", str(directory), "--data", str(synthetic / "test.csv"), "--json",
        env={},
    )  # fmt: skip
    table = enrich_here(
        "model", "evaluate", str(directory), "--data", str(synthetic / "test.csv"), env={}
    )
    assert as_json.returncode == 0 and table.returncode == 0, as_json.stderr + table.stderr
    report = json.loads(as_json.stdout)
    spec, version, _ = read_model_json(directory)
    assert report["version"] == version and report["thresholds_version"] == 2
    assert report["images"] == 120 and report["skipped"] == []

    truth, scores = reference_scores(directory, synthetic / "test.csv")
    thresholds = np.array(spec.thresholds)  # float64, as `decide` compares
    predicted = scores >= thresholds
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, predicted, average=None, zero_division=0
    )
    ap = average_precision_score(truth, scores, average=None)
    lines = table.stdout.splitlines()
    for column, item in enumerate(report["classes"]):
        assert item["key"] == KEYS[column]
        assert item["support"] == support[column]
        assert item["precision"] == pytest.approx(precision[column])
        assert item["recall"] == pytest.approx(recall[column])
        assert item["f1"] == pytest.approx(f1[column])
        assert item["average_precision"] == pytest.approx(ap[column])
        row = next(line.split() for line in lines if line.split()[:1] == [item["key"]])
        assert row[1:] == [
            str(item["support"]),
            f"{item['threshold']:.5g}",
            *(f"{item[name]:.3f}" for name in ("precision", "recall", "f1", "average_precision")),
        ]
    assert report["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro"))
    assert report["micro_f1"] == pytest.approx(f1_score(truth, predicted, average="micro"))
    assert report["mAP"] == pytest.approx(average_precision_score(truth, scores, average="macro"))
    assert f"macro F1 {report['macro_f1']:.3f}  micro F1 {report['micro_f1']:.3f}" in lines[-1]

    # One by hand: circle's precision and recall from counted outcomes.
    column = KEYS.index("circle")
    tp = fp = fn = 0
    for is_circle, score in zip(truth[:, column], scores[:, column], strict=True):
        said_circle = score >= thresholds[column]
        tp += bool(is_circle and said_circle)
        fp += bool(not is_circle and said_circle)
        fn += bool(is_circle and not said_circle)
    circle = report["classes"][column]
    assert circle["precision"] == pytest.approx(tp / (tp + fp))
    assert circle["recall"] == pytest.approx(tp / (tp + fn))
    assert circle["support"] == tp + fn


def test_info_shows_the_calibrated_thresholds(calibrated) -> None:
    directory, _ = calibrated
    result = enrich_here("model", "info", str(directory), "--json", env={})
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    spec = read_model_json(directory)[0]
    assert info["thresholds_version"] == 2 and info["top_k_fallback"] == 0
    assert [item["threshold"] for item in info["labels"]] == spec.thresholds


def test_init_carries_the_body_and_keeps_the_head_only_for_the_same_labels(trained) -> None:
    directory = trained[0]
    source = Classifier.load(directory, torch.device("cpu")).network.state_dict()
    same = starting_point(TrainingOptions(name="again", init=directory), KEYS)
    assert same.architecture == "resnet18" and same.input_size == 32
    assert same.description.startswith("model shapes@")
    assert all(torch.equal(t, source[n]) for n, t in same.network.state_dict().items())

    other = starting_point(TrainingOptions(name="other", init=directory), ["circle"])
    head = head_parameter_names("resnet18")
    state = other.network.state_dict()
    assert head == {"fc.weight", "fc.bias"} and state["fc.weight"].shape == (1, 512)
    assert all(torch.equal(t, source[n]) for n, t in state.items() if n not in head)
    with pytest.raises(InvalidValue, match="is a resnet18, not a mobilenet_v3_small") as raised:
        starting_point(
            TrainingOptions(name="x", init=directory, architecture="mobilenet_v3_small"), KEYS
        )
    assert raised.value.field == "init"
    with pytest.raises(InvalidValue, match="not from both") as raised:
        starting_point(TrainingOptions(name="x", init=directory, pretrained=True), KEYS)
    assert raised.value.field == "init"


def test_init_training_through_the_cli(trained, synthetic: Path, tmp_path: Path) -> None:
    result = enrich_here(
        "model", "train",
        "--data", str(synthetic / "train.csv"),
        "--vocabulary", str(synthetic / "vocabulary.json"),
        "--out", str(tmp_path / "tuned"),
        "--init", str(trained[0]), "--epochs", "1", "--workers", "0",
        env={},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "best epoch 1 of 1" in result.stdout
    spec = read_model_json(tmp_path / "tuned")[0]
    assert spec.training["start"] == f"model {read_model_json(trained[0])[1]}"
    assert spec.input_size == 32 and spec.architecture == "resnet18"
    data = read_labelled(synthetic / "train.csv", VOCABULARY)
    fetcher = Fetcher(Settings())
    try:
        with pytest.raises(InvalidValue, match="holds a model; choose a new directory") as raised:
            train(data, VOCABULARY, TrainingOptions(name="again"), tmp_path / "tuned", fetcher)
    finally:
        fetcher.close()
    assert raised.value.field == "out" and str(tmp_path / "tuned") in str(raised.value)


def test_a_training_that_diverges_says_so_before_writing_anything() -> None:
    """A learning rate far too high: the loss became NaN, the thresholds were calibrated on
    NaN scores, and only model.json's check said "threshold: nan is not a finite number",
    after the weights were written into the new directory. The epoch says so at once now.
    (Inputs holding NaN make the loss NaN for certain, as divergence does at its end.)"""
    from torch.utils.data import DataLoader, TensorDataset

    from enrichment.model.training import _fit

    network = torch.nn.Linear(4, 2)
    inputs = torch.full((8, 4), float("nan"))
    targets = torch.zeros((8, 2))
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=4)
    options = TrainingOptions(name="diverged", epochs=3, learning_rate=10.0, progress=False)
    with pytest.raises(ModelError, match=r"training diverged: the loss became nan in epoch 1; "
                       r"try a lower --lr than 10 \(nothing was written\)"):  # fmt: skip
        _fit(network, loader, loader, np.zeros((8, 2)), ["a", "b"], np.ones(2, np.float32),
             options, torch.device("cpu"))  # fmt: skip


def test_out_is_the_option_and_output_its_hidden_old_name() -> None:
    shown = CliRunner().invoke(cli, ["model", "train", "--help"], env={})
    assert shown.exit_code == 0 and "--out DIRECTORY" in shown.output
    assert "--output" not in shown.output
    (option,) = [p for p in cli.commands["model"].commands["train"].params if p.name == "out"]
    assert option.opts == ["--out", "--output"]


def test_pretrained_without_network_is_a_clear_error(monkeypatch, tmp_path: Path) -> None:
    """No download in tests: the download itself is replaced by a network failure."""
    from urllib.error import URLError

    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    options = TrainingOptions(name="x", architecture="resnet18", pretrained=True)
    with pytest.raises(ModelError) as raised:
        starting_point(options, KEYS)
    message = str(raised.value)
    assert message.startswith("starting from ImageNet needs the weights ")
    assert "resnet18-f37072fd.pth" in message and str(tmp_path) in message
    assert "Temporary failure in name resolution" in message
    assert "or start from scratch or from a model directory" in message and "--" not in message


def test_unknown_label_in_the_data_is_a_one_line_error(synthetic: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("image,labels\ntrain/000_0.png,red_backgrund\n")
    shutil.copytree(synthetic / "train", tmp_path / "train")
    result = enrich_here(
        "model", "train", "--data", str(bad), "--vocabulary", str(synthetic / "vocabulary.json"),
        "--output", str(tmp_path / "out"),  # the old name of --out, still taken
        env={},
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"Error: {bad}:2: unknown label 'red_backgrund' (known: red_background, circle)"
    )


def test_scoring_fetches_urls_through_the_guarded_fetcher(trained, image_host, synthetic) -> None:
    from enrichment.model.evaluation import score_labelled

    directory = trained[0]
    url = image_host.add("/train/red.png", (synthetic / "train" / "000_0.png").read_bytes())
    rows = [
        {"image": url, "labels": []},
        {"image": image_host.url("/gone.png"), "labels": ["circle"]},
        {"image": "test/000_0.png", "labels": []},
    ]
    data = synthetic / "mixed.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    classifier = Classifier.load(directory)
    labelled = read_labelled(data, VOCABULARY)
    allowed = Fetcher(Settings(fetch_allow=("127.0.0.1",)))
    guarded = Fetcher(Settings())
    try:
        scored = score_labelled(classifier, labelled, allowed, inference_batch=2)
        with pytest.raises(EnrichError, match="blocked_address"):
            score_labelled(classifier, labelled.select([0, 1]), guarded, inference_batch=2)
    finally:
        allowed.close()
        guarded.close()
    assert len(scored.scores) == 2
    assert [(item.line, item.reason) for item in scored.skipped] == [(2, "http_404")]
    assert "/train/red.png" in image_host.requests
