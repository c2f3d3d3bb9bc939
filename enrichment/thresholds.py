"""The one threshold rule: which labels a score vector gets.

The classifier applies it to fresh scores, exports re-threshold stored scores with it,
calibration and training measure what it would decide, and the store decides a model
version's labels again with it when the version's thresholds change (`store.relabel`).
One function for all of them, so stored scores always give the labels a worker would; a
module of its own at the bottom of the flow, since the store may not import the model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

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
