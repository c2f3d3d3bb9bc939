"""The run report's charts, as PNG `data:` URIs that an HTML page can hold inline.

Figures are drawn with matplotlib's object API on the Agg canvas, never through
pyplot: no global figure state and no GUI backend, so a report can be built in
a worker or a thread.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from enrichment.thresholds import threshold_text

BAR_COLOUR = "#3a6ea5"
THRESHOLD_COLOUR = "#c0392b"


def png_data_uri(figure: Figure) -> str:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def plain(text: str) -> str:
    """Text shown literally: matplotlib would read `$...$` as mathematics."""
    return text.replace("$", r"\$")


def labels_per_class(names: Sequence[str], counts: Sequence[int]) -> str:
    """A horizontal bar per class, in the model's label order, its count written at its end."""
    figure = Figure(figsize=(7.5, 0.9 + 0.38 * len(names)))
    axes = figure.subplots()
    positions = np.arange(len(names))
    bars = axes.barh(positions, counts, color=BAR_COLOUR)
    axes.bar_label(bars, padding=3)
    axes.set_yticks(positions, [plain(name) for name in names])
    axes.invert_yaxis()
    axes.set_xlabel("records labelled")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlim(0, max([1, *counts]) * 1.15)
    axes.spines[["top", "right"]].set_visible(False)
    return png_data_uri(figure)


def confidence_histogram(
    counts: np.ndarray, edges: np.ndarray, threshold: float, title: str
) -> str:
    """One class's score distribution over the run's classified records, threshold dashed."""
    figure = Figure(figsize=(3.6, 2.4))
    axes = figure.subplots()
    axes.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color=BAR_COLOUR)
    axes.axvline(threshold, color=THRESHOLD_COLOUR, linestyle="--", linewidth=1.5)
    axes.text(
        threshold,
        1.0,
        f" threshold {threshold_text(threshold)}",
        color=THRESHOLD_COLOUR,
        transform=axes.get_xaxis_transform(),
        ha="left" if threshold < 0.6 else "right",
        va="top",
        fontsize=8,
    )
    axes.set_xlim(0, 1)
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_title(plain(title), fontsize=10)
    axes.set_xlabel("confidence", fontsize=8)
    axes.set_ylabel("records", fontsize=8)
    axes.tick_params(labelsize=8)
    axes.spines[["top", "right"]].set_visible(False)
    return png_data_uri(figure)
