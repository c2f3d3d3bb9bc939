"""Choosing one threshold per class from validation scores, and recording it in model.json.

A flat 0.5 suits no class in particular: rare classes score low, easy ones
high. For each class the candidate thresholds are the distinct validation
scores; the default picks the one with the best F1, `min_precision` picks the
one with the most recall whose precision meets the target. The threshold is
then placed halfway to the next lower score, so it makes the same decisions
on the validation set but with a margin either side.

`enrich model calibrate` moves a class's threshold only on at least MIN_EXAMPLES
positive and as many negative images of it: one positive made a threshold of 0.998 (its
own score) with "precision 1.000", and a set of positives only has no precision to
measure; such a class keeps its threshold, and the table says why. (Training calibrates
on its own validation split with whatever it has, as before: a new model needs
thresholds, and its split is what there is.)

Weights are not touched, so the model version stays; `thresholds_version`
counts calibrations (training's own, on its validation split, is the first),
and the `calibration` block says on what data and with what precision and
recall each threshold was chosen.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from enrichment.model.evaluation import (
    Metrics,
    ScoredSet,
    compute_metrics,
    precision_recall_f1,
    ranked_counts,
)
from enrichment.model.spec import ModelSpec, update_model_json
from enrichment.thresholds import decide


@dataclass(frozen=True)
class ClassThreshold:
    """The threshold chosen for one class and what it achieves on the validation set."""

    key: str
    threshold: float
    previous: float
    support: int
    precision: float
    recall: float
    f1: float
    min_precision: float | None = None
    target_met: bool | None = None
    kept: str | None = None  # why the previous threshold was kept, if it was

    @property
    def calibrated(self) -> bool:
        return self.kept is None

    def as_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "method": "max_f1" if self.min_precision is None else "min_precision",
            "threshold": self.threshold,
            "previous": self.previous,
            "support": self.support,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
        }
        if self.min_precision is not None:
            document["min_precision"] = self.min_precision
            document["target_met"] = self.target_met
        if self.kept is not None:
            document["method"] = f"kept: {self.kept}"
        return document


MIN_EXAMPLES = 10  # positives and negatives `enrich model calibrate` needs to move a threshold


def choose_threshold(
    key: str,
    truth: np.ndarray,
    scores: np.ndarray,
    previous: float,
    min_precision: float | None = None,
    min_examples: int = 1,
) -> ClassThreshold:
    """The threshold for one class (boolean `truth`, float32 `scores`); the previous one, and
    what it gives, with fewer than `min_examples` positives (or, above 1, negatives)."""
    positives = int(truth.sum())
    negatives = len(truth) - positives
    if (
        positives == 0
        or positives < min_examples
        or (min_examples > 1 and negatives < min_examples)
    ):
        # Nothing (or too little) to calibrate against: keep what there was.
        decided = _decided(scores, previous)
        tp = int(np.sum(decided & truth))
        fp, fn = int(np.sum(decided)) - tp, positives - tp
        kept = (
            "no positive example in the data"
            if positives == 0
            else f"too few examples ({positives} positive, {negatives} negative; "
            f"calibrating needs {min_examples} of each)"
        )
        return ClassThreshold(
            key, previous, previous, positives, *precision_recall_f1(tp, fp, fn), kept=kept
        )
    candidates, tp, fp = ranked_counts(truth, scores)
    precision = tp / (tp + fp)
    recall = tp / positives
    f1 = 2 * tp / (tp + fp + positives)
    target_met: bool | None = None
    if min_precision is None:
        best = int(np.argmax(f1))  # the first maximum: the highest threshold among equals
    else:
        meeting = np.flatnonzero(precision >= min_precision)
        target_met = bool(meeting.size)
        if target_met:
            most_recall = recall[meeting].max()
            best = int(meeting[np.argmax(recall[meeting] == most_recall)])
        else:  # unreachable: the most precise threshold, flagged, rather than silently none
            best = int(np.flatnonzero(precision == precision.max())[-1])
    lower = candidates[best + 1] if best + 1 < len(candidates) else None
    return ClassThreshold(
        key=key,
        threshold=_between(candidates[best], lower),
        previous=previous,
        support=positives,
        precision=float(precision[best]),
        recall=float(recall[best]),
        f1=float(f1[best]),
        min_precision=min_precision,
        target_met=target_met,
    )


def _decided(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Which of one class's scores reach `threshold`: `decide`'s rule, so the worker agrees."""
    return decide(np.asarray(scores)[:, np.newaxis], np.array([threshold]))[:, 0]


def _between(score: np.float32, lower: np.float32 | None) -> float:
    """A short number near the middle of (lower, score], as a plain float.

    Rounded only as far as it stays within a quarter of the gap from the
    middle, so model.json reads 0.43 rather than 0.4312 without losing the
    margin; and only where `decide` (which compares in float64, as the worker
    does) still labels `score` and not `lower` with it.
    """
    if lower is None:
        return float(score)
    middle = (float(score) + float(lower)) / 2
    slack = (float(score) - float(lower)) / 4
    for digits in range(2, 9):
        tidy = round(middle, digits)
        keeps_decisions = _decided(np.array([lower, score]), tidy).tolist() == [False, True]
        if abs(tidy - middle) <= slack and keeps_decisions:
            return tidy
    return float(score)


def choose_thresholds(
    scored: ScoredSet,
    previous: Mapping[str, float],
    min_precision: Mapping[str, float] | None = None,
    min_examples: int = 1,
) -> list[ClassThreshold]:
    """One threshold per class; `min_precision` maps keys to targets (absent key: best F1)."""
    targets = min_precision or {}
    return [
        choose_threshold(
            key,
            scored.targets[:, column],
            scored.scores[:, column],
            previous[key],
            targets.get(key),
            min_examples,
        )
        for column, key in enumerate(scored.keys)
    ]


def best_f1_thresholds(
    keys: Sequence[str], truth: np.ndarray, scores: np.ndarray
) -> tuple[list[ClassThreshold], Metrics]:
    """Best-F1 thresholds from a flat 0.5, and the metrics they give on the same images.

    What training does on its validation split, so a new model is usable at once.
    """
    chosen = choose_thresholds(ScoredSet(list(keys), truth, scores, []), dict.fromkeys(keys, 0.5))
    thresholds = [item.threshold for item in chosen]
    metrics = compute_metrics(keys, thresholds, truth, scores, decide(scores, thresholds))
    return chosen, metrics


def calibrated_spec(
    spec: ModelSpec,
    chosen: list[ClassThreshold],
    data: str,
    images: int,
    skipped: int,
    thresholds_version: int,
) -> ModelSpec:
    """`spec` with the chosen thresholds and the `calibration` block saying how they were chosen.

    Used by `enrich model calibrate` and by training, which ends by calibrating
    on its own validation split (thresholds_version 1).
    """
    by_key = {item.key: item for item in chosen}
    calibration = {
        "thresholds_version": thresholds_version,
        "calibrated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "data": data,
        "images": images,
        "skipped": skipped,
        "classes": {item.key: item.as_json() for item in chosen},
    }
    return replace(
        spec,
        classes=tuple(
            replace(item, threshold=float(by_key[item.key].threshold)) for item in spec.classes
        ),
        thresholds_version=thresholds_version,
        calibration=calibration,
    )


def write_calibration(
    directory: Path,
    spec: ModelSpec,
    chosen: list[ClassThreshold],
    data: Path,
    images: int,
    skipped: int,
) -> ModelSpec:
    """Store the thresholds and how they were chosen in model.json; the weights stay as they are."""
    updated = calibrated_spec(spec, chosen, str(data), images, skipped, spec.thresholds_version + 1)
    update_model_json(directory, updated)
    return updated
