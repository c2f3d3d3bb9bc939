"""The one threshold rule: which labels a score vector gets.

The classifier applies it to fresh scores, exports re-threshold stored scores with it,
calibration and training measure what it would decide, and the store decides a model
version's labels again with it when the version's thresholds change (`store.relabel`).
One function for all of them, so stored scores always give the labels a worker would; a
module of its own at the bottom of the flow, since the store may not import the model.

How a score is written beside its threshold is here too (`threshold_text`,
`confidence_text`, `score_and_threshold`), for the report, the review app and `explain`
alike: a page that shows both must not put a score on the other side of its threshold
than the rule does.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np


def decide(scores: np.ndarray, thresholds: np.ndarray, top_k_fallback: int = 0) -> np.ndarray:
    """Which classes each row of a (batch, classes) score matrix gets as labels, as booleans.

    The one rule that the classifier and every re-thresholding (exports) apply,
    so stored scores always give the labels a worker would. A label is given at
    or above its own class threshold. With `top_k_fallback` = k, a row where no
    class reaches its threshold gets its k best-scoring classes instead of
    none; ties go to the earlier class.
    """
    # One number type for both sides: a float32 threshold against a float64 score (or the
    # reverse) turns a tie such as 0.43 >= 0.43 into a miss on one path and a hit on another.
    scores = np.asarray(scores, dtype=np.float64)
    chosen = scores >= np.asarray(thresholds, dtype=np.float64)
    if top_k_fallback:
        empty = ~chosen.any(axis=1)
        best = np.argsort(-scores[empty], axis=1, kind="stable")[:, :top_k_fallback]
        fallback = np.zeros_like(chosen[empty])
        np.put_along_axis(fallback, best, True, axis=1)
        chosen[empty] = fallback
    return chosen


@dataclass(frozen=True)
class DecisionRule:
    """A model version's way of deciding labels: its class thresholds (in score order) and
    its top-k fallback.

    A worker loads one with its model; the store keeps the registered one, which a
    recalibration changes under a worker still running. The store compares the two when
    it writes a batch (`store.batches.finish_batch`), so a batch decided by an older rule
    is decided again by the registered one.
    """

    thresholds: tuple[float, ...]
    top_k_fallback: int = 0

    @classmethod
    def of(cls, thresholds: Iterable[float], top_k_fallback: int | None) -> DecisionRule:
        """The rule from thresholds in any form (a JSON list, a numpy array), as floats, so
        that rules compare equal whatever they were read from."""
        return cls(tuple(float(value) for value in thresholds), int(top_k_fallback or 0))

    def decide(self, scores: np.ndarray) -> np.ndarray:
        return decide(scores, np.asarray(self.thresholds), self.top_k_fallback)


DECIMALS = 4  # what calibration's thresholds need (0.4454), and a score is read beside
MOST_DECIMALS = 17  # enough to tell apart two distinct scores in [0, 1]; then repr's


def threshold_text(threshold: float, decimals: int = DECIMALS) -> str:
    """The threshold to `decimals`, without trailing zeros: 0.5, 0.445, 0.4862."""
    text = f"{threshold:.{decimals}f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def confidence_text(confidence: float, decimals: int = DECIMALS) -> str:
    """A confidence to `decimals`, as its class's threshold is written (`threshold_text`).

    Rounding both to the same decimals never reverses them, so a label (at or above its
    threshold) is never shown below it.
    """
    return f"{confidence:.{decimals}f}"


class Shown(NamedTuple):
    score: str
    threshold: str


def score_and_threshold(score: float | None, threshold: float) -> Shown:
    """The score ('–' for none) and its threshold, to `DECIMALS`, or to as many more as it
    takes to write a score below its threshold below it (0.43496 against 0.435: "0.43496 /
    0.435", where 4 decimals would write them equal); one at or above it never below it."""
    decimals = DECIMALS
    if score is not None:
        while score < threshold and _rounded(score, decimals) >= _rounded(threshold, decimals):
            if decimals == MOST_DECIMALS:
                return Shown(repr(score), repr(threshold))
            decimals += 1
    score_text = "–" if score is None else confidence_text(score, decimals)
    return Shown(score_text, threshold_text(threshold, decimals))


def _rounded(value: float, decimals: int) -> float:
    """The value as written to `decimals` (what a reader compares)."""
    return float(f"{value:.{decimals}f}")
