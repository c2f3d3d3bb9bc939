"""Curators' decisions recorded and taken back, one transaction each, and read as they stand.

`record_decisions` checks every decision against the model's classes, its
results and its labels before storing any (accept is for a label the model
gave, add for one it did not), and, where the decision says what the curator
was shown (`seen`), against what stands now: a decision made meanwhile in
another tab or by another curator is a conflict (`DecidedMeanwhile`), not
silently overturned. `take_back_decisions` is a curator's undo, a row of its
own; `recent_decisions` what a curator may still take back; `standing_on`
what stands now on some records, for a page to show it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session

from enrichment.errors import EnrichError, InvalidValue
from enrichment.store.database import Database
from enrichment.store.locks import scope_key
from enrichment.store.models import model_classes
from enrichment.store.reviews import TAKE_BACK, Decision, Review, latest_decisions, standing
from enrichment.store.schema import Label, Result

LOOKUP_CHUNK = 500  # record ids per IN (...) list, well under SQLite's variable limit
# What a page shows of an item no decision stands on.
PENDING = "pending"
# Taken for each transaction that records decisions (PostgreSQL): the check of what stands
# and the new rows are one step, so two tabs deciding one item at once cannot both pass it.
# SQLite's transaction takes the database's write lock first instead (`_one_step`).
DECISIONS_LOCK = scope_key({"lock": "review decisions"})


def standing_decisions(db: Database, audit_only: bool = False) -> dict[tuple[str, str], str]:
    """The decision that counts per (record, class key) (with `audit_only`, in the audit sample)."""
    latest = latest_decisions(audit_only)
    with db.transaction() as session:
        rows = session.execute(sa.select(latest.c.record_id, latest.c.label_key, latest.c.decision))
        return {(record_id, key): decision for record_id, key, decision in rows}


@dataclass(frozen=True)
class NewDecision:
    """One decision to record: on a class of a record's result, by a reviewer."""

    record_id: str
    label_key: str
    model_version: str
    decision: str
    reviewer: str
    audit: bool = False
    # What the curator was shown as standing on the item (`PENDING` or a decision); None
    # (a script, an import) decides whatever stands.
    seen: str | None = None


@dataclass(frozen=True)
class StandingDecision:
    """The decision that counts on one class of a record: what, by whom, when."""

    record_id: str
    label_key: str
    decision: str
    reviewer: str
    audit: bool
    decided_at: datetime

    def as_json(self) -> dict[str, object]:
        document = asdict(self)
        document["decided_at"] = self.decided_at.isoformat() + "Z"
        return document


class DecidedMeanwhile(EnrichError):
    """Decisions sent on what the curator saw, which has changed since: nothing was stored,
    and `conflicts` says what stands now on each (`decision` None: taken back to pending)."""

    def __init__(self, conflicts: list[tuple[str, str, StandingDecision | None]]) -> None:
        record_id, key, _ = conflicts[0]
        more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
        super().__init__(f"{key} of {record_id}{more} was decided meanwhile: nothing was saved")
        self.conflicts = conflicts


def record_decisions(db: Database, decisions: Sequence[NewDecision]) -> list[int]:
    """Store decisions after checking each against the model's own labels; returns their ids.

    accept is for a label the model gave, add for one it did not (a missed
    label), reject for either: so an accept is a true positive, an add a
    false negative, and a reject a false positive or a confirmed negative.
    One transaction: either every decision is stored, or none; none either if any says
    it was made on a state (`seen`) that no longer stands (`DecidedMeanwhile`).
    """
    with db.transaction() as session:
        _one_step(session, db.dialect)
        models = model_classes(session)
        for decision in decisions:
            if decision.decision not in tuple(Decision):
                raise InvalidValue(
                    "decision",
                    f"decision must be one of {', '.join(Decision)}, not {decision.decision!r}",
                )
            model = models.get(decision.model_version)
            if model is None:
                raise InvalidValue(
                    "model_version", f"unknown model version {decision.model_version}"
                )
            if decision.label_key not in model.keys:
                raise InvalidValue(
                    "label_key", f"model {model.version} has no class {decision.label_key!r}"
                )
        results, labels = _results_and_labels(
            session, [(decision.record_id, decision.model_version) for decision in decisions]
        )
        reviews = []
        for decision in decisions:
            if (decision.record_id, decision.model_version) not in results:
                raise InvalidValue(
                    "record_id",
                    f"record {decision.record_id} has no result of model {decision.model_version}",
                )
            labelled = (decision.record_id, decision.model_version, decision.label_key) in labels
            if decision.decision == Decision.ACCEPT and not labelled:
                raise InvalidValue(
                    "decision",
                    f"{decision.label_key} is not a label of {decision.record_id}: add it instead",
                )
            if decision.decision == Decision.ADD and labelled:
                raise InvalidValue(
                    "decision",
                    f"{decision.label_key} is already a label of {decision.record_id}: accept it",
                )
            reviews.append(
                Review(
                    record_id=decision.record_id,
                    label_key=decision.label_key,
                    model_version=decision.model_version,
                    decision=decision.decision,
                    reviewer=decision.reviewer,
                    audit=decision.audit,
                )
            )
        _check_seen(session, decisions)
        session.add_all(reviews)  # inserted in this order, so ids follow the decisions' order
        session.flush()
        return [review.id for review in reviews]


def _one_step(session: Session, dialect: str) -> None:
    """Make this transaction's check of what stands and its writes one step: another
    transaction recording decisions waits until this one has ended, then reads its rows.

    PostgreSQL: a transaction advisory lock. SQLite: the write lock, taken as the
    transaction begins (BEGIN IMMEDIATE, waiting out the busy timeout as any write does);
    without it the driver begins the transaction at the first INSERT, after the check,
    and two connections both read the item pending before either wrote. A conditional
    INSERT carrying the check would not do on PostgreSQL, where two at once both see no row.
    """
    if dialect == "postgresql":
        session.execute(sa.select(sa.func.pg_advisory_xact_lock(DECISIONS_LOCK)))
    elif dialect == "sqlite":
        session.connection().exec_driver_sql("BEGIN IMMEDIATE")


def _check_seen(session: Session, decisions: Sequence[NewDecision]) -> None:
    """Refuse the decisions if one was made on a state that no longer stands (for an audit
    decision, the audit's state: the auditor is shown the audit decisions only)."""
    conflicts = []
    for audit in (False, True):
        checked = [d for d in decisions if d.seen is not None and d.audit == audit]
        if not checked:
            continue
        now = _standing_on(session, {decision.record_id for decision in checked}, audit)
        for decision in checked:
            standing = now.get((decision.record_id, decision.label_key))
            if (standing.decision if standing else PENDING) != decision.seen:
                conflicts.append((decision.record_id, decision.label_key, standing))
    if conflicts:
        raise DecidedMeanwhile(conflicts)


def standing_on(
    db: Database, record_ids: Iterable[str], audit_only: bool = False
) -> list[StandingDecision]:
    """The decisions that stand now on every class of these records (with `audit_only`,
    the audit decisions, which is what an audit page shows)."""
    with db.transaction() as session:
        return list(_standing_on(session, set(record_ids), audit_only).values())


def _standing_on(
    session: Session, record_ids: set[str], audit_only: bool = False
) -> dict[tuple[str, str], StandingDecision]:
    """The last decision still standing per (record, class) of these records, by id: read
    through the (record, class) index from these records' rows alone, never a pass over
    every decision."""
    found: dict[tuple[str, str], Review] = {}
    ordered = sorted(record_ids)
    audit = [Review.audit.is_(True)] if audit_only else []
    for start in range(0, len(ordered), LOOKUP_CHUNK):
        rows = session.scalars(
            sa.select(Review)
            .where(Review.record_id.in_(ordered[start : start + LOOKUP_CHUNK]), standing(), *audit)
            .order_by(Review.id)
        )
        found.update(((row.record_id, row.label_key), row) for row in rows)
    return {
        key: StandingDecision(
            row.record_id, row.label_key, row.decision, row.reviewer, row.audit, row.decided_at
        )
        for key, row in found.items()
    }


def take_back_decisions(db: Database, ids: Sequence[int], reviewer: str | None = None) -> int:
    """Take back decisions (a slip of the key): the one before each counts again.

    Each take-back is a row of its own (decision `undo`, who, when, `reverses`), so the
    audit trail keeps both. Returns how many were taken back: ids that name no decision,
    a take-back, or one already taken back count for nothing.
    """
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise InvalidValue("ids", "undo needs the ids of the decisions to take back")
    with db.transaction() as session:
        targets = session.scalars(
            sa.select(Review).where(Review.id.in_(sorted(set(ids))), standing()).order_by(Review.id)
        ).all()
        session.add_all(
            Review(
                record_id=target.record_id,
                label_key=target.label_key,
                model_version=target.model_version,
                decision=TAKE_BACK,
                reviewer=reviewer or target.reviewer,
                audit=target.audit,
                reverses=target.id,
            )
            for target in targets
        )
        return len(targets)


@dataclass(frozen=True)
class RecentDecision:
    """A decision as a curator's "recent" list shows it, with whether it still stands."""

    id: int
    record_id: str
    label_key: str
    model_version: str
    decision: str
    decided_at: datetime
    taken_back: bool

    def as_json(self) -> dict[str, object]:
        document = asdict(self)
        document["decided_at"] = self.decided_at.isoformat() + "Z"
        return document


def recent_decisions(db: Database, reviewer: str, limit: int = 50) -> list[RecentDecision]:
    """A reviewer's latest decisions, newest first, each with whether it was taken back."""
    taken = sa.select(Review.reverses).where(Review.reverses.is_not(None))
    with db.transaction() as session:
        rows = session.execute(
            sa.select(Review, Review.id.in_(taken).label("taken_back"))
            .where(Review.reviewer == reviewer, Review.decision != TAKE_BACK)
            .order_by(Review.id.desc())
            .limit(limit)
        ).all()
        return [
            RecentDecision(
                review.id,
                review.record_id,
                review.label_key,
                review.model_version,
                review.decision,
                review.decided_at,
                bool(taken_back),
            )
            for review, taken_back in rows
        ]


@dataclass(frozen=True)
class ResultsAndLabels:
    """Of some (record, model version) pairs: those with a result, and the labels it gave."""

    results: set[tuple[str, str]]
    labels: set[tuple[str, str, str]]  # (record, model version, class key)


def results_and_labels(db: Database, pairs: Iterable[tuple[str, str]]) -> ResultsAndLabels:
    """Which of these (record, model version) pairs have a result, and the labels given;
    a few queries for a whole Label Studio import rather than two per decision."""
    with db.transaction() as session:
        results, labels = _results_and_labels(session, pairs)
    return ResultsAndLabels(results, labels)


def _results_and_labels(
    session: Session, pairs: Iterable[tuple[str, str]]
) -> tuple[set[tuple[str, str]], set[tuple[str, str, str]]]:
    wanted: dict[str, set[str]] = {}
    for record_id, version in pairs:
        wanted.setdefault(version, set()).add(record_id)
    results: set[tuple[str, str]] = set()
    labels: set[tuple[str, str, str]] = set()
    for version, record_ids in wanted.items():
        ordered = sorted(record_ids)
        for start in range(0, len(ordered), LOOKUP_CHUNK):
            chunk = ordered[start : start + LOOKUP_CHUNK]
            results.update(
                (record_id, version)
                for record_id in session.scalars(
                    sa.select(Result.record_id).where(
                        Result.model_version == version, Result.record_id.in_(chunk)
                    )
                )
            )
            labels.update(
                (row.record_id, version, row.label_key)
                for row in session.execute(
                    sa.select(Label.record_id, Label.label_key).where(
                        Label.model_version == version, Label.record_id.in_(chunk)
                    )
                )
            )
    return results, labels
