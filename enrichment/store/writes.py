"""The writes every stage shares: a batch's outcomes, and the models that produced them.

Writes are batched and idempotent: `save_outcomes` upserts a whole batch's
results and replaces its labels in one transaction, so a batch that runs twice
leaves the same rows. On PostgreSQL a batch is streamed with COPY into
session-local staging tables and merged with one `INSERT ... SELECT ... ON
CONFLICT` per table: COPY parses rows several times faster than multi-row
INSERTs, and the merge keeps the upsert's idempotence. SQLite, the embedded
default, upserts with multi-row INSERTs.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from enrichment.errors import DatabaseError
from enrichment.store import review_index
from enrichment.store.columns import scores_literal
from enrichment.store.schema import (
    Label,
    ModelRow,
    Outcome,
    RecordRow,
    Result,
    as_utc_naive,
    stored_item_uri,
    utc_now,
)


@dataclass(frozen=True)
class LabelScore:
    """One label a record gets from a model, with its confidence."""

    key: str
    concept: str
    confidence: float


@dataclass(frozen=True)
class RecordOutcome:
    """What happened to one record in one batch, ready to be stored."""

    record_id: str
    status: str
    scores: list[float] | None = None
    labels: list[LabelScore] = field(default_factory=list)
    error_reason: str | None = None
    error_message: str | None = None
    image_url: str | None = None
    image_sha256: str | None = None
    source_timestamp: datetime | None = None

    @classmethod
    def failed(
        cls, record_id: str, reason: str, message: str, image_url: str | None = None, **extra: Any
    ) -> RecordOutcome:
        return cls(
            record_id=record_id,
            status=Outcome.ERROR,
            error_reason=reason,
            error_message=message,
            image_url=image_url,
            **extra,
        )


NON_FINITE_SCORE = "non_finite_score"


def finite_or_failed(outcome: RecordOutcome) -> RecordOutcome:
    """The outcome as it is, or an error of its own when a score or confidence is NaN or ±inf.

    A non-finite number is not JSON: SQLite would keep `[NaN, ...]`, breaking every
    read that parses the scores, and PostgreSQL would refuse the whole batch. The
    record fails alone, with the scores left out, and the rest of the batch is kept.
    """
    numbers = [*(outcome.scores or ()), *(label.confidence for label in outcome.labels)]
    if all(math.isfinite(number) for number in numbers):
        return outcome
    return RecordOutcome.failed(
        outcome.record_id,
        NON_FINITE_SCORE,
        "the model gave a score that is not a finite number (NaN or infinite): "
        "its weights may have diverged in training",
        image_url=outcome.image_url,
        image_sha256=outcome.image_sha256,
        source_timestamp=outcome.source_timestamp,
    )


def upsert_statement(session: Session, table: sa.Table) -> Any:
    """An INSERT that can take ON CONFLICT clauses on either supported dialect."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise DatabaseError(f"unsupported database dialect {dialect}")


class SourceRecord(Protocol):
    """A record as a source gives it (`enrichment.sources.Record`), as the store reads it."""

    @property
    def id(self) -> str: ...
    @property
    def dataset(self) -> str: ...
    @property
    def item_uri(self) -> str: ...
    @property
    def image_url(self) -> str | None: ...
    @property
    def provider(self) -> str | None: ...
    @property
    def title(self) -> str | None: ...
    @property
    def timestamp_update(self) -> datetime | None: ...


RECORD_FIELDS = ("dataset", "item_uri", "image_url", "provider", "title", "timestamp_update")


def upsert_records(session: Session, records: Sequence[SourceRecord]) -> None:
    """Insert new records and bring known ones up to date; `first_seen` stays the first.

    An item URI that its id gives is stored NULL (`schema.stored_item_uri`).
    """
    if not records:
        return
    _keep_result_urls(session, records)
    now = utc_now()
    insert = upsert_statement(session, RecordRow.__table__)
    session.execute(
        insert.on_conflict_do_update(
            index_elements=["id"],
            set_={name: insert.excluded[name] for name in (*RECORD_FIELDS, "last_seen")},
        ),
        [
            {
                "id": record.id,
                "dataset": record.dataset,
                "item_uri": stored_item_uri(record.id, record.item_uri),
                "image_url": record.image_url,
                "provider": record.provider,
                "title": record.title,
                "timestamp_update": as_utc_naive(record.timestamp_update),
                "first_seen": now,
                "last_seen": now,
            }
            for record in records
        ],
    )


def _keep_result_urls(session: Session, records: Sequence[SourceRecord]) -> None:
    """Results that share their record's image URL (stored NULL) keep it when it changes.

    A result's URL is the one its image came from: a record whose URL changes
    leaves its results pointing at the old one, written out before the record
    takes the new one.
    """
    wanted = {record.id: record.image_url for record in records}
    known = session.execute(
        sa.select(RecordRow.id, RecordRow.image_url).where(RecordRow.id.in_(wanted))
    )
    changed = [record_id for record_id, url in known if url != wanted[record_id]]
    if not changed:
        return
    old_url = (
        sa.select(RecordRow.image_url).where(RecordRow.id == Result.record_id).scalar_subquery()
    )
    session.execute(
        sa.update(Result)
        .where(Result.record_id.in_(changed), Result.image_url.is_(None))
        .values(image_url=sa.func.coalesce(old_url, ""))
        .execution_options(synchronize_session=False)
    )


def class_concepts(connection: sa.Connection, model_version: str) -> dict[str, str]:
    """A model version's concept URI by class key (none: an unregistered version)."""
    classes = connection.execute(
        sa.select(ModelRow.classes).where(ModelRow.version == model_version)
    ).scalar()
    return {entry["key"]: entry["concept"] for entry in classes or ()}


def stored_concept(label: LabelScore, concepts: dict[str, str]) -> str:
    """What a label stores of its concept: "" when it is its class's (read back from the
    model's classes, `schema.label_concept`), else the concept itself."""
    return "" if concepts.get(label.key) == label.concept else label.concept


def stored_image_url(outcome_url: str | None, record_url: str | None) -> str | None:
    """What a result stores of its image URL: NULL when it is the record's, "" for none."""
    if outcome_url == record_url:
        return None
    return outcome_url or ""


def register_model(
    session: Session,
    version: str,
    name: str,
    architecture: str,
    classes: list[dict[str, str]],
    thresholds: list[float],
    top_k_fallback: int = 0,
) -> None:
    """Record a model version; registering it again updates how it decides labels (and the
    review index, whose margins are to the thresholds, when those change).

    Labels store their concept as "" where it is their class's (`stored_concept`): a class
    whose concept changes here first writes the old one into its labels.
    """
    before = session.execute(
        sa.select(ModelRow.classes, ModelRow.thresholds).where(ModelRow.version == version)
    ).first()
    now = {entry["key"]: entry["concept"] for entry in classes}
    for entry in before.classes if before is not None else ():
        if now.get(entry["key"]) != entry["concept"]:
            session.execute(
                sa.update(Label)
                .where(
                    Label.model_version == version,
                    Label.label_key == entry["key"],
                    Label.concept == "",
                )
                .values(concept=entry["concept"])
            )
    statement = upsert_statement(session, ModelRow.__table__).values(
        version=version,
        name=name,
        architecture=architecture,
        classes=classes,
        thresholds=thresholds,
        top_k_fallback=top_k_fallback,
        registered_at=utc_now(),
    )
    # Recalibration keeps the version (same weights) but changes thresholds: keep the latest.
    session.execute(
        statement.on_conflict_do_update(
            index_elements=["version"],
            set_={
                "classes": statement.excluded.classes,
                "thresholds": statement.excluded.thresholds,
                "top_k_fallback": statement.excluded.top_k_fallback,
            },
        )
    )
    if before is not None and (before.classes, before.thresholds) != (classes, list(thresholds)):
        review_index.rebuild_on(session.connection(), version)


RESULT_COLUMNS = (
    "record_id",
    "model_version",
    "run_id",
    "status",
    "error_reason",
    "error_message",
    "scores",
    "image_url",
    "image_sha256",
    "source_timestamp",
    "classified_at",
)
LABEL_COLUMNS = ("record_id", "model_version", "label_key", "concept", "confidence")
STAGED_URL = (
    "CASE WHEN s.image_url IS NOT DISTINCT FROM r.image_url THEN NULL"
    " ELSE coalesce(s.image_url, '') END"
)
STAGING = (
    # Temporary, so private to the session; emptied at each commit, so never merged twice.
    "CREATE TEMPORARY TABLE IF NOT EXISTS stage_results"
    " (LIKE results INCLUDING DEFAULTS) ON COMMIT DELETE ROWS;"
    " CREATE TEMPORARY TABLE IF NOT EXISTS stage_labels"
    " (LIKE labels INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
)


def save_outcomes(
    session: Session, run_id: int | None, model_version: str, outcomes: Sequence[RecordOutcome]
) -> None:
    """Upsert a batch of results and replace their labels, in the caller's transaction.

    A record that appears twice is written once, with its last outcome: one
    statement may not upsert the same row twice.
    """
    outcomes = [
        finite_or_failed(outcome)
        for outcome in {outcome.record_id: outcome for outcome in outcomes}.values()
    ]
    if not outcomes:
        return
    connection = session.connection()
    if connection.dialect.name == "postgresql" and connection.dialect.driver == "psycopg2":
        _copy_outcomes(connection, run_id, model_version, outcomes)
        return
    concepts = class_concepts(connection, model_version)
    now = utc_now()
    record_urls = dict(
        connection.execute(
            sa.select(RecordRow.id, RecordRow.image_url).where(
                RecordRow.id.in_([outcome.record_id for outcome in outcomes])
            )
        ).all()
    )
    rows = [
        {
            "record_id": outcome.record_id,
            "model_version": model_version,
            "run_id": run_id,
            "status": outcome.status,
            "error_reason": outcome.error_reason,
            "error_message": outcome.error_message,
            "scores": outcome.scores,
            "image_url": stored_image_url(outcome.image_url, record_urls.get(outcome.record_id)),
            "image_sha256": outcome.image_sha256,
            "source_timestamp": outcome.source_timestamp,
            "classified_at": now,
        }
        for outcome in outcomes
    ]
    # Core executemany on the session's connection: SQLAlchemy sends it as a few multi-row
    # INSERTs ("insertmanyvalues") from one cached compilation, without the ORM's bulk path.
    insert = upsert_statement(session, Result.__table__)
    updated = {
        name: insert.excluded[name]
        for name in rows[0]
        if name not in ("record_id", "model_version")
    }
    connection.execute(
        insert.on_conflict_do_update(index_elements=["record_id", "model_version"], set_=updated),
        rows,
    )
    record_ids = [outcome.record_id for outcome in outcomes]
    connection.execute(
        sa.delete(Label.__table__).where(
            Label.model_version == model_version, Label.record_id.in_(record_ids)
        )
    )
    label_rows = [
        {
            "record_id": outcome.record_id,
            "model_version": model_version,
            "label_key": label.key,
            "concept": stored_concept(label, concepts),
            "confidence": label.confidence,
        }
        for outcome in outcomes
        for label in outcome.labels
    ]
    if label_rows:
        connection.execute(sa.insert(Label.__table__), label_rows)
    review_index.refresh(connection, model_version, _for_index(outcomes))


def _for_index(outcomes: Sequence[RecordOutcome]) -> list[tuple[str, Any, list[str]]]:
    """(record, scores, labelled keys) of each outcome, as the review index takes them."""
    return [(o.record_id, o.scores, [label.key for label in o.labels]) for o in outcomes]


def _copy_outcomes(
    connection: sa.Connection,
    run_id: int | None,
    model_version: str,
    outcomes: Sequence[RecordOutcome],
) -> None:
    """PostgreSQL: COPY into the staging tables, then one merge per table."""
    # The staging tables' DDL and the model's classes in one round trip (the last
    # statement's rows are the answer).
    classes = connection.exec_driver_sql(
        STAGING + "; SELECT classes FROM models WHERE version = %s", (model_version,)
    ).scalar()
    concepts = {entry["key"]: entry["concept"] for entry in classes or ()}
    now = utc_now()
    results = _copy_text(
        (
            outcome.record_id,
            model_version,
            run_id,
            outcome.status,
            outcome.error_reason,
            outcome.error_message,
            None if outcome.scores is None else scores_literal(outcome.scores),
            outcome.image_url,
            None if outcome.image_sha256 is None else "\\x" + outcome.image_sha256,
            outcome.source_timestamp,
            now,
        )
        for outcome in outcomes
    )
    labels = _copy_text(
        (
            outcome.record_id,
            model_version,
            label.key,
            stored_concept(label, concepts),
            label.confidence,
        )
        for outcome in outcomes
        for label in outcome.labels
    )
    # The merges go through SQLAlchemy (its statement events see them); COPY needs the
    # driver's cursor, on the same connection and so in the same transaction.
    # No TRUNCATE: the staging tables empty at each commit, and rows left by an earlier
    # call in the same transaction would only be merged again to the same result.
    cursor = connection.connection.dbapi_connection.cursor()
    try:
        cursor.copy_expert(f"COPY stage_results ({', '.join(RESULT_COLUMNS)}) FROM STDIN", results)
        if labels.getvalue():
            cursor.copy_expert(f"COPY stage_labels ({', '.join(LABEL_COLUMNS)}) FROM STDIN", labels)
    finally:
        cursor.close()
    updated = ", ".join(f"{name} = EXCLUDED.{name}" for name in RESULT_COLUMNS[2:])  # not the key
    columns = ", ".join(RESULT_COLUMNS)
    # The image URL as `stored_image_url` has it, against the record's (a join by key).
    staged = ", ".join(
        STAGED_URL if name == "image_url" else f"s.{name}" for name in RESULT_COLUMNS
    )
    connection.exec_driver_sql(
        f"INSERT INTO results ({columns}) SELECT {staged} FROM stage_results s"
        " LEFT JOIN records r ON r.id = s.record_id"
        f" ON CONFLICT (record_id, model_version) DO UPDATE SET {updated}"
    )
    connection.exec_driver_sql(
        "DELETE FROM labels USING stage_results"
        " WHERE labels.model_version = stage_results.model_version"
        " AND labels.record_id = stage_results.record_id"
    )
    if labels.getvalue():
        columns = ", ".join(LABEL_COLUMNS)
        connection.exec_driver_sql(
            f"INSERT INTO labels ({columns}) SELECT {columns} FROM stage_labels"
        )
    review_index.refresh(connection, model_version, _for_index(outcomes), staged=True)


def _copy_text(rows: Iterable[tuple[Any, ...]]) -> io.StringIO:
    """Rows in COPY's text format: tab-separated, \\N for NULL, backslash escapes."""
    buffer = io.StringIO()
    for row in rows:
        buffer.write("\t".join(_copy_value(value) for value in row))
        buffer.write("\n")
    buffer.seek(0)
    return buffer


def _copy_value(value: Any) -> str:
    if value is None:
        return "\\N"
    if isinstance(value, datetime):
        return value.isoformat(sep=" ")
    if isinstance(value, float):
        return repr(value)
    return (
        str(value)
        .replace("\\", "\\\\")
        .replace("\t", "\\t")
        .replace("\n", "\\n")
        .replace("\r", "\\r")
    )
