"""Metric definitions against scikit-learn and by hand; threshold choice against brute force."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    precision_recall_fscore_support,
)

from enrichment.cli.model import _precision_targets
from enrichment.errors import EnrichError, InvalidValue, ModelError
from enrichment.model.calibration import (
    MIN_EXAMPLES,
    calibrated_spec,
    choose_threshold,
    choose_thresholds,
    write_calibration,
)
from enrichment.model.classifier import Classifier
from enrichment.model.evaluation import ScoredSet, average_precision, compute_metrics
from enrichment.model.spec import read_model_json, update_model_json
from enrichment.thresholds import decide


def random_case(seed: int, images: int = 200, classes: int = 5):
    rng = np.random.default_rng(seed)
    truth = rng.random((images, classes)) < rng.uniform(0.05, 0.5, classes)
    noise = rng.normal(0, 1.0, (images, classes))
    scores = (1 / (1 + np.exp(-(2.5 * truth - 1.2 + noise)))).astype(np.float32)
    scores[:20] = np.round(scores[:20], 1)  # ties, as saturated sigmoids produce
    thresholds = rng.uniform(0.2, 0.8, classes).astype(np.float32)
    return truth, scores, thresholds


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_sklearn(seed: int) -> None:
    truth, scores, thresholds = random_case(seed)
    truth[:, 4] = False  # a class with no positives: F1 0, AP undefined, left out of mAP
    predicted = scores >= thresholds
    keys = [f"c{i}" for i in range(5)]
    metrics = compute_metrics(keys, thresholds.tolist(), truth, scores, predicted)
    p, r, f, support = precision_recall_fscore_support(
        truth, predicted, average=None, zero_division=0
    )
    for column, item in enumerate(metrics.classes):
        assert (item.precision, item.recall, item.f1) == pytest.approx(
            (p[column], r[column], f[column])
        )
        assert item.support == support[column]
    aps = [average_precision_score(truth[:, c], scores[:, c]) for c in range(4)]
    assert [item.average_precision for item in metrics.classes[:4]] == pytest.approx(aps)
    assert metrics.classes[4].average_precision is None
    assert metrics.mean_average_precision == pytest.approx(np.mean(aps))
    assert metrics.macro_f1 == pytest.approx(
        f1_score(truth, predicted, average="macro", zero_division=0)
    )
    assert metrics.micro_f1 == pytest.approx(f1_score(truth, predicted, average="micro"))


def test_metrics_by_hand() -> None:
    # Six images, one class; threshold 0.5.
    #   score: 0.9  0.8  0.7  0.6  0.3  0.2
    #   truth:  1    0    1    1    1    0
    # Predicted positive: the first four -> TP 3, FP 1, FN 1.
    # precision 3/4, recall 3/4, F1 2*3/(2*3+1+1) = 0.75.
    # AP: ranks 1..6 give precision 1/1, 1/2, 2/3, 3/4, 4/5, 4/6 with recall steps of 1/4
    # at ranks 1, 3, 4, 5: (1 + 2/3 + 3/4 + 4/5) / 4 = 0.8041666...
    truth = np.array([[1], [0], [1], [1], [1], [0]], dtype=bool)
    scores = np.array([[0.9], [0.8], [0.7], [0.6], [0.3], [0.2]], dtype=np.float32)
    metrics = compute_metrics(["k"], [0.5], truth, scores, scores >= 0.5)
    item = metrics.classes[0]
    assert (item.precision, item.recall, item.f1, item.support) == (0.75, 0.75, 0.75, 4)
    assert item.average_precision == pytest.approx((1 + 2 / 3 + 3 / 4 + 4 / 5) / 4)
    assert metrics.macro_f1 == metrics.micro_f1 == 0.75


def test_average_precision_takes_tied_scores_together() -> None:
    truth = np.array([1, 0, 1, 0, 1], dtype=bool)
    scores = np.array([0.5, 0.5, 0.5, 0.1, 0.9], dtype=np.float32)
    # Threshold 0.9: P 1, R 1/3; threshold 0.5: P 3/4, R 1 -> 1/3 * 1 + 2/3 * 3/4 = 0.8333
    assert average_precision(truth, scores) == pytest.approx(1 / 3 + 2 / 3 * 3 / 4)
    assert average_precision(truth, scores) == pytest.approx(average_precision_score(truth, scores))
    assert average_precision(np.zeros(3, dtype=bool), scores[:3]) is None


def brute_force(truth: np.ndarray, scores: np.ndarray) -> list[tuple[float, float, float]]:
    """(precision, recall, F1) at every distinct score used as the threshold."""
    rows = []
    for threshold in np.unique(scores):
        p, r, f, _ = precision_recall_fscore_support(
            truth, scores >= threshold, average="binary", zero_division=0
        )
        rows.append((p, r, f))
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_best_f1_threshold_beats_every_other_and_keeps_a_margin(seed: int) -> None:
    truth, scores, _ = random_case(seed, classes=3)
    for column in range(3):
        chosen = choose_threshold("k", truth[:, column], scores[:, column], previous=0.5)
        best_f1 = max(f for _, _, f in brute_force(truth[:, column], scores[:, column]))
        predicted = decide(scores[:, [column]], [chosen.threshold])[:, 0]  # as the worker does
        p, r, f, _ = precision_recall_fscore_support(
            truth[:, column], predicted, average="binary", zero_division=0
        )
        assert chosen.f1 == pytest.approx(best_f1) == pytest.approx(f)
        assert (chosen.precision, chosen.recall) == pytest.approx((p, r))
        assert f >= f1_score(truth[:, column], scores[:, column] >= 0.5)
        below = scores[:, column][~predicted]
        if below.size:  # placed between two scores, not on one
            assert chosen.threshold > below.max() and chosen.threshold not in scores[:, column]


def test_a_chosen_threshold_labels_its_score_and_not_the_next_lower_one_under_decide() -> None:
    """Whatever the gap between two neighbouring float32 scores (one ulp to a tenth), the
    threshold placed between them is a plain float that `decide`, the worker's float64
    rule, puts above the lower score and at or below the higher one."""
    rng = np.random.default_rng(0)
    for _ in range(2000):
        higher = np.float32(rng.uniform(0.02, 0.98))
        lower = higher - np.float32(10 ** rng.uniform(-8, -1))
        lower = min(lower, np.nextafter(higher, np.float32(0), dtype=np.float32))
        truth = np.array([True, False])
        chosen = choose_threshold("k", truth, np.array([higher, lower]), previous=0.5)
        assert type(chosen.threshold) is float
        assert decide(np.array([[higher], [lower]]), [chosen.threshold])[:, 0].tolist() == [
            True,
            False,
        ], (higher, lower, chosen.threshold)


@pytest.mark.parametrize("target", [0.6, 0.8, 0.95])
def test_min_precision_threshold_has_the_most_recall_meeting_the_target(target: float) -> None:
    truth, scores, _ = random_case(5, classes=1)
    chosen = choose_threshold("k", truth[:, 0], scores[:, 0], 0.5, min_precision=target)
    meeting = [r for p, r, _ in brute_force(truth[:, 0], scores[:, 0]) if p >= target]
    assert chosen.target_met is True
    assert chosen.precision >= target and chosen.recall == pytest.approx(max(meeting))


def test_unreachable_precision_is_flagged_not_hidden() -> None:
    truth = np.array([0, 1, 0, 1], dtype=bool)
    scores = np.array([0.9, 0.8, 0.7, 0.6], dtype=np.float32)
    chosen = choose_threshold("k", truth, scores, 0.5, min_precision=0.9)
    assert chosen.target_met is False
    assert chosen.precision == 0.5 and chosen.recall == 1.0  # the most precise point
    assert chosen.as_json()["target_met"] is False


def test_a_class_without_positives_keeps_its_threshold() -> None:
    scored = ScoredSet(
        keys=["a", "b"],
        targets=np.array([[True, False], [False, False]]),
        scores=np.array([[0.9, 0.7], [0.2, 0.1]], dtype=np.float32),
        skipped=[],
    )
    a, b = choose_thresholds(scored, {"a": 0.5, "b": 0.42})
    assert a.calibrated and a.threshold == pytest.approx(0.55)
    assert not b.calibrated and b.threshold == 0.42 and b.support == 0
    assert b.as_json()["method"] == "kept: no positive example in the data"


def test_calibrate_moves_no_threshold_on_too_few_examples() -> None:
    """One positive made a threshold of its own score, 0.998, with "precision 1.000" (the
    class's recall on a real test set fell from 0.97 to 0.14); positives only have no
    precision to measure. Such a class keeps its threshold, saying why."""
    rng = np.random.default_rng(3)
    scores = rng.random((40, 3)).astype(np.float32)
    truth = np.zeros((40, 3), dtype=bool)
    truth[0, 0] = True  # a: one positive
    truth[:, 1] = True  # b: positives only
    truth[:20, 2] = True  # c: 20 of each
    scored = ScoredSet(keys=["a", "b", "c"], targets=truth, scores=scores, skipped=[])
    a, b, c = choose_thresholds(scored, dict.fromkeys("abc", 0.4), min_examples=MIN_EXAMPLES)
    assert (a.threshold, b.threshold) == (0.4, 0.4) and not a.calibrated and not b.calibrated
    assert a.as_json()["method"] == (
        "kept: too few examples (1 positive, 39 negative; calibrating needs 10 of each)"
    )
    assert "40 positive, 0 negative" in b.as_json()["method"]
    assert c.calibrated and c.support == 20
    # What training does on its own split: any class with a positive is calibrated.
    assert choose_thresholds(scored, dict.fromkeys("abc", 0.4))[0].calibrated


def test_calibration_rewrites_model_json_but_not_the_version(tiny_model: Path, tmp_path) -> None:
    directory = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    spec, version, sha256 = read_model_json(directory)
    scored = ScoredSet(
        keys=spec.keys,
        targets=np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=bool),
        scores=np.array(
            [[0.8, 0.1, 0.0], [0.3, 0.6, 0.1], [0.7, 0.9, 0.2], [0.1, 0.2, 0.3]], dtype=np.float32
        ),
        skipped=[],
    )
    chosen = choose_thresholds(scored, {key: 0.5 for key in spec.keys})
    updated = write_calibration(directory, spec, chosen, tmp_path / "val.csv", 4, 1)
    again, same_version, same_sha = read_model_json(directory)
    assert (same_version, same_sha) == (version, sha256)
    assert again == updated
    assert again.thresholds_version == 2 and again.calibration["thresholds_version"] == 2
    assert again.thresholds == [0.5, 0.4, 0.25]
    assert all(type(threshold) is float for threshold in updated.thresholds)
    assert again.calibration["images"] == 4 and again.calibration["skipped"] == 1
    assert again.calibration["classes"]["drawing"]["f1"] == 1.0
    classifier = Classifier.load(directory)
    assert classifier.version == version
    assert classifier.thresholds.tolist() == pytest.approx([0.5, 0.4, 0.25])

    weights = directory / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(ModelError, match=r"no longer matches model\.json"):
        update_model_json(directory, again)
    document = json.loads((directory / "model.json").read_text())
    assert document["weights_sha256"] == sha256  # untouched


def test_min_precision_option_parsing() -> None:
    keys = ["map", "drawing"]
    assert _precision_targets((), keys) is None
    assert _precision_targets(("0.9",), keys) == {"map": 0.9, "drawing": 0.9}
    assert _precision_targets(("map=0.95",), keys) == {"map": 0.95}
    assert _precision_targets(("0.8", "map=0.95"), keys) == {"map": 0.95, "drawing": 0.8}
    with pytest.raises(InvalidValue, match="has no class 'mpa'") as raised:
        _precision_targets(("mpa=0.9",), keys)
    assert raised.value.field == "min_precision" and "--" not in str(raised.value)
    with pytest.raises(EnrichError, match=r"P must be in \(0, 1\]"):
        _precision_targets(("1.5",), keys)
    with pytest.raises(EnrichError, match="expected P or KEY=P"):
        _precision_targets(("high",), keys)


def test_training_calibration_is_version_one_and_calibrate_refines_it(tiny_model: Path) -> None:
    """Training ends with `calibrated_spec(..., thresholds_version=1)`; calibrate then counts on."""
    spec = read_model_json(tiny_model)[0]
    scored = ScoredSet(
        keys=spec.keys,
        targets=np.array([[1, 0, 0], [0, 1, 1], [1, 1, 0]], dtype=bool),
        scores=np.array([[0.3, 0.1, 0.0], [0.1, 0.6, 0.9], [0.2, 0.7, 0.2]], dtype=np.float32),
        skipped=[],
    )
    chosen = choose_thresholds(scored, {key: 0.5 for key in spec.keys})
    trained = calibrated_spec(spec, chosen, "the validation split of training", 3, 0, 1)
    assert trained.thresholds_version == 1 and trained.calibration["thresholds_version"] == 1
    assert trained.thresholds == [item.threshold for item in chosen]
    assert trained.classes[0].threshold < 0.5  # a class that scores low gets a low threshold
    assert trained.calibration["data"] == "the validation split of training"
    assert {c["method"] for c in trained.calibration["classes"].values()} == {"max_f1"}
    refined = calibrated_spec(trained, chosen, "val.csv", 3, 0, trained.thresholds_version + 1)
    assert refined.thresholds_version == 2 and refined.classes == trained.classes
