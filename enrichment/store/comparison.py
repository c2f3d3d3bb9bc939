"""Two model versions side by side, on the records both classified: the reads of a comparison.

`enrich model compare A B` (`model/compare.py`) asks, per class: which labels B
adds, removes and keeps against A (`label_changes`, counted in SQL), how the
scores move (`score_pairs`, streamed: one pair of score vectors at a time),
and how often curators agreed with each version's labels (`reviewed_labels`,
driven by the decisions, which are few). The same reviewed counts over all of
a version's labels feed the publishing gate.

Only records that both versions classified count (a result that is not an
error, `store.current.CLASSIFIED`): a record one of them failed to fetch says
nothing about how they differ. A curator's decision is on (record, class),
whichever version showed it (`store.reviews`), so a decision made while
reviewing A judges B's label of the same class on the same record too.

`disagreements` hands the labels A and B disagree on to review;
`disagree_condition` is the same rule as an SQL condition for the review
queue's filter.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import sqlalchemy as sa
from sqlalchemy.orm import aliased

from enrichment.errors import InvalidValue
from enrichment.store.current import CLASSIFIED
from enrichment.store.database import Database
from enrichment.store.models import ModelClasses, model_classes
from enrichment.store.reviews import Decision, latest_decisions
from enrichment.store.schema import Label, Result

STREAM = {"stream_results": True, "yield_per": 2000}


@dataclass(frozen=True)
class LabelChanges:
    """Of one class on the records both versions classified: B's labels against A's."""

    added: int = 0  # B gives it, A did not
    removed: int = 0  # A gave it, B does not
    kept: int = 0  # both give it


class Reviewed(NamedTuple):
    """A version's labels of one class that carry a curator's decision, and the right ones."""

    reviewed: int
    correct: int


class Disagreement(NamedTuple):
    """A label one of the two versions gives a record and the other does not."""

    record_id: str
    label_key: str
    labelled_by: str  # the version that gives it


def versions_compared(db: Database, a: str, b: str) -> tuple[ModelClasses, ModelClasses]:
    """The two versions' classes; an unknown version is an InvalidValue naming it."""
    with db.transaction() as session:
        models = model_classes(session)
    for field, version in (("version_a", a), ("version_b", b)):
        if version not in models:
            known = ", ".join(sorted(models)) or "none yet"
            raise InvalidValue(field, f"unknown model version {version} (known: {known})")
    if a == b:
        raise InvalidValue("version_b", f"compare {a} with another version, not with itself")
    return models[a], models[b]


def _classified_by(version: str, record_id: sa.ColumnElement[str]) -> sa.Exists:
    """The record has a result of `version` that is not an error (one primary-key lookup)."""
    other = aliased(Result)
    return (
        sa.select(other.record_id)
        .where(
            other.record_id == record_id,
            other.model_version == version,
            other.status.in_(CLASSIFIED),
        )
        .exists()
    )


def common_records(db: Database, a: str, b: str) -> int:
    """How many records both versions classified."""
    query = sa.select(sa.func.count()).where(
        Result.model_version == a,
        Result.status.in_(CLASSIFIED),
        _classified_by(b, Result.record_id),
    )
    with db.transaction() as session:
        return session.execute(query).scalar_one()


def label_changes(db: Database, a: str, b: str) -> dict[str, LabelChanges]:
    """Per class key: labels added, removed and kept from A to B, on the common records."""
    mine, theirs = aliased(Label), aliased(Label)
    # A's labels, each with B's label of the same class on the record, if any.
    of_a = (
        sa.select(mine.label_key, sa.func.count(), sa.func.count(theirs.record_id))
        .outerjoin(
            theirs,
            (theirs.record_id == mine.record_id)
            & (theirs.model_version == b)
            & (theirs.label_key == mine.label_key),
        )
        .where(mine.model_version == a, _classified_by(b, mine.record_id))
        .group_by(mine.label_key)
    )
    # B's labels that A does not give.
    new_in_b = (
        sa.select(theirs.label_key, sa.func.count())
        .where(
            theirs.model_version == b,
            _classified_by(a, theirs.record_id),
            ~sa.select(mine.record_id)
            .where(
                mine.record_id == theirs.record_id,
                mine.model_version == a,
                mine.label_key == theirs.label_key,
            )
            .exists(),
        )
        .group_by(theirs.label_key)
    )
    counts: dict[str, dict[str, int]] = {}
    with db.transaction() as session:
        for key, total, kept in session.execute(of_a):
            counts.setdefault(key, {}).update(removed=total - kept, kept=kept)
        for key, added in session.execute(new_in_b):
            counts.setdefault(key, {})["added"] = added
    return {key: LabelChanges(**values) for key, values in counts.items()}


def score_pairs(db: Database, a: str, b: str) -> Iterator[tuple[list[float], list[float]]]:
    """(A's scores, B's scores) of each common record, streamed in chunks (flat memory)."""
    mine, theirs = aliased(Result), aliased(Result)
    query = sa.select(mine.scores, theirs.scores).join(
        theirs,
        (theirs.record_id == mine.record_id)
        & (theirs.model_version == b)
        & theirs.status.in_(CLASSIFIED),
    )
    query = query.where(mine.model_version == a, mine.status.in_(CLASSIFIED))
    with db.transaction() as session:
        for scores_a, scores_b in session.connection().execute(query, execution_options=STREAM):
            if scores_a is not None and scores_b is not None:
                yield scores_a, scores_b


def reviewed_labels(
    db: Database, version: str | None = None, on_records_of: str | None = None
) -> dict[tuple[str, str], Reviewed]:
    """Per (model version, class key): its labels with a standing decision, and how many
    were right (accepted, or added by a curator on another version's result).

    `version` narrows to one version; `on_records_of` to records that version
    also classified (a comparison's common records). Read from the decisions
    outwards, so the cost follows the number of reviews, not of labels.
    """
    decisions = latest_decisions()
    correct = sa.case((decisions.c.decision.in_(Decision.POSITIVE), 1), else_=0)
    query = (
        sa.select(Label.model_version, Label.label_key, sa.func.count(), sa.func.sum(correct))
        .select_from(decisions)
        .join(
            Label,
            (Label.record_id == decisions.c.record_id) & (Label.label_key == decisions.c.label_key),
        )
        .group_by(Label.model_version, Label.label_key)
    )
    if version is not None:
        query = query.where(Label.model_version == version)
    if on_records_of is not None:
        query = query.where(_classified_by(on_records_of, Label.record_id))
    with db.transaction() as session:
        return {
            (row_version, key): Reviewed(int(reviewed), int(right or 0))
            for row_version, key, reviewed, right in session.execute(query)
        }


def disagree_condition(
    record_id: sa.ColumnElement[str], label_key: sa.ColumnElement[str], a: str, b: str
) -> sa.ColumnElement[bool]:
    """SQL: both versions classified the record, and exactly one of them gives it this label.

    For a review queue filter "A and B disagree": `query.where(disagree_condition(...))`
    over the queue's record and class columns.
    """

    def gives(version: str) -> sa.Exists:
        label = aliased(Label)  # the caller's columns may be the labels table's own
        return (
            sa.select(label.record_id)
            .where(
                label.record_id == record_id,
                label.model_version == version,
                label.label_key == label_key,
            )
            .exists()
        )

    return _classified_by(a, record_id) & _classified_by(b, record_id) & (gives(a) != gives(b))


def disagreements(db: Database, a: str, b: str) -> Iterator[Disagreement]:
    """The labels A and B disagree on, on the records both classified, streamed by record."""
    mine, theirs = aliased(Label), aliased(Label)

    def only_in(first: type[Label], second: type[Label], by: str, other: str) -> sa.Select:
        return sa.select(first.record_id, first.label_key, sa.literal(by)).where(
            first.model_version == by,
            _classified_by(other, first.record_id),
            ~sa.select(second.record_id)
            .where(
                second.record_id == first.record_id,
                second.model_version == other,
                second.label_key == first.label_key,
            )
            .exists(),
        )

    union = sa.union_all(only_in(mine, theirs, a, b), only_in(theirs, mine, b, a)).subquery()
    query = sa.select(*union.c).order_by(*list(union.c)[:2])
    with db.transaction() as session:
        for row in session.connection().execute(query, execution_options=STREAM):
            yield Disagreement(*row)
