"""The writes every stage shares: a batch's outcomes, and the models that produced them.

Writes are batched and idempotent: `save_outcomes` upserts a whole batch's
results and replaces its labels in one transaction, so a batch that runs twice
leaves the same rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from enrichment.errors import DatabaseError
from enrichment.model.spec import LabelScore
from enrichment.store.schema import Label, ModelRow, Outcome, Result, utc_now


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


def upsert_statement(session: Session, table: sa.Table) -> Any:
    """An INSERT that can take ON CONFLICT clauses on either supported dialect."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise DatabaseError(f"unsupported database dialect {dialect}")


def register_model(
    session: Session,
    version: str,
    name: str,
    architecture: str,
    labels: list[dict[str, str]],
    thresholds: list[float],
    top_k_fallback: int = 0,
) -> None:
    """Record a model version; registering it again updates how it decides labels."""
    statement = upsert_statement(session, ModelRow.__table__).values(
        version=version,
        name=name,
        architecture=architecture,
        labels=labels,
        thresholds=thresholds,
        top_k_fallback=top_k_fallback,
        registered_at=utc_now(),
    )
    # Recalibration keeps the version (same weights) but changes thresholds: keep the latest.
    session.execute(
        statement.on_conflict_do_update(
            index_elements=["version"],
            set_={
                "labels": statement.excluded.labels,
                "thresholds": statement.excluded.thresholds,
                "top_k_fallback": statement.excluded.top_k_fallback,
            },
        )
    )


def save_outcomes(
    session: Session, run_id: int | None, model_version: str, outcomes: Sequence[RecordOutcome]
) -> None:
    """Upsert a batch of results and replace their labels, in the caller's transaction."""
    if not outcomes:
        return
    now = utc_now()
    rows = [
        {
            "record_id": outcome.record_id,
            "model_version": model_version,
            "run_id": run_id,
            "status": outcome.status,
            "error_reason": outcome.error_reason,
            "error_message": outcome.error_message,
            "scores": outcome.scores,
            "image_url": outcome.image_url,
            "image_sha256": outcome.image_sha256,
            "source_timestamp": outcome.source_timestamp,
            "classified_at": now,
        }
        for outcome in outcomes
    ]
    # Core executemany on the session's connection: SQLAlchemy sends it as a few multi-row
    # INSERTs ("insertmanyvalues") from one cached compilation, without the ORM's bulk path.
    connection = session.connection()
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
            "concept": label.concept,
            "confidence": label.confidence,
        }
        for outcome in outcomes
        for label in outcome.labels
    ]
    if label_rows:
        connection.execute(sa.insert(Label.__table__), label_rows)
