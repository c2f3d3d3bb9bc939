"""Scoring a labelled set with a model, and the multilabel metrics that judge it.

The definitions are scikit-learn's, so numbers can be compared with other
work: precision, recall and F1 are 0 where their denominator is 0; average
precision is the step-wise sum of precision times recall gained, with tied
scores taken together; micro F1 pools every class's counts. One difference:
mAP averages only the classes that have positives in the data, because a
class without any has no defined AP (scikit-learn would count it as 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from enrichment.errors import EnrichError
from enrichment.media.fetch import Fetcher
from enrichment.model.classifier import Classifier
from enrichment.model.labelled import LabelledSet, Skipped, load_images, skipped


@dataclass(frozen=True)
class ScoredSet:
    """A labelled set's usable images: their true labels and the model's scores."""

    keys: list[str]
    targets: np.ndarray
    scores: np.ndarray
    skipped: list[Skipped]


@dataclass(frozen=True)
class ClassMetrics:
    key: str
    threshold: float
    support: int
    precision: float
    recall: float
    f1: float
    average_precision: float | None

    def as_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "threshold": self.threshold,
            "support": self.support,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "average_precision": self.average_precision,
        }


@dataclass(frozen=True)
class Metrics:
    classes: tuple[ClassMetrics, ...]
    macro_f1: float
    micro_f1: float
    mean_average_precision: float | None

    def as_json(self) -> dict[str, Any]:
        return {
            "macro_f1": self.macro_f1,
            "micro_f1": self.micro_f1,
            "mAP": self.mean_average_precision,
            "classes": [item.as_json() for item in self.classes],
        }


def score_labelled(
    classifier: Classifier, labelled: LabelledSet, fetcher: Fetcher, inference_batch: int
) -> ScoredSet:
    """Score every readable image of the set in batches; unreadable ones are listed, not fatal."""
    keys = classifier.spec.keys
    all_targets = labelled.targets(keys)
    rows: list[int] = []
    batch: list[np.ndarray] = []
    chunks: list[np.ndarray] = []
    failures: list[Skipped] = []
    for loaded in load_images(labelled, classifier.spec.preprocessing, fetcher):
        if loaded.inputs is None:
            failures.append(skipped(labelled, loaded))
            continue
        rows.append(loaded.index)
        batch.append(loaded.inputs)
        if len(batch) == inference_batch:
            chunks.append(classifier.scores(np.stack(batch)))
            batch = []
    if batch:
        chunks.append(classifier.scores(np.stack(batch)))
    if not rows:
        first = failures[0]
        raise EnrichError(
            f"none of the {len(failures)} images of {labelled.path} could be read "
            f"(line {first.line}: {first.reason}: {first.message})"
        )
    return ScoredSet(keys, all_targets[rows] > 0.5, np.concatenate(chunks), failures)


def counts(truth: np.ndarray, predicted: np.ndarray) -> tuple[int, int, int]:
    """True positives, false positives and false negatives of one class (boolean vectors)."""
    return (
        int(np.sum(truth & predicted)),
        int(np.sum(~truth & predicted)),
        int(np.sum(truth & ~predicted)),
    )


def precision_recall_f1(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return precision, recall, f1


def ranked_counts(truth: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, ...]:
    """For each distinct score, highest first: that score and the TP and FP at or above it.

    Every threshold worth considering for one class is one of these rows, so
    average precision and threshold calibration both start here.
    """
    order = np.argsort(-scores, kind="stable")
    ranked_scores, ranked_truth = scores[order], truth[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(ranked_scores)), len(ranked_scores) - 1]
    tp = np.cumsum(ranked_truth)[last_of_tie]
    fp = last_of_tie + 1 - tp
    return ranked_scores[last_of_tie], tp, fp


def average_precision(truth: np.ndarray, scores: np.ndarray) -> float | None:
    """Σ (R_n − R_{n−1}) · P_n over distinct thresholds; None when there is no positive."""
    positives = int(truth.sum())
    if positives == 0:
        return None
    _, tp, fp = ranked_counts(truth, scores)
    precision = tp / (tp + fp)
    recall = tp / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def compute_metrics(
    keys: Sequence[str],
    thresholds: Sequence[float],
    targets: np.ndarray,
    scores: np.ndarray,
    predicted: np.ndarray,
) -> Metrics:
    """Per-class and overall metrics of boolean `predicted` against boolean `targets`."""
    classes: list[ClassMetrics] = []
    total = np.zeros(3, dtype=np.int64)
    for column, key in enumerate(keys):
        truth = targets[:, column]
        tp, fp, fn = counts(truth, predicted[:, column])
        total += (tp, fp, fn)
        precision, recall, f1 = precision_recall_f1(tp, fp, fn)
        classes.append(
            ClassMetrics(
                key=key,
                threshold=float(thresholds[column]),
                support=int(truth.sum()),
                precision=precision,
                recall=recall,
                f1=f1,
                average_precision=average_precision(truth, scores[:, column]),
            )
        )
    aps = [item.average_precision for item in classes if item.average_precision is not None]
    return Metrics(
        classes=tuple(classes),
        macro_f1=float(np.mean([item.f1 for item in classes])),
        micro_f1=precision_recall_f1(*(int(value) for value in total))[2],
        mean_average_precision=float(np.mean(aps)) if aps else None,
    )


def evaluate(classifier: Classifier, scored: ScoredSet) -> Metrics:
    """The model as deployed: its thresholds and top-k fallback decide the labels."""
    return compute_metrics(
        scored.keys,
        classifier.spec.thresholds,
        scored.targets,
        scored.scores,
        classifier.decide(scored.scores),
    )
