"""Is a new model version better? Two versions compared, and the precision gate on publishing.

A comparison (`compare`) covers the records both versions classified, per
class: the labels B adds, removes and keeps against A, the mean score shift
(B's score minus A's, for a class both versions have), and each version's
precision on the labels curators reviewed there, with a 95 % Wilson interval,
which stays inside [0, 1] and is honest for the small counts reviews give (the
normal approximation is not). Under `MIN_REVIEWS` reviewed labels a class gets
no interval: "too few reviews" (with n reviews the interval is about ±1/√n
wide, over ±0.3 below 10).

The gate (`PrecisionGate`) is the same estimate over all of a version's
reviewed labels: `enrich publish --min-precision P` publishes a class only
when the interval's lower bound reaches P.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from enrichment.store.comparison import (
    LabelChanges,
    Reviewed,
    common_records,
    label_changes,
    reviewed_labels,
    score_pairs,
    versions_compared,
)
from enrichment.store.database import Database
from enrichment.store.models import ModelClasses
from enrichment.store.retire import RetiredVersion, refuse_retired
from enrichment.store.selection import known_models

Z_95 = 1.959963984540054
MIN_REVIEWS = 10  # below this, no interval: "too few reviews"


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float


def wilson(successes: int, trials: int, z: float = Z_95) -> Interval | None:
    """The Wilson score interval for a binomial proportion; None without trials."""
    if trials == 0:
        return None
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class Precision:
    """A version's precision on one class's reviewed labels; no interval under MIN_REVIEWS."""

    reviewed: int
    correct: int

    @property
    def too_few_reviews(self) -> bool:
        return self.reviewed < MIN_REVIEWS

    @property
    def interval(self) -> Interval | None:
        return None if self.too_few_reviews else wilson(self.correct, self.reviewed)

    def as_json(self) -> dict:
        interval = self.interval
        return {
            "reviewed": self.reviewed,
            "correct": self.correct,
            "too_few_reviews": self.too_few_reviews,
            "precision": None if interval is None else asdict(interval),
        }

    def describe(self) -> str:
        """`0.92 [0.81, 0.97] n=25`, or `too few reviews (n=3)`."""
        interval = self.interval
        if interval is None:
            return f"too few reviews (n={self.reviewed})"
        return (
            f"{interval.estimate:.2f} [{interval.low:.2f}, {interval.high:.2f}] n={self.reviewed}"
        )


def _precision(counts: Reviewed | None) -> Precision:
    return Precision(*(counts or (0, 0)))


@dataclass(frozen=True)
class ClassComparison:
    key: str
    in_a: bool  # whether each version has the class at all
    in_b: bool
    added: int
    removed: int
    kept: int
    score_shift: float | None  # mean of B's score minus A's; None unless both have the class
    precision_a: Precision
    precision_b: Precision

    def as_json(self) -> dict:
        return {
            "key": self.key,
            "in_a": self.in_a,
            "in_b": self.in_b,
            "added": self.added,
            "removed": self.removed,
            "kept": self.kept,
            "score_shift": self.score_shift,
            "precision_a": self.precision_a.as_json(),
            "precision_b": self.precision_b.as_json(),
        }


@dataclass(frozen=True)
class Comparison:
    version_a: str
    version_b: str
    records: int  # classified by both
    classes: list[ClassComparison]

    def as_json(self) -> dict:
        return {
            "version_a": self.version_a,
            "version_b": self.version_b,
            "records": self.records,
            "min_reviews": MIN_REVIEWS,
            "classes": [item.as_json() for item in self.classes],
        }


def checked_versions(db: Database, a: str, b: str) -> tuple[ModelClasses, ModelClasses]:
    """The two versions' classes; an unknown, equal or retired version is refused.

    A retired version's results and labels were removed (`store.retire`): a
    comparison with it would show no common records and no changes, as if the
    two versions had never met, so it is refused with the date it was retired.
    """
    models = versions_compared(db, a, b)
    with db.transaction() as session:
        for version in (a, b):
            try:
                refuse_retired(session, version)
            except RetiredVersion as error:
                raise RetiredVersion(f"cannot compare {a} with {b}: {error}") from None
    return models


def compare(db: Database, a: str, b: str) -> Comparison:
    """Version B against version A on the records both classified (see the module's docstring)."""
    model_a, model_b = checked_versions(db, a, b)
    changes = label_changes(db, a, b)
    shifts = _score_shifts(score_pairs(db, a, b), model_a, model_b)
    reviewed_a = reviewed_labels(db, a, on_records_of=b)
    reviewed_b = reviewed_labels(db, b, on_records_of=a)
    keys = list(model_a.keys) + [key for key in model_b.keys if key not in model_a.keys]
    classes = []
    for key in keys:
        change = changes.get(key, LabelChanges())
        classes.append(
            ClassComparison(
                key,
                key in model_a.keys,
                key in model_b.keys,
                change.added,
                change.removed,
                change.kept,
                shifts.get(key),
                _precision(reviewed_a.get((a, key))),
                _precision(reviewed_b.get((b, key))),
            )
        )
    return Comparison(a, b, common_records(db, a, b), classes)


def _score_shifts(
    pairs: Iterable[tuple[list[float], list[float]]], model_a: ModelClasses, model_b: ModelClasses
) -> dict[str, float]:
    """Per class both versions have: the mean of B's score minus A's, over the pairs given."""
    shared = [
        (key, index, model_b.keys.index(key))
        for index, key in enumerate(model_a.keys)
        if key in model_b.keys
    ]
    totals = [0.0] * len(shared)
    count = 0
    for scores_a, scores_b in pairs:
        count += 1
        for slot, (_, index_a, index_b) in enumerate(shared):
            totals[slot] += scores_b[index_b] - scores_a[index_a]
    if count == 0:
        return {}
    return {key: totals[slot] / count for slot, (key, _, _) in enumerate(shared)}


@dataclass(frozen=True)
class RefusedClass:
    """A class the gate keeps from publishing: its version, its reviewed labels, lower bound."""

    model_version: str
    key: str
    reviewed: int
    low: float | None  # None: too few reviews for an interval


class PrecisionGate:
    """Which (model version, class) may be published: reviewed precision's lower bound >= P.

    A class with fewer than MIN_REVIEWS reviewed labels is refused too: its
    precision is not known. Classes are judged per version as the publish
    meets the version (`admits`), and all of that version's classes at once,
    so the refusals list every weak class of the versions being published.
    """

    def __init__(self, db: Database, min_precision: float, models: dict[str, ModelClasses]):
        self.min_precision = min_precision
        self._models = models
        self._reviewed = reviewed_labels(db)
        self._judged: set[str] = set()
        self.refused: list[RefusedClass] = []
        self._refused_pairs: set[tuple[str, str]] = set()

    @classmethod
    def of(cls, db: Database, min_precision: float, version: str | None = None) -> PrecisionGate:
        """The gate over every registered version; `version`'s classes judged at once."""
        gate = cls(db, min_precision, known_models(db))
        if version is not None:
            gate.judge(version)
        return gate

    def admits(self, version: str, key: str) -> bool:
        """Whether this version's labels of this class may be published."""
        self.judge(version)
        return (version, key) not in self._refused_pairs

    def refuses_key(self, key: str) -> bool:
        """Whether any version judged so far has this class refused (its annotations stay)."""
        return any(refused.key == key for refused in self.refused)

    def judge(self, version: str) -> None:
        """Judge all of a version's classes, once (before its labels, for a one-version publish)."""
        if version in self._judged:
            return
        self._judged.add(version)
        model = self._models.get(version)
        for key in model.keys if model is not None else ():
            precision = _precision(self._reviewed.get((version, key)))
            interval = precision.interval
            if interval is None or interval.low < self.min_precision:
                self.refused.append(
                    RefusedClass(
                        version, key, precision.reviewed, None if interval is None else interval.low
                    )
                )
                self._refused_pairs.add((version, key))
