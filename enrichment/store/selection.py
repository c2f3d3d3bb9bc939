"""Which labels an export or a publish selects: the reads, streamed in flat memory.

A `Selection` narrows the labels every record's current result carries
(`store.current`: the one rule for which result counts). Labels come either
as stored (`stored_labels`: the `labels` table, every filter applied in SQL)
or as the score vectors they were decided from (`classified_scores`), for a
caller that decides again under other thresholds and then applies the label,
confidence and review filters itself (`review_keeps`: the same rule as the
SQL). Rows stream through a server-side cursor on PostgreSQL: an export of
every label holds one chunk of rows at a time.

`sample_ranks` orders records for a sample run (`enrich run --sample`).

The filter checks (`run_exists`, `known_models`, `unknown_datasets`) let the caller refuse a
selection that names nothing the database knows before it writes anything.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.orm import Session, aliased

from enrichment.store.current import CLASSIFIED, current_results
from enrichment.store.database import Database
from enrichment.store.models import ModelClasses, class_concepts, model_classes
from enrichment.store.reviews import TAKE_BACK, Decision, Review, latest_decisions, standing
from enrichment.store.schema import (
    Label,
    RecordRow,
    Result,
    Run,
    label_concept,
    of_datasets,
    record_item_uri,
    result_image_url,
)

# Rows per chunk of a streamed read.
STREAM_ROWS = 2000

# A run's checkpoint's list of the model versions it was moved from (`runs.move_run`).
MOVED_FROM = "moved_from"


@dataclass(frozen=True)
class Selection:
    """Which labels: every field narrows, the defaults select every current label.

    `reviewed` brings curators' last decisions in: `any` ignores them,
    `not-rejected` leaves out labels a curator rejected, `accepted` keeps
    only labels a curator accepted (or added).
    """

    datasets: Sequence[str] = ()
    run_id: int | None = None
    model_version: str | None = None
    since: datetime | None = None
    min_confidence: float | None = None
    labels: Sequence[str] = ()
    reviewed: str = "any"


class LabelRow(NamedTuple):
    """One label of one record's result, as an export reads it from the database.

    A named tuple rather than a dataclass: an export makes millions of them.
    """

    record_id: str
    item_uri: str
    image_url: str | None
    model_version: str
    label_key: str
    concept: str
    confidence: float
    classified_at: datetime


class ScoredResult(NamedTuple):
    """One record's current result with its whole score vector, in its model's class order."""

    record_id: str
    item_uri: str
    image_url: str | None
    model_version: str
    classified_at: datetime
    scores: list[float] | None


def run_exists(db: Database, run_id: int) -> bool:
    with db.transaction() as session:
        return session.execute(sa.select(Run.id).where(Run.id == run_id)).first() is not None


def run_versions(db: Database, run_id: int) -> list[str]:
    """The model versions a run's results may be of: its own, and those it was moved from
    (`store.runs.move_run`); none for a run that does not exist."""
    with db.transaction() as session:
        row = session.execute(
            sa.select(Run.model_version, Run.checkpoint).where(Run.id == run_id)
        ).first()
    if row is None:
        return []
    version, checkpoint = row
    return [version, *(checkpoint or {}).get(MOVED_FROM, [])]


def known_models(db: Database) -> dict[str, ModelClasses]:
    """Every registered model version's classes and own thresholds (`store.models`)."""
    with db.transaction() as session:
        return model_classes(session)


def unknown_datasets(db: Database, datasets: Sequence[str]) -> list[str]:
    """`datasets_without_records` in a transaction of its own."""
    with db.transaction() as session:
        return datasets_without_records(session, datasets)


def datasets_without_records(session: Session, datasets: Sequence[str]) -> list[str]:
    """The datasets of `datasets` that no record belongs to (each one lookup of a range of
    the records' primary key)."""
    return [
        dataset
        for dataset in sorted(set(datasets))
        if session.execute(
            sa.select(RecordRow.id).where(of_datasets(RecordRow.id, [dataset])).limit(1)
        ).first()
        is None
    ]


def count_left_out_by_reviews(db: Database, selection: Selection) -> int:
    """How many stored labels of the selection its `reviewed` rule leaves out (0 for `any`)."""
    if selection.reviewed == "any":
        return 0
    query = _labels_query(replace(selection, reviewed="any")).where(
        ~_reviewed_condition(Label.record_id, Label.label_key, selection.reviewed)
    )
    with db.transaction() as session:
        return session.execute(
            sa.select(sa.func.count()).select_from(query.subquery())
        ).scalar_one()


def stored_labels(db: Database, selection: Selection) -> Iterator[LabelRow]:
    """The selected stored labels, ordered by record, model version and label key."""
    query = _labels_query(selection).order_by(Label.record_id, Label.model_version, Label.label_key)
    with db.transaction() as session:
        concepts = class_concepts(session)
    for record_id, item_uri, image_url, version, key, concept, confidence, at in _stream(db, query):
        concept = label_concept(concept, concepts.get((version, key)))
        yield LabelRow(record_id, item_uri, image_url, version, key, concept, confidence, at)


def _labels_query(selection: Selection) -> sa.Select:
    """The selected stored labels, unordered: every filter of the selection in SQL."""
    chosen = current_results(selection.datasets, selection.run_id, selection.model_version)
    query = (
        sa.select(
            Label.record_id,
            record_item_uri(RecordRow.item_uri, RecordRow.id).label("item_uri"),
            result_image_url(chosen.c.image_url, RecordRow.image_url),
            Label.model_version,
            Label.label_key,
            Label.concept,
            Label.confidence,
            chosen.c.classified_at,
        )
        .join(
            chosen,
            (chosen.c.record_id == Label.record_id)
            & (chosen.c.model_version == Label.model_version),
        )
        .join(RecordRow, RecordRow.id == Label.record_id)
    )
    query = _in_datasets(query, selection)
    if selection.since is not None:
        query = query.where(chosen.c.classified_at >= selection.since)
    if selection.labels:
        query = query.where(Label.label_key.in_(selection.labels))
    if selection.min_confidence is not None:
        query = query.where(Label.confidence >= selection.min_confidence)
    if selection.reviewed != "any":
        query = query.where(
            _reviewed_condition(Label.record_id, Label.label_key, selection.reviewed)
        )
    return query


def _in_datasets(query: sa.Select, selection: Selection) -> sa.Select:
    """The selection's datasets on the records joined for their item URI too (`current_results`
    applies them to the results): the database can then start from the datasets' records
    (ranges of their primary key) rather than read every record to join them."""
    if not selection.datasets:
        return query
    return query.where(of_datasets(RecordRow.id, selection.datasets))


def classified_scores(db: Database, selection: Selection) -> Iterator[ScoredResult]:
    """The selected records' current results with their scores, ordered by record and version.

    Only the selection's datasets, run, model version and `since` apply here:
    which labels the scores give, and so the label, confidence and review
    filters, are the caller's to decide.
    """
    chosen = current_results(selection.datasets, selection.run_id, selection.model_version)
    query = (
        sa.select(
            chosen.c.record_id,
            record_item_uri(RecordRow.item_uri, RecordRow.id).label("item_uri"),
            result_image_url(chosen.c.image_url, RecordRow.image_url),
            chosen.c.model_version,
            chosen.c.classified_at,
            Result.scores,
        )
        .join(RecordRow, RecordRow.id == chosen.c.record_id)
        .join(
            Result,
            (Result.record_id == chosen.c.record_id)
            & (Result.model_version == chosen.c.model_version),
        )
        .order_by(chosen.c.record_id, chosen.c.model_version)
    )
    query = _in_datasets(query, selection)
    if selection.since is not None:
        query = query.where(chosen.c.classified_at >= selection.since)
    yield from (ScoredResult(*row) for row in _stream(db, query))


def last_decisions(db: Database) -> dict[tuple[str, str], str]:
    """(record, label key) -> its last decision; curators' decisions are few enough to hold."""
    decisions = latest_decisions()
    query = sa.select(decisions.c.record_id, decisions.c.label_key, decisions.c.decision)
    with db.transaction() as session:
        return {(record, key): decision for record, key, decision in session.execute(query)}


def review_keeps(decision: str | None, reviewed: str) -> bool:
    """Whether a label with this last decision passes `reviewed`; the SQL form is below."""
    if reviewed == "accepted":
        return decision in Decision.POSITIVE
    return reviewed == "any" or decision != Decision.REJECT


def _reviewed_condition(
    record_id: sa.ColumnElement[str], label_key: sa.ColumnElement[str], reviewed: str
) -> sa.ColumnElement[bool]:
    """`review_keeps` in SQL: the label's last decision is positive, or is not a rejection.

    The last decision is looked up for this label alone (the reviews' (record, class)
    index, then its take-backs by `reverses`), so the check costs the same per label
    whatever the number of labels or decisions.
    """
    taken_back = aliased(Review)
    last = (
        sa.select(Review.decision)
        .where(
            Review.record_id == record_id,
            Review.label_key == label_key,
            Review.decision != TAKE_BACK,
            ~sa.select(taken_back.id).where(taken_back.reverses == Review.id).exists(),
        )
        .order_by(Review.id.desc())
        .limit(1)
        .scalar_subquery()
    )
    decision = sa.func.coalesce(last, "")  # none: "", never NULL, so the negation holds
    if reviewed == "accepted":
        return decision.in_(Decision.POSITIVE)
    return decision != Decision.REJECT


def _stream(db: Database, query: sa.Select) -> Iterator[Any]:
    """Rows fetched in chunks through a server-side cursor (PostgreSQL) or SQLite's cursor.

    Executed on the transaction's connection: plain rows, without the ORM's
    per-row loading (a third of an export's time). The transaction stays open
    while the caller consumes the rows, and ends (rolled back: nothing was
    written) when it stops early.
    """
    options = {"stream_results": True, "yield_per": STREAM_ROWS}
    with db.transaction() as session:
        yield from session.connection().execute(query, execution_options=options)


def sample_ranks(
    session: Session, record_ids: Sequence[str], version: str, seed: int
) -> dict[str, tuple[int, str]]:
    """Each record's place in a sample run drawn with `seed` for model `version`; lower first.

    First the records another version has classified and curators have
    reviewed (under that version), then those another version has classified,
    then the rest, so a new version's sample lands where it can be compared
    with the current one on judged labels. Within each tier the order is a
    hash of (seed, record id): the same seed draws the same records whatever
    order the source pages them in, and whatever this version has done since.
    """
    if not record_ids:
        return {}
    others = (
        sa.select(Result.record_id, Result.model_version)
        .where(
            Result.record_id.in_(record_ids),
            Result.model_version != version,
            Result.status.in_(CLASSIFIED),
        )
        .subquery("others")
    )
    classified = set(session.scalars(sa.select(others.c.record_id)))
    reviewed = set(
        session.scalars(
            sa.select(Review.record_id)
            .join(
                others,
                (others.c.record_id == Review.record_id)
                & (others.c.model_version == Review.model_version),
            )
            .where(standing())
            .distinct()
        )
    )
    return {
        record_id: (
            0 if record_id in reviewed else 1 if record_id in classified else 2,
            hashlib.sha256(f"{seed}\n{record_id}".encode()).hexdigest()[:16],
        )
        for record_id in record_ids
    }
