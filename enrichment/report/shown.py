"""How the report pages write thresholds and confidences: both to the same decimals.

A class's labels are its scores at or above its threshold, and a page that shows both
must not contradict that. Rounding to a fixed number of decimals never reverses two
numbers, so a label rounded as its threshold is rounded is never shown below it; the
thresholds were written to 2 decimals and the confidences to 3, which showed a trained
model's 0.48619 as 0.49 beside its label of 0.486.
"""

from __future__ import annotations

DECIMALS = 4  # what calibration's thresholds need (0.4454), and a score is read beside


def threshold_text(threshold: float) -> str:
    """The threshold to `DECIMALS`, without trailing zeros: 0.5, 0.445, 0.4862."""
    text = f"{threshold:.{DECIMALS}f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def confidence_text(confidence: float) -> str:
    """A confidence to `DECIMALS`, as its class's threshold is written (`threshold_text`)."""
    return f"{confidence:.{DECIMALS}f}"
