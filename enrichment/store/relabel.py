"""A model version's labels decided again when its thresholds change (a recalibration).

`enrich model calibrate` keeps the model version (the weights are the same) and changes
its thresholds, which the next run registers. Until then labels of the version were made
by the old thresholds; after it, without this, the records classified before kept them
while new records got the new ones: one version, two rules, and an export or a publish
of the version shipped both under one `generator.version`, whose thresholds the README
says every label reached. So registering new thresholds (or a new top-k fallback) decides
every classified result of the version again from its stored scores, by the rule the
worker applies (`thresholds.decide`), and changes only what differs: labels that no longer
reach their threshold go, those that now do come (with the score as their confidence, as
the worker writes them), and a result's status follows (`labelled` or `below_threshold`).
The next publish then withdraws and creates accordingly, as after any change of labels.

It runs in the caller's transaction (the run's registration), `BATCH` results at a time
in record order, before the review index is rebuilt from these labels. A classified
result without stored scores (none is written so) has nothing to decide from and keeps
its labels. Workers started before the registration still hold the old thresholds; the
batches they write afterwards are decided again by the registered ones as they are stored
(`store.batches.as_registered`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa

from enrichment.store.current import CLASSIFIED
from enrichment.store.schema import Label, Outcome, Result
from enrichment.thresholds import decide

BATCH = 2000


@dataclass
class Relabelled:
    """What deciding a version's labels again changed."""

    results: int = 0  # classified results decided again
    added: int = 0
    removed: int = 0
    status_changed: int = 0


def relabel_on(
    connection: sa.Connection,
    version: str,
    keys: Sequence[str],
    thresholds: Sequence[float],
    top_k_fallback: int,
) -> Relabelled:
    """Decide the labels of every classified result of `version` again, in the caller's
    transaction; `keys` and `thresholds` in score order, as registered."""
    changed = Relabelled()
    limits = np.asarray(thresholds, dtype=np.float64)
    last: str | None = None
    while True:
        query = (
            sa.select(Result.record_id, Result.scores, Result.status)
            .where(
                Result.model_version == version,
                Result.status.in_([str(status) for status in CLASSIFIED]),
                Result.scores.is_not(None),
            )
            .order_by(Result.record_id)
            .limit(BATCH)
        )
        if last is not None:
            query = query.where(Result.record_id > last)
        rows = connection.execute(query).all()
        if not rows:
            return changed
        last = rows[-1].record_id
        _relabel_batch(connection, version, keys, limits, top_k_fallback, rows, changed)


def _relabel_batch(
    connection: sa.Connection,
    version: str,
    keys: Sequence[str],
    thresholds: np.ndarray,
    top_k_fallback: int,
    rows: Sequence[sa.Row],
    changed: Relabelled,
) -> None:
    """One batch of results (in record order): their labels and statuses brought in line."""
    scores = np.asarray([row.scores for row in rows], dtype=np.float64)
    chosen = decide(scores, thresholds, top_k_fallback)
    ids = {row.record_id for row in rows}
    held = {
        (record_id, key)
        for record_id, key in connection.execute(
            sa.select(Label.record_id, Label.label_key).where(
                Label.model_version == version,
                Label.record_id >= rows[0].record_id,
                Label.record_id <= rows[-1].record_id,
            )
        )
        if record_id in ids  # one range read, not an IN list; other results keep theirs
    }
    wanted: dict[tuple[str, str], float] = {}
    statuses: list[dict[str, str]] = []
    for row, vector, given in zip(rows, scores.tolist(), chosen.tolist(), strict=True):
        labels = {
            (row.record_id, key): score
            for key, score, on in zip(keys, vector, given, strict=True)
            if on
        }
        wanted.update(labels)
        status = Outcome.LABELLED if labels else Outcome.BELOW_THRESHOLD
        if row.status != status:
            statuses.append({"record": row.record_id, "decided": str(status)})
    gone = [{"record": r, "key": k} for r, k in sorted(held - wanted.keys())]
    new = [
        {
            "record_id": r,
            "model_version": version,
            "label_key": k,
            "concept": "",  # the class's own (`schema.label_concept`)
            "confidence": wanted[r, k],
        }
        for r, k in sorted(wanted.keys() - held)
    ]
    if gone:
        connection.execute(
            sa.delete(Label).where(
                Label.record_id == sa.bindparam("record"),
                Label.model_version == version,
                Label.label_key == sa.bindparam("key"),
            ),
            gone,
        )
    if new:
        connection.execute(sa.insert(Label), new)
    if statuses:
        connection.execute(
            sa.update(Result)
            .where(
                Result.record_id == sa.bindparam("record"),
                Result.model_version == version,
            )
            .values(status=sa.bindparam("decided")),
            statuses,
        )
    changed.results += len(rows)
    changed.added += len(new)
    changed.removed += len(gone)
    changed.status_changed += len(statuses)
