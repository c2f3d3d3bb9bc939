"""The database: connecting, migrating on first use, and transactions.

One `Database` per process, built from the settings' URL and passed down, so
no engine is bound at import time. The batched writes are in `writes`, the
reporting reads in `query`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

import migrations
from enrichment.config import redact_url
from enrichment.errors import DatabaseError


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
