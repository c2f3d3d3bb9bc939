"""The writes every stage shares: a batch's outcomes, and the models that produced them.

Writes are batched and idempotent: `save_outcomes` upserts a whole batch's
results and replaces its labels in one transaction, so a batch that runs twice
leaves the same rows. On PostgreSQL a batch is streamed with COPY into
session-local staging tables and merged with one `INSERT ... SELECT ... ON
CONFLICT` per table: COPY parses rows several times faster than multi-row
INSERTs, and the merge keeps the upsert's idempotence. The merges and the review
index's upkeep travel in the COPY's own query string, so a batch costs the server
one COPY exchange (two with labels). SQLite, the embedded default, upserts with multi-row
INSERTs.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from enrichment.errors import DatabaseError, InvalidValue
from enrichment.store import review_index
from enrichment.store.columns import NULL, copy_text, scores_literal
from enrichment.store.current import CLASSIFIED
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
    # A finite sum has only finite terms (NaN and ±inf carry through a sum), and costs one
    # pass in C; a sum that overflows is looked at number by number.
    if math.isfinite(sum(numbers)) or all(math.isfinite(number) for number in numbers):
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

    An item URI that its id gives is stored NULL (`schema.stored_item_uri`). Rows are
    written in id order, the order in which the writes of results lock them
    (`review_index.LOCK_RECORDS_SQL`), so that the two never wait for each other in a cycle.
    """
    if not records:
        return
    records = sorted(records, key=lambda record: record.id)
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
    """Record a model version; registering it again updates how it decides labels: when its
    thresholds (or top-k fallback, or class keys) change, its labels and review items are
    to be decided again from the stored scores, which `store.relabel` does a chunk at a
    time after this transaction.

    Labels store their concept as "" where it is their class's (`stored_concept`): a class
    whose concept changes here writes the old one into the labels it has, in the same
    transaction.
    """
    if len(thresholds) != len(classes):
        # The review index pairs them one to one, in SQL too, where a missing threshold
        # would silently drop its class.
        raise InvalidValue("thresholds", f"{len(thresholds)} thresholds for {len(classes)} classes")
    before = session.execute(
        sa.select(ModelRow.classes, ModelRow.thresholds, ModelRow.top_k_fallback).where(
            ModelRow.version == version
        )
    ).first()
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
    if before is None:
        return
    # The version's row is written (locked) before any of its labels: a batch being written
    # reads that row FOR SHARE first (`batches.as_registered`), so the two lock in one order.
    now = {entry["key"]: entry["concept"] for entry in classes}
    for entry in before.classes:
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
    keys_before = [entry["key"] for entry in before.classes]
    rule_before = (keys_before, before.thresholds, before.top_k_fallback or 0)
    if rule_before != ([entry["key"] for entry in classes], list(thresholds), top_k_fallback):
        # Decided again from the first record, a chunk per transaction (`store.relabel`).
        session.execute(
            sa.update(ModelRow).where(ModelRow.version == version).values(relabel_after="")
        )


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
# The staging table's one column besides the result's: the review index's sample key,
# a hash that PostgreSQL cannot compute (`review_index.sample_key`).
STAGED_COLUMNS = (*RESULT_COLUMNS, "sample_key")
LABEL_COLUMNS = ("record_id", "model_version", "label_key", "concept", "confidence")
STAGING = (
    # Temporary, so private to the session; emptied at each commit, so never merged twice.
    "CREATE TEMPORARY TABLE IF NOT EXISTS stage_results"
    " (LIKE results INCLUDING DEFAULTS, sample_key integer) ON COMMIT DELETE ROWS;"
    " CREATE TEMPORARY TABLE IF NOT EXISTS stage_labels"
    " (LIKE labels INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
)
# The image URL as `stored_image_url` has it, against the record's (a join by key).
STAGED_URL = (
    "CASE WHEN s.image_url IS NOT DISTINCT FROM r.image_url THEN NULL"
    " ELSE coalesce(s.image_url, '') END"
)
STAGED_RESULT = ", ".join(STAGED_URL if n == "image_url" else f"s.{n}" for n in RESULT_COLUMNS)
# A result just written is flagged current if it is classified: it is the record's latest,
# nearly always. `review_index.staged_sql` then sets the flags that the rule gives otherwise
# (an error, whose record's current result is another version's; a tie), so the usual
# result is written once, not written and then flagged.
CLASSIFIED_NOW = f"s.status IN ({', '.join(repr(str(status)) for status in CLASSIFIED)})"
UPDATED = ", ".join(
    f"{name} = EXCLUDED.{name}"
    for name in (*RESULT_COLUMNS[2:], "is_current")  # not the key
)
# The merges of the staging tables into `results` and `labels`. No TRUNCATE: the staging
# tables empty at each commit, and rows left by an earlier call in the same transaction
# are only merged again to the same result. A label's concept is stored as
# `stored_concept` has it ("" where it is its class's), each model's classes parsed once
# (MATERIALIZED), not once per label.
MERGES = f"""
INSERT INTO results ({", ".join(RESULT_COLUMNS)}, is_current)
SELECT {STAGED_RESULT}, {CLASSIFIED_NOW}
FROM stage_results s LEFT JOIN records r ON r.id = s.record_id
ON CONFLICT (record_id, model_version) DO UPDATE SET {UPDATED};
DELETE FROM labels USING stage_results s
WHERE labels.model_version = s.model_version AND labels.record_id = s.record_id;
WITH classes AS MATERIALIZED (
    SELECT m.version, class ->> 'key' AS key, class ->> 'concept' AS concept
    FROM models m CROSS JOIN LATERAL json_array_elements(m.classes) AS class
    WHERE m.version IN (SELECT model_version FROM stage_labels)
)
INSERT INTO labels ({", ".join(LABEL_COLUMNS)})
SELECT s.record_id, s.model_version, s.label_key,
    CASE WHEN s.concept = c.concept THEN '' ELSE s.concept END, s.confidence
FROM stage_labels s
LEFT JOIN classes c ON c.version = s.model_version AND c.key = s.label_key
"""


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
            "is_current": outcome.status in CLASSIFIED,  # see CLASSIFIED_NOW
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
    """PostgreSQL: the batch in one COPY exchange (two with labels): the staging tables made
    if need be, COPY into them and, in the same query string, the merges and the review
    index's statements (`review_index.staged_sql`).

    A batch's own work on the server is a few milliseconds, so each round trip counts,
    and more so on a busy machine, where each costs both processes a wait for a CPU.
    """
    now = utc_now().isoformat(sep=" ")
    version = copy_text(model_version)
    run = NULL if run_id is None else str(run_id)
    results = "".join(_result_line(outcome, version, run, now) for outcome in outcomes)
    labels = "".join(
        f"{copy_text(outcome.record_id)}\t{version}\t{copy_text(label.key)}"
        f"\t{copy_text(label.concept)}\t{float(label.confidence)!r}\n"
        for outcome in outcomes
        for label in outcome.labels
    )
    stage_results = f"{STAGING}; COPY stage_results ({', '.join(STAGED_COLUMNS)}) FROM STDIN"
    stage_labels = f"COPY stage_labels ({', '.join(LABEL_COLUMNS)}) FROM STDIN"
    merged = f"{MERGES}; {review_index.staged_sql()}"
    if labels:
        copies = [(stage_results, results), (f"{stage_labels}; {merged}", labels)]
    else:
        copies = [(f"{stage_results}; {merged}", results)]
    # COPY needs the driver's cursor, on the same connection and so in the same transaction;
    # its errors are raised as SQLAlchemy's, as every other statement's are.
    dbapi = connection.dialect.loaded_dbapi
    cursor = connection.connection.dbapi_connection.cursor()
    try:
        for statement, rows in copies:
            try:
                cursor.copy_expert(statement, io.StringIO(rows))
            except dbapi.Error as error:
                raise sa.exc.DBAPIError.instance(statement, None, error, dbapi.Error) from error
    finally:
        cursor.close()


def _result_line(outcome: RecordOutcome, version: str, run: str, now: str) -> str:
    """One staged result in COPY's text format (the model version, run and time made once
    per batch), in `STAGED_COLUMNS` order."""
    scores = NULL if outcome.scores is None else scores_literal(outcome.scores)
    # bytea's hex input, its backslash escaped for COPY.
    sha256 = NULL if outcome.image_sha256 is None else "\\\\x" + copy_text(outcome.image_sha256)
    taken = outcome.source_timestamp
    source_timestamp = NULL if taken is None else taken.isoformat(sep=" ")
    return (
        f"{copy_text(outcome.record_id)}\t{version}\t{run}\t{copy_text(outcome.status)}"
        f"\t{copy_text(outcome.error_reason)}\t{copy_text(outcome.error_message)}\t{scores}"
        f"\t{copy_text(outcome.image_url)}\t{sha256}\t{source_timestamp}\t{now}"
        f"\t{review_index.sample_key(outcome.record_id)}\n"
    )
