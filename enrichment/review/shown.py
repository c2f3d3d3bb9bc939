"""How the review pages write a score beside its class threshold: never on the wrong side.

A tile or a record row shows "score / threshold", and a curator reads from it on which
side of the threshold the model put the item. Both are written to the same decimals, so
rounding never reverses them; to 4, as the run report writes thresholds and confidences
(`report/shown.py`, a package the review app may not import, whose rule this copies); and
where a score below its threshold would still be written equal to it (0.43496 against
0.435: "0.4350 / 0.435"), to as many more as it takes to tell them apart. They were written
to 2 decimals on the tiles ("0.43 / 0.44" for 0.4349 against 0.435) and to 3 on the record.
"""

from __future__ import annotations

from typing import NamedTuple

DECIMALS = 4  # the run report's (`report/shown.py`): calibration's thresholds need 4
MOST_DECIMALS = 17  # enough to tell apart two distinct scores in [0, 1]; then repr's


class Shown(NamedTuple):
    score: str
    threshold: str


def score_and_threshold(score: float | None, threshold: float) -> Shown:
    """The score (fixed decimals; '–' for none) and threshold (without trailing zeros:
    0.5, 0.435, 0.4862), to `DECIMALS` or more: a score below its threshold is always
    written below it, one at or above it never below it."""
    decimals = DECIMALS
    if score is not None:
        while score < threshold and _rounded(score, decimals) >= _rounded(threshold, decimals):
            if decimals == MOST_DECIMALS:
                return Shown(repr(score), repr(threshold))
            decimals += 1
    text = f"{threshold:.{decimals}f}".rstrip("0")
    return Shown(
        "–" if score is None else f"{score:.{decimals}f}",
        text + "0" if text.endswith(".") else text,
    )


def _rounded(value: float, decimals: int) -> float:
    """The value as written to `decimals` (what a reader compares)."""
    return float(f"{value:.{decimals}f}")
