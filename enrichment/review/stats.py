"""What the decisions say about the model: observed precision, recall errors, better thresholds.

Per class, over the items of the chosen results that have a decision:

- precision of the labels above threshold: accepted / (accepted + rejected), with
  a Wilson score interval, which stays inside [0, 1] and is honest for the
  small counts a review gives (the normal approximation is not);
- the same from the audit sample only (random, so unbiased for the class's
  labels as a whole; the uncertainty ordering over-samples doubtful ones);
- labels added by reviewers (the model's misses);
- a suggested threshold: the one with the best F1 on the reviewed items,
  halfway to the next lower score, as `enrich model calibrate` places it.
  Below `MIN_DECISIONS` decisions on a class it is marked "too few decisions":
  with n decisions a 95% Wilson interval on a proportion near 0.5 is about
  ±1/√n wide, so under 30 it is wider than ±0.18 and one more decision can
  move the best threshold across most of the scores.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from enrichment.model.compare import Interval, wilson
from enrichment.store.database import Database
from enrichment.store.decisions import standing_decisions
from enrichment.store.review_queue import Item, QueueFilter, all_items
from enrichment.store.reviews import Decision

MIN_DECISIONS = 30  # below this, a suggested threshold is shown as a caveat only


@dataclass(frozen=True)
class ClassStats:
    key: str
    model_version: str
    threshold: float
    reviewed: int
    accepted: int
    rejected_above: int
    added: int
    rejected_below: int
    precision: Interval | None
    audited: int
    audit_precision: Interval | None
    suggested_threshold: float | None

    @property
    def too_few_decisions(self) -> bool:
        """True when the suggested threshold rests on fewer than MIN_DECISIONS decisions."""
        return self.reviewed < MIN_DECISIONS

    def as_json(self) -> dict:
        return {**asdict(self), "too_few_decisions": self.too_few_decisions}


def suggest_threshold(truth: Sequence[bool], scores: Sequence[float]) -> float | None:
    """The threshold with the best F1 on reviewed items (ties: the highest), or None.

    Needs at least one positive and one negative: otherwise any threshold
    below or above all scores would do, and the decisions do not say which.
    """
    truth_array = np.asarray(truth, dtype=bool)
    score_array = np.asarray(scores, dtype=np.float64)
    if truth_array.all() or not truth_array.any():
        return None
    order = np.argsort(-score_array, kind="stable")
    ranked = score_array[order]
    true_positives = np.cumsum(truth_array[order])
    # The last position of each distinct score: labelling down to it labels all its ties.
    ends = np.flatnonzero(np.append(ranked[1:] != ranked[:-1], True))
    f1 = 2 * true_positives[ends] / (ends + 1 + truth_array.sum())
    best = int(np.argmax(f1))
    score = float(ranked[ends[best]])
    if best + 1 == len(ends):
        return score
    lower = float(ranked[ends[best + 1]])
    tidy = round((score + lower) / 2, 4)
    return tidy if lower < tidy <= score else (score + lower) / 2


def class_stats(db: Database, filters: QueueFilter) -> list[ClassStats]:
    """Per (model version, class) of the chosen results, the figures above."""
    reviewed = filters.everything("reviewed", filters.classes)
    audited = standing_decisions(db, audit_only=True)
    groups: dict[tuple[str, str], list[Item]] = {}
    for item in all_items(db, reviewed):
        groups.setdefault((item.model_version, item.label_key), []).append(item)
    return [
        _one_class(version, key, items, audited) for (version, key), items in sorted(groups.items())
    ]


def _one_class(
    version: str, key: str, items: Iterable[Item], audited: dict[tuple[str, str], str]
) -> ClassStats:
    items = list(items)
    positive = [item.decision in Decision.POSITIVE for item in items]
    above = [(item, good) for item, good in zip(items, positive, strict=True) if item.labelled]
    accepted = sum(good for _, good in above)
    audit = [
        audited[(item.record_id, item.label_key)] in Decision.POSITIVE
        for item, _ in above
        if (item.record_id, item.label_key) in audited
    ]
    scored = [(good, item.confidence) for item, good in zip(items, positive, strict=True)]
    scored = [(good, score) for good, score in scored if score is not None]
    return ClassStats(
        key=key,
        model_version=version,
        threshold=items[0].threshold,
        reviewed=len(items),
        accepted=accepted,
        rejected_above=len(above) - accepted,
        added=sum(item.decision == Decision.ADD for item in items),
        rejected_below=sum(
            item.decision == Decision.REJECT and not item.labelled for item in items
        ),
        precision=wilson(accepted, len(above)),
        audited=len(audit),
        audit_precision=wilson(sum(audit), len(audit)),
        suggested_threshold=suggest_threshold(
            [good for good, _ in scored], [score for _, score in scored]
        ),
    )
