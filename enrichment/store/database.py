"""The database: connecting, migrating, and the writes and reads every stage shares.

Writes are batched and idempotent: `save_outcomes` upserts a whole batch's
results and replaces its labels in one transaction, so a batch that runs twice
leaves the same rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

import migrations
from enrichment.config import redact_url
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


def alembic_config(connection: sa.Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


class Database:
    """An engine and session factory for one DATABASE_URL."""

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            options: dict[str, Any] = {}
            if sa.engine.make_url(url).drivername == "postgresql+psycopg2":
                # Upserts, which insertmanyvalues does not take, go as pages of statements
                # (execute_batch) rather than one round trip per row.
                options["executemany_mode"] = "values_plus_batch"
            self.engine: Engine = sa.create_engine(url, pool_pre_ping=True, **options)
        except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ValueError) as error:
            raise DatabaseError(f"invalid DATABASE_URL {redact_url(url)}: {error}") from None
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def check_connection(self) -> None:
        try:
            with self.engine.connect() as connection:
                connection.execute(sa.text("SELECT 1"))
        except sa.exc.OperationalError as error:
            reason = str(error.orig).strip().splitlines()[0] if error.orig else str(error)
            raise DatabaseError(
                f"cannot connect to database {redact_url(self.url)}: {reason}"
            ) from None

    def current_revision(self) -> str | None:
        with self.engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()

    def upgrade(self, revision: str = "head") -> None:
        self.check_connection()
        with self.engine.begin() as connection:
            command.upgrade(alembic_config(connection), revision)

    def downgrade(self, revision: str) -> None:
        self.check_connection()
        with self.engine.begin() as connection:
            command.downgrade(alembic_config(connection), revision)

    def ensure_schema(self) -> None:
        """Refuse to work on a database whose schema is not the one this code expects.

        The embedded SQLite default is migrated on first use so a newcomer needs
        no setup step; a shared server database is only changed on request.
        """
        self.check_connection()
        head = ScriptDirectory.from_config(alembic_config()).get_current_head()
        current = self.current_revision()
        if current == head:
            return
        if self.dialect == "sqlite" and current is None:
            self.upgrade()
            return
        raise DatabaseError(
            f"database {redact_url(self.url)} is at schema revision {current or 'none'}, "
            f"this version needs {head}: run `enrich db upgrade`"
        )

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        with self.sessions.begin() as session:
            yield session

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


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
) -> None:
    """Record a model version; registering it again updates its labels and thresholds."""
    statement = upsert_statement(session, ModelRow.__table__).values(
        version=version,
        name=name,
        architecture=architecture,
        labels=labels,
        thresholds=thresholds,
        registered_at=utc_now(),
    )
    # Recalibration keeps the version (same weights) but changes thresholds: keep the latest.
    session.execute(
        statement.on_conflict_do_update(
            index_elements=["version"],
            set_={"labels": statement.excluded.labels, "thresholds": statement.excluded.thresholds},
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
