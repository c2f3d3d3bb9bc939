"""A model version's labels decided again when its thresholds change (a recalibration).

`enrich model calibrate` keeps the model version (the weights are the same) and changes
its thresholds, which the next run registers. Until then labels of the version were made
by the old thresholds; after it, without this, the records classified before kept them
while new records got the new ones: one version, two rules, and an export or a publish
of the version shipped both under one `generator.version`, whose thresholds the README
says every label reached. So registering new thresholds (or a new top-k fallback, or
other class keys) decides every classified result of the version again from its stored
scores, by the rule the worker applies (`thresholds.decide`), and changes only what
differs: labels that no longer reach their threshold go, those that now do come (with
the score as their confidence, as the worker writes them), and a result's status follows
(`labelled` or `below_threshold`). The review items of those results, whose margins are
to the thresholds, are worked out again with them. The next publish then withdraws and
creates accordingly, as after any change of labels.

At Europeana's size that is tens of millions of results, so it is not done in the
registration's transaction (about an hour there, holding every batch write of the
version). The registration only sets the version's cursor (`models.relabel_after`: ""
for "from the first record"); `relabel_some` then brings `CHUNK` results after it in
line per transaction, in record order, and moves the cursor on, until none is left and
the cursor is cleared. Each chunk writes the version's row first, so batches of the
version being written wait for one chunk at most (they read that row FOR SHARE:
`store.batches.as_registered`), and takes its records' rows in id order before any
result, as the batch writes do: no deadlock with a batch of another version flagging
which result is current. Interrupted, the next caller goes on from the cursor; a
registration changing the rule again starts it over.

Meanwhile batches are decided by the registered rule as they are stored, so only the
results not yet passed may carry the old one. The run that registered finishes the
work before it schedules anything (`runs.service`), `enrich resume` before it pages on,
and export and publish, which ship labels, before they read any (`finish_relabelling`).
A classified result without stored scores, or with a vector of another length than the
classes (no model writes either), keeps its labels.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import sqlalchemy as sa
from tqdm import tqdm

from enrichment.store.columns import among, packed_scores, score_matrix
from enrichment.store.current import CLASSIFIED
from enrichment.store.database import Database
from enrichment.store.models import ModelClasses, model_classes
from enrichment.store.review_index import (
    items_from_results,
    items_of,
    lock_records,
    replace_items,
)
from enrichment.store.schema import Label, ModelRow, Outcome, Result
from enrichment.thresholds import decide

CHUNK = 2000  # results decided again per transaction
PART = 400  # values per IN list
MODELS = ModelRow.__table__


@dataclass
class Relabelled:
    """What deciding a version's labels again changed."""

    results: int = 0  # classified results decided again
    added: int = 0
    removed: int = 0
    status_changed: int = 0


def relabelling_versions(db: Database) -> list[str]:
    """The versions whose labels are still being decided again: one read of `models`,
    cheap enough for every page that shows labels to say so."""
    with db.transaction() as session:
        return list(
            session.scalars(
                sa.select(ModelRow.version)
                .where(ModelRow.relabel_after.is_not(None))
                .order_by(ModelRow.version)
            )
        )


def pending_relabelling(db: Database) -> dict[str, int]:
    """The versions whose labels are still being decided again, with how many of their
    classified results are left (one count over the rest of each version's results)."""
    with db.transaction() as session:
        cursors = session.execute(
            sa.select(ModelRow.version, ModelRow.relabel_after)
            .where(ModelRow.relabel_after.is_not(None))
            .order_by(ModelRow.version)
        ).all()
        return {
            version: session.execute(
                sa.select(sa.func.count()).where(*_left(version, after))
            ).scalar_one()
            for version, after in cursors
        }


def finish_relabelling(
    db: Database, versions: Iterable[str] | None = None
) -> dict[str, Relabelled]:
    """Decide again what is left of these versions' labels (of every version pending,
    without `versions`), a chunk per transaction; what changed, by version.

    Shows a progress bar on a terminal: at Europeana's size this takes a while."""
    pending = pending_relabelling(db)
    chosen = pending if versions is None else [v for v in dict.fromkeys(versions) if v in pending]
    done: dict[str, Relabelled] = {}
    for version in chosen:
        changed = Relabelled()
        with tqdm(
            total=pending[version],
            desc=f"labels of {version} decided again (new thresholds)",
            unit=" results",
            disable=None,  # off where stderr is not a terminal: logs, workers, tests
        ) as bar:
            while relabel_some(db, version, changed):
                bar.update(changed.results - bar.n)
            bar.update(changed.results - bar.n)
        done[version] = changed
    return done


def relabel_some(db: Database, version: str, changed: Relabelled) -> bool:
    """Decide again the next chunk of the version's results after its cursor, in one
    transaction, adding to `changed`; False once none is left (the cursor cleared)."""
    with db.transaction() as session:
        connection = session.connection()
        # A write first: on PostgreSQL it holds the version's row against batch writes
        # and other relabellers until commit (so no result of the version is written
        # meanwhile); on SQLite it takes the write lock at once.
        after = connection.execute(
            sa.update(MODELS)
            .where(MODELS.c.version == version, MODELS.c.relabel_after.is_not(None))
            .values(relabel_after=MODELS.c.relabel_after)
            .returning(MODELS.c.relabel_after)
        ).scalar_one_or_none()
        if after is None:
            return False
        ids = connection.scalars(
            sa.select(Result.record_id)
            .where(*_left(version, after))
            .order_by(Result.record_id)
            .limit(CHUNK)
        ).all()
        if ids:
            # Their records first, as every writer of results takes them: which result is
            # current cannot change under the items written below.
            lock_records(connection, ids)
            dialect = connection.dialect.name
            rows = connection.execute(
                sa.select(
                    Result.record_id,
                    packed_scores(Result.scores, dialect),
                    Result.status,
                    Result.is_current,
                )
                .where(*_left(version, after), Result.record_id <= ids[-1])
                .order_by(Result.record_id)
            ).all()
            model = model_classes(connection)[version]
            # A vector of another length than the classes (the store takes one, though no
            # model gives one) cannot be decided again: its result keeps its labels, as one
            # without scores does, and its items are worked out from them.
            whole = [len(row[1]) == len(model.keys) for row in rows]
            full = [row for row, is_whole in zip(rows, whole, strict=True) if is_whole]
            kept = [
                (row.record_id, version)
                for row, is_whole in zip(rows, whole, strict=True)
                if row.is_current and not is_whole
            ]
            scores = score_matrix([row[1] for row in full], dialect, len(model.keys))
            labelled = _relabel(connection, model, full, scores, changed)
            current = [i for i, row in enumerate(full) if row.is_current]
            replace_items(
                connection,
                [row.record_id for row in rows if row.is_current],
                items_of(
                    [full[i].record_id for i in current], model, scores[current], labelled[current]
                )
                + items_from_results(connection, kept, {version: model}, Result.__table__),
            )
            changed.results += len(rows)
        cursor = ids[-1] if len(ids) == CHUNK else None
        connection.execute(
            sa.update(MODELS).where(MODELS.c.version == version).values(relabel_after=cursor)
        )
        return cursor is not None


def _left(version: str, after: str) -> list[sa.ColumnElement[bool]]:
    """The version's classified results after the cursor: those still to decide again."""
    return [
        Result.model_version == version,
        Result.status.in_([str(status) for status in CLASSIFIED]),
        Result.scores.is_not(None),
        Result.record_id > after,
    ]


def _relabel(
    connection: sa.Connection,
    model: ModelClasses,
    rows: Sequence[sa.Row],
    scores: np.ndarray,
    changed: Relabelled,
) -> np.ndarray:
    """One chunk of results (in record order, `scores` their vectors as rows): their labels
    and statuses brought in line with the model's registered rule; returns which classes
    each is now labelled with."""
    version = model.version
    if not rows:
        return np.zeros((0, len(model.keys)), dtype=bool)
    chosen = decide(scores, np.asarray(model.thresholds, dtype=np.float64), model.top_k_fallback)
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
    found, classes = np.nonzero(chosen)
    wanted = {
        (rows[row].record_id, model.keys[index]): score
        for row, index, score in zip(
            found.tolist(), classes.tolist(), scores[found, classes].tolist(), strict=True
        )
    }
    statuses: dict[Outcome, list[str]] = {Outcome.LABELLED: [], Outcome.BELOW_THRESHOLD: []}
    for row, any_label in zip(rows, chosen.any(axis=1).tolist(), strict=True):
        status = Outcome.LABELLED if any_label else Outcome.BELOW_THRESHOLD
        if row.status != status:
            statuses[status].append(row.record_id)
    gone = sorted(held - wanted.keys())
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
    for part in _parts(gone):
        connection.execute(
            sa.delete(Label).where(
                Label.model_version == version,
                sa.tuple_(Label.record_id, Label.label_key).in_(part),
            )
        )
    if new:
        connection.execute(sa.insert(Label), new)
    for status, record_ids in statuses.items():
        for part in _parts(record_ids):
            connection.execute(
                sa.update(Result)
                .where(
                    Result.model_version == version,
                    among(Result.record_id, part, connection.dialect.name),
                )
                .values(status=str(status))
            )
    changed.added += len(new)
    changed.removed += len(gone)
    changed.status_changed += sum(map(len, statuses.values()))
    return chosen


def _parts(values: Sequence[Any]) -> Iterator[Sequence[Any]]:
    """At most `PART` values at a time: an IN list well under SQLite's variable limit."""
    for start in range(0, len(values), PART):
        yield values[start : start + PART]
