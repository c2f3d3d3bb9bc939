"""The database: connecting, migrating on first use, and transactions.

One `Database` per process, built from the settings' URL and passed down, so
no engine is bound at import time. The batched writes are in `writes`, the
reporting reads in `query`.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
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


# What a database blip raises (a server restarting, a dropped connection): callers outside
# store/ retry on these without importing SQLAlchemy.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (sa.exc.OperationalError, sa.exc.DBAPIError)

SUPPORTED = {"postgresql": "postgresql://USER:PASSWORD@HOST/DB", "sqlite": "sqlite:///PATH"}
CONNECT_TIMEOUT = 10  # seconds; a DATABASE_URL with ?connect_timeout=N keeps its own
SQLITE_MAGIC = b"SQLite format 3\x00"
# The PostgreSQL advisory lock key of migrations, signed 64-bit as scope keys are.
MIGRATION_LOCK = int.from_bytes(hashlib.sha256(b"enrich:migrate").digest()[:8], signed=True)


# SQLite's primary result codes (the low byte of its extended ones) and PostgreSQL's
# SQLSTATE for a write in a read-only transaction (a standby, default_transaction_read_only).
SQLITE_READONLY = 8
SQLITE_CANTOPEN = 14
READ_ONLY_SQL_TRANSACTION = "25006"


def database_failure(url: str, error: Exception, doing: str = "cannot use") -> DatabaseError:
    """The one error path: a driver's error as one line, with the URL's password hidden.

    A database that cannot be written is said so plainly, with what is read-only
    where that can be told (the file, its directory, the filesystem): SQLite's
    own words ("unable to open database file" for a WAL database in a read-only
    directory) do not say it.
    """
    original = getattr(error, "orig", None) or error
    lines = str(original).strip().splitlines()
    reason = lines[0] if lines else type(original).__name__
    path = sqlite_path(url)
    code = getattr(original, "sqlite_errorcode", -1) & 0xFF
    place = _read_only_place(path) if path is not None else None
    sqlstate = getattr(original, "pgcode", None) or getattr(original, "sqlstate", None)
    if code == SQLITE_READONLY or sqlstate == READ_ONLY_SQL_TRANSACTION:
        return _unwritable(url, place or reason)
    if code == SQLITE_CANTOPEN and path is not None:
        if place is not None:
            return _unwritable(url, place)
        if not path.parent.is_dir():
            reason = f"its directory {path.parent} does not exist"
    return DatabaseError(f"{doing} database {redact_url(url)}: {reason}")


def _unwritable(url: str, why: str) -> DatabaseError:
    """`cannot write database URL: why`, one message wherever a write is refused."""
    return DatabaseError(
        f"cannot write database {redact_url(url)}: {why}; "
        "make it writable, or point DATABASE_URL at a writable database"
    )


def sqlite_path(url: str) -> Path | None:
    """An SQLite URL's file, or None (a server database, or SQLite in memory).

    Worked out from the URL, before anything connects: the file is checked to be ours
    (`check_owned`) before SQLite may create or change it, whether the URL names it
    by its path or as an SQLite URI (`sqlite:///file:/data/db.sqlite3?mode=ro&uri=true`).
    """
    try:
        parsed = sa.engine.make_url(url)
    except (sa.exc.ArgumentError, ValueError):
        return None
    database = parsed.database if parsed.get_backend_name() == "sqlite" else None
    if not database or database == ":memory:":
        return None
    if database.startswith("file:") and sa.util.asbool(parsed.query.get("uri", False)):
        return _uri_file(database, parsed.query.get("mode"))
    return Path(database)  # without uri=true, the driver opens `file:...` as a relative path


def _uri_file(uri: str, mode: object) -> Path | None:
    """The file an SQLite URI filename names (https://sqlite.org/uri.html): `file:PATH`,
    `file:///PATH` or `file://localhost/PATH`, percent-decoded; None in memory, and for an
    authority SQLite itself refuses."""
    if mode == "memory":
        return None
    path = uri.removeprefix("file:").split("?", 1)[0].split("#", 1)[0]
    if path.startswith("//"):
        authority, _, rest = path[2:].partition("/")
        if authority not in ("", "localhost"):
            return None
        path = "/" + rest
    path = unquote(path)
    return Path(path) if path and path != ":memory:" else None


def _read_only_place(path: Path) -> str | None:
    """What keeps SQLite from writing the database at `path`, or None if nothing seems to.

    SQLite writes beside the file too (its WAL, shared-memory and journal files,
    our lock files), so a read-only directory stops it as surely as a read-only
    file. `os.access` sees an immutable file or a read-only mount even for root.
    """
    directory = path.parent
    try:
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return f"{directory} is on a read-only filesystem"
    except OSError:
        return None
    for file in (path, *(Path(f"{path}{suffix}") for suffix in ("-wal", "-shm", "-journal"))):
        if file.exists() and not os.access(file, os.W_OK):
            return f"the file {file} is read-only"
    if not os.access(directory, os.W_OK | os.X_OK):
        return (
            f"its directory {directory} is read-only, and SQLite writes its journal "
            "and lock files beside the database"
        )
    return None


class Database:
    """An engine and session factory for one DATABASE_URL."""

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            parsed = sa.engine.make_url(url)
        except (sa.exc.ArgumentError, ValueError) as error:
            raise DatabaseError(f"invalid DATABASE_URL {redact_url(url)}: {error}") from None
        if parsed.get_backend_name() not in SUPPORTED:
            raise DatabaseError(
                f"DATABASE_URL {redact_url(url)}: {parsed.get_backend_name()!r} is not supported; "
                f"use PostgreSQL ({SUPPORTED['postgresql']}) or SQLite ({SUPPORTED['sqlite']})"
            )
        try:
            options: dict[str, Any] = {}
            if parsed.drivername == "postgresql+psycopg2":
                # Upserts, which insertmanyvalues does not take, go as pages of statements
                # (execute_batch) rather than one round trip per row.
                options["executemany_mode"] = "values_plus_batch"
            if parsed.get_backend_name() == "postgresql" and "connect_timeout" not in parsed.query:
                # libpq waits on an unanswering server for as long as TCP does (minutes):
                # a worker should meet a database outage as a retryable error soon.
                options["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT}
            self.engine: Engine = sa.create_engine(url, pool_pre_ping=True, **options)
        except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ValueError) as error:
            raise DatabaseError(f"invalid DATABASE_URL {redact_url(url)}: {error}") from None
        except ImportError as error:
            raise DatabaseError(
                f"DATABASE_URL {redact_url(url)}: its driver {parsed.drivername!r} is not "
                f"installed ({error.name or error})"
            ) from None
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        elif self.engine.dialect.name == "postgresql":
            event.listen(self.engine, "connect", _postgres_settings)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @property
    def sqlite_file(self) -> Path | None:
        """The SQLite database's file, or None (a server database, or SQLite in memory)."""
        return sqlite_path(self.url)

    def check_connection(self) -> None:
        """Connect once; an SQLite file is first checked to be this project's (`check_owned`)."""
        self.check_owned()
        try:
            with self.engine.connect() as connection:
                connection.execute(sa.text("SELECT 1"))
        except sa.exc.DBAPIError as error:
            raise database_failure(self.url, error, "cannot connect to") from None

    def check_owned(self) -> None:
        """Refuse an SQLite file that is not a database, or is another application's.

        Read without our connection pragmas (WAL would already change the file),
        so a refused file is left exactly as it was. Ours: missing, empty, no
        tables at all, or an `alembic_version` table empty or holding one of this
        project's revisions (alembic creates it first, so an interrupted first
        migration still counts as ours).
        """
        path = self.sqlite_file
        if path is None or not path.is_file() or path.stat().st_size == 0:
            return
        where = redact_url(self.url)
        try:
            with path.open("rb") as handle:
                magic = handle.read(len(SQLITE_MAGIC))
        except OSError as error:
            raise DatabaseError(f"cannot read database {where}: {error.strerror}") from None
        if magic != SQLITE_MAGIC:
            raise DatabaseError(
                f"database {where}: {path} is not an SQLite database; "
                "point DATABASE_URL at a new or empty file"
            )
        try:
            with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as raw:
                tables = {name for (name,) in raw.execute("SELECT name FROM sqlite_master")}
                versions = (
                    {row[0] for row in raw.execute("SELECT version_num FROM alembic_version")}
                    if "alembic_version" in tables
                    else None
                )
        except sqlite3.Error as error:
            raise database_failure(self.url, error, "cannot read") from None
        tables = {name for name in tables if not name.startswith("sqlite_")}
        if not tables:
            return
        ours = {script.revision for script in _scripts().walk_revisions()}
        if versions is None or not versions <= ours:
            found = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
            raise DatabaseError(
                f"database {where} belongs to another application (tables {found}; "
                f"{'no alembic_version' if versions is None else 'revisions not of enrich'}): "
                "nothing was written; point DATABASE_URL at a new file"
            )

    def current_revision(self) -> str | None:
        with self.engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()

    def upgrade(self, revision: str = "head") -> None:
        with self._migration_lock():
            self.check_connection()
            self._migrate(command.upgrade, revision)

    def downgrade(self, revision: str) -> None:
        with self._migration_lock():
            self.check_connection()
            self._migrate(command.downgrade, revision)

    def check_exists(self) -> None:
        """Refuse an SQLite file that does not exist yet, before SQLite would create it.

        Only a run creates the database: a command that reads (status, export, review)
        on a mistyped path would otherwise leave an empty database there and report
        nothing to export, or no runs, as if that were the collection's state.
        """
        path = self.sqlite_file
        if path is not None and not path.exists():
            raise DatabaseError(
                f"database {redact_url(self.url)} does not exist: `enrich run` creates it; "
                "or point DATABASE_URL at the database to use"
            )

    def ensure_schema(self) -> None:
        """Refuse to work on a database whose schema is not the one this code expects.

        The embedded SQLite default is migrated on first use so a newcomer needs
        no setup step; a shared server database is only changed on request. Two
        processes starting on a new SQLite file at once take turns (an flock
        beside the file): the second finds the schema made and uses it.
        """
        head = _scripts().get_current_head()
        with self._migration_lock():
            self.check_connection()
            try:
                current = self.current_revision()
            except sa.exc.DBAPIError as error:
                raise database_failure(self.url, error) from None
            if current == head:
                return
            if self.sqlite_file is not None and current is None:
                self._migrate(command.upgrade, "head")
                return
        raise DatabaseError(
            f"database {redact_url(self.url)} is at schema revision {current or 'none'}, "
            f"this version needs {head}: run `enrich db upgrade`"
        )

    def _migrate(self, step: Callable[[Config, str], None], revision: str) -> None:
        """One migration in one transaction; on PostgreSQL after every other one has ended.

        Several `enrich db upgrade` at once on an empty server database would each
        create the tables and all but one fail on the catalog; a transaction-level
        advisory lock makes them take turns, and each later one finds the schema
        at head (it reads the revision after the lock) and has nothing to do.
        """
        try:
            if self.engine.dialect.name == "sqlite":
                with _sqlite_migration(self.engine) as connection:
                    step(alembic_config(connection), revision)
                    _check_foreign_keys(connection, self.url)
                return
            with self.engine.begin() as connection:
                if connection.dialect.name == "postgresql":
                    connection.execute(sa.select(sa.func.pg_advisory_xact_lock(MIGRATION_LOCK)))
                step(alembic_config(connection), revision)
        except sa.exc.DBAPIError as error:
            raise database_failure(self.url, error, "cannot migrate") from None
        except CommandError as error:  # an unknown revision, say
            raise DatabaseError(
                f"cannot migrate database {redact_url(self.url)}: {error} "
                f"(this version's newest is {_scripts().get_current_head()})"
            ) from None

    @contextmanager
    def _migration_lock(self) -> Iterator[None]:
        """One migrating process at a time per SQLite file; PostgreSQL's DDL is transactional.

        The file is checked to be ours first, so nothing (not even the lock
        file) is written beside another application's database.
        """
        self.check_owned()
        path = self.sqlite_file
        if path is None or not path.parent.is_dir():
            yield
            return
        try:
            handle = open(f"{path}.migrate.lock", "w")  # noqa: SIM115 - held across the yield
        except OSError as error:
            if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                place = (
                    _read_only_place(path) or f"cannot create {error.filename}: {error.strerror}"
                )
                raise _unwritable(self.url, place) from None
            raise DatabaseError(
                f"cannot use database {redact_url(self.url)}: cannot create its lock file "
                f"beside it: {error.strerror}"
            ) from None
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """The one way to work in the database: a Session, committed at the end."""
        with self.sessions.begin() as session:
            yield session

    @contextmanager
    def session_connection(self) -> Iterator[sa.Connection]:
        """A connection of its own for state that outlives transactions (advisory locks).

        The caller commits as it goes; a pooled Session would hand the connection,
        and the lock with it, back to the pool at its first commit.
        """
        with self.engine.connect() as connection:
            yield connection

    def dispose(self) -> None:
        self.engine.dispose()


@cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


@contextmanager
def _sqlite_migration(engine: Engine) -> Iterator[sa.Connection]:
    """A connection that migrates SQLite in one transaction, foreign keys unenforced.

    SQLite changes a table by copying it, dropping the old and renaming the copy (Alembic's
    batch mode): with foreign keys on, dropping `models` fails as soon as a run refers to
    it. They cannot be switched off inside a transaction, and the driver begins none
    before DDL, so a failed step left its half-made copy behind and every later try failed
    on it (such a copy is dropped here: the table it copied is still there). Here the
    transaction is begun by hand, and the connection's settings are put back afterwards
    (an in-memory database is its one connection).
    """
    connection = engine.connect()
    driver = connection.connection.driver_connection
    assert driver is not None
    previous = driver.isolation_level
    try:
        driver.isolation_level = None  # the driver's own BEGINs off: ours below
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        connection.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            # What a failed step of an earlier version of this left (we hold the lock).
            for name in sa.inspect(connection).get_table_names():
                if name.startswith("_alembic_tmp_"):
                    sa.Table(name, sa.MetaData()).drop(connection)
            yield connection
        except BaseException:
            connection.rollback()
            raise
        connection.commit()
    finally:
        try:  # back as every connection is (`_sqlite_pragmas`), for the pool
            connection.exec_driver_sql("PRAGMA foreign_keys=ON")
            connection.commit()
            driver.isolation_level = previous
        except Exception:
            connection.invalidate()  # not reusable as it is
        connection.close()


def _check_foreign_keys(connection: sa.Connection, url: str) -> None:
    """After a migration with foreign keys off: every reference still holds, or nothing is
    committed."""
    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
    if broken:
        tables = sorted({f"{table} -> {parent}" for table, _, parent, _ in broken})
        raise DatabaseError(
            f"cannot migrate database {redact_url(url)}: {len(broken)} rows would refer to "
            f"rows that do not exist ({', '.join(tables)}); nothing was changed"
        )


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # The busy timeout first: switching to WAL itself waits for other connections.
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


def _postgres_settings(dbapi_connection: Any, _record: Any) -> None:
    """Plan server-side cursors for reading every row, as every one here is read (exports,
    stats, reports, comparisons): PostgreSQL's default (`cursor_tuple_fraction` 0.1) plans
    them for the first tenth, and chose nested loops that took the review stats of a
    20,000-record collection 9.5 s instead of 0.4 (bench_scale's `/stats`)."""
    cursor = dbapi_connection.cursor()
    cursor.execute("SET cursor_tuple_fraction = 1.0")
    cursor.close()
    dbapi_connection.commit()  # a SET rolled back with its transaction would be undone
