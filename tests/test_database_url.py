"""DATABASE_URL: another application's file, a file that is no database, an unsupported dialect,
a database that cannot be written, and two first runs at once on a new SQLite file."""

from __future__ import annotations

import multiprocessing
import os
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from enrichment.cli import cli
from enrichment.errors import DatabaseError, ScopeBusy
from enrichment.store import database as database_module
from enrichment.store.database import Database
from enrichment.store.locks import scope_lock
from tests.conftest import enrich, write_jsonl


def one_line(result) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def another_application(path: Path, alembic_revision: str | None = None) -> None:
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE records (id TEXT PRIMARY KEY, body TEXT)")
        connection.execute("INSERT INTO records VALUES ('a', 'theirs')")
        if alembic_revision:
            connection.execute("CREATE TABLE alembic_version (version_num VARCHAR(32))")
            connection.execute("INSERT INTO alembic_version VALUES (?)", (alembic_revision,))
    connection.close()


@pytest.mark.parametrize("revision", [None, "1f2e3d4c5b6a"])
def test_another_applications_sqlite_file_is_refused_and_left_untouched(
    tmp_path: Path, revision: str | None
) -> None:
    path = tmp_path / "theirs.db"
    another_application(path, revision)
    before = snapshot(tmp_path)
    url = f"sqlite:///{path}"
    for command in (["status"], ["db", "upgrade"]) if revision is None else (["results"],):
        line = one_line(enrich(*command, env={"DATABASE_URL": url}))
        assert line.startswith(f"Error: database {url} belongs to another application (tables")
        assert "nothing was written" in line
        assert snapshot(tmp_path) == before  # no table, no WAL switch, not even a lock file


@pytest.mark.parametrize(
    "uri",
    [
        "file:{path}?uri=true",
        "file://{path}?mode=rw&uri=true",
        "file://localhost{path}?uri=true",
    ],
)
def test_another_applications_file_named_by_an_sqlite_uri_is_refused_too(
    tmp_path: Path, uri: str
) -> None:
    """The check of whose file it is works from the file the URL names; it took only plain
    paths, and `enrich db upgrade` with a `file:` URI wrote its first tables into another
    application's database before failing on a table name they share."""
    path = tmp_path / "their data.db"
    another_application(path)
    before = snapshot(tmp_path)
    named = Database("sqlite:///" + uri.format(path=str(path).replace(" ", "%20")))
    assert named.sqlite_file == path
    with pytest.raises(DatabaseError, match="belongs to another application"):
        named.upgrade()
    named.dispose()
    assert snapshot(tmp_path) == before


def test_an_sqlite_uri_in_memory_names_no_file_and_one_without_uri_true_a_relative_one() -> None:
    for url in (
        "sqlite:///file::memory:?uri=true",
        "sqlite:///file:scratch?mode=memory&uri=true",
        "sqlite:///file://elsewhere.example/data.db?uri=true",  # SQLite refuses the authority
    ):
        assert database_module.sqlite_path(url) is None, url
    # Without uri=true the driver opens it as the relative path it reads as.
    assert database_module.sqlite_path("sqlite:///file:/data/db.sqlite3") == Path(
        "file:/data/db.sqlite3"
    )


@pytest.mark.parametrize(
    "content", [b"id,image_url\n/d/1,http://example.org/1.jpg\n", b"\xff\xd8\xff\xe0" * 64]
)
def test_a_file_that_is_not_a_database_is_refused_and_left_untouched(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "records.csv"
    path.write_bytes(content)
    before = snapshot(tmp_path)
    line = one_line(enrich("status", env={"DATABASE_URL": f"sqlite:///{path}"}))
    assert line == (
        f"Error: database sqlite:///{path}: {path} is not an SQLite database; "
        "point DATABASE_URL at a new or empty file"
    )
    assert snapshot(tmp_path) == before


def test_an_empty_file_or_our_own_database_is_used(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    path.touch()
    Database(f"sqlite:///{path}").ensure_schema()
    again = Database(f"sqlite:///{path}")
    again.ensure_schema()  # now ours, at head: used as it is
    with again.engine.connect() as connection:
        assert connection.execute(sa.text("SELECT count(*) FROM runs")).scalar_one() == 0
    # An SQLite file with no tables at all (created by sqlite3 but never used) is ours too.
    bare = tmp_path / "bare.db"
    sqlite3.connect(bare).execute("PRAGMA user_version=0").connection.close()
    Database(f"sqlite:///{bare}").ensure_schema()


def _first_use(url: str, barrier, results) -> None:
    database = Database(url)
    barrier.wait()
    try:
        database.ensure_schema()
        results.put("ok")
    except Exception as error:  # what the test reports when the race is lost
        results.put(f"{type(error).__name__}: {error}")


def test_two_first_runs_at_once_on_a_new_sqlite_file_both_work(tmp_path: Path) -> None:
    """Without the lock, this loses the race almost every time ('table models already exists')."""
    context = multiprocessing.get_context("fork")
    for attempt in range(2):
        url = f"sqlite:///{tmp_path}/new-{attempt}.db"
        barrier, results = context.Barrier(4), context.Queue()
        processes = [
            context.Process(target=_first_use, args=(url, barrier, results)) for _ in range(4)
        ]
        for process in processes:
            process.start()
        outcomes = [results.get(timeout=60) for _ in processes]
        for process in processes:
            process.join(timeout=60)
        assert outcomes == ["ok"] * 4
        database = Database(url)
        database.ensure_schema()
        assert database.current_revision() is not None


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://enrich:s3cret@127.0.0.1/enrich", "'mysql' is not supported; use PostgreSQL"),
        ("mysql+pymysql://enrich:s3cret@db/enrich", "'mysql' is not supported; use PostgreSQL"),
        ("oracle://enrich:s3cret@db/enrich", "'oracle' is not supported"),
        ("postgresql+nosuchdriver://enrich:s3cret@db/enrich", "invalid DATABASE_URL"),
        ("not a url", "invalid DATABASE_URL"),
    ],
)
def test_an_unsupported_database_url_is_one_clear_error_without_the_password(
    url: str, message: str
) -> None:
    with pytest.raises(DatabaseError, match=message) as caught:
        Database(url)
    assert "s3cret" not in str(caught.value)


def test_mysql_on_the_command_line_is_one_line_without_the_password() -> None:
    result = enrich("status", env={"DATABASE_URL": "mysql://enrich:s3cret@127.0.0.1/enrich"})
    assert one_line(result) == (
        "Error: DATABASE_URL mysql://enrich:***@127.0.0.1/enrich: 'mysql' is not supported; "
        "use PostgreSQL (postgresql://USER:PASSWORD@HOST/DB) or SQLite (sqlite:///PATH)"
    )
    assert "s3cret" not in result.stderr + result.stdout


def test_a_database_in_a_directory_that_does_not_exist_is_one_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/no/such/dir/db.sqlite3"
    line = one_line(enrich("db", "upgrade", env={"DATABASE_URL": url}))
    assert line == (
        f"Error: cannot connect to database {url}: its directory {tmp_path}/no/such/dir "
        "does not exist"
    )
    assert not (tmp_path / "no").exists()
    assert os.listdir(tmp_path) == []


def test_a_database_failing_under_a_command_is_one_line(tmp_path: Path) -> None:
    """Ours and at head, but damaged (a table dropped by hand): no traceback, one line."""
    url = f"sqlite:///{tmp_path}/damaged.db"
    Database(url).ensure_schema()
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.execute(sa.text("DROP TABLE labels"))
        connection.execute(sa.text("DROP TABLE results"))
    engine.dispose()
    line = one_line(enrich("results", env={"DATABASE_URL": url}))
    assert line == f"Error: cannot use database {url}: no such table: results"


def test_a_postgresql_server_that_never_answers_is_given_up_soon(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A listening socket that never speaks: without a connect timeout libpq would wait
    as long as TCP does, and a worker would hang through a database outage."""
    monkeypatch.setattr(database_module, "CONNECT_TIMEOUT", 1)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        port = silent.getsockname()[1]
        db = Database(f"postgresql+psycopg2://enrich:secret@127.0.0.1:{port}/enrich")
        began = time.monotonic()
        with pytest.raises(sa.exc.OperationalError, match="timeout expired"):
            db.engine.connect()
        assert time.monotonic() - began < 10
        db.dispose()


@contextmanager
def read_only(path: Path) -> Iterator[None]:
    """`path` (a file or a directory) refuses writes for this process, even as root.

    Root passes over permission bits, so as root the path is made immutable
    (`chattr +i`, which root cannot write through either); anyone else gets the
    write bits cleared. Skips where neither can be done.
    """
    if os.geteuid() == 0:
        made = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
        if made.returncode != 0:
            pytest.skip(f"cannot make {path} read-only as root: {made.stderr.strip()}")
    else:
        mode = path.stat().st_mode
        path.chmod(mode & ~0o222)
    try:
        yield
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        else:
            path.chmod(mode)


def invoke(url: str, *args: str):
    return CliRunner().invoke(cli, list(args), env={"DATABASE_URL": url})


def test_only_a_run_creates_an_sqlite_database(tmp_path: Path, tiny_model: Path) -> None:
    """A mistyped path under a command that reads left an empty database there, and the
    command reported no runs or exported nothing, as if that were the collection."""
    path = tmp_path / "enrich.db"
    url = f"sqlite:///{path}"
    for command in (["status"], ["export"], ["results"], ["review", "stats"]):
        refused = invoke(url, *command)
        assert (refused.exit_code, refused.output) == (
            1,
            f"Error: database {url} does not exist: `enrich run` creates it; "
            "or point DATABASE_URL at the database to use\n",
        ), command
    assert list(tmp_path.iterdir()) == []
    ran = invoke(
        url, "run", "--records", str(records_file(tmp_path)), "--model-dir", str(tiny_model)
    )
    assert ran.exit_code in (0, 3), ran.output  # its one image is not reachable: exit 3
    assert invoke(url, "status").exit_code == 0


def records_file(tmp_path: Path) -> Path:
    return write_jsonl(
        tmp_path / "records.jsonl", [{"id": "/d/1", "image_url": "http://example.org/1.jpg"}]
    )


def test_a_database_in_a_read_only_directory_says_it_cannot_be_written(
    tmp_path: Path, tiny_model: Path
) -> None:
    """A new database there, and an existing one (in WAL mode, SQLite cannot even read it
    without writing beside it): one line naming the database and the directory."""
    records = records_file(tmp_path)
    folder = tmp_path / "read-only"
    folder.mkdir()
    existing = f"sqlite:///{folder}/existing.db"
    made = Database(existing)
    made.ensure_schema()
    made.dispose()  # the last connection closed: SQLite removes its -wal and -shm files
    before = snapshot(folder)
    assert sorted(before) == ["existing.db", "existing.db.migrate.lock"]
    with read_only(folder):
        for url, command in [
            (
                f"sqlite:///{folder}/new.db",
                ["run", "--records", str(records), "--model-dir", str(tiny_model)],
            ),
            (existing, ["status"]),
            (existing, ["run", "--records", str(records), "--model-dir", str(tiny_model)]),
        ]:
            result = invoke(url, *command)
            assert result.exit_code == 1, result.output
            assert result.output == (
                f"Error: cannot write database {url}: its directory {folder} is read-only, "
                "and SQLite writes its journal and lock files beside the database; make it "
                "writable, or point DATABASE_URL at a writable database\n"
            )
    assert snapshot(folder) == before


def test_a_read_only_database_file_is_read_but_not_written(
    tmp_path: Path, tiny_model: Path
) -> None:
    path = tmp_path / "enrich.db"
    url = f"sqlite:///{path}"
    made = Database(url)
    made.ensure_schema()
    made.dispose()
    with read_only(path):
        assert invoke(url, "status").output == "Error: no runs yet: start one with `enrich run`\n"
        refused = invoke(
            url, "run", "--records", str(records_file(tmp_path)), "--model-dir", str(tiny_model)
        )
        assert refused.exit_code == 1
        assert refused.output == (
            f"Error: cannot write database {url}: the file {path} is read-only; make it "
            "writable, or point DATABASE_URL at a writable database\n"
        )
    db = Database(url)
    with db.engine.connect() as connection:
        assert connection.execute(sa.text("SELECT count(*) FROM runs")).scalar_one() == 0
    db.dispose()


def test_a_read_only_postgresql_database_says_it_cannot_be_written(
    tmp_path: Path, tiny_model: Path, pg_url: str
) -> None:
    """A standby, or a database set to read-only transactions: the server's words, under the
    same first words as SQLite's, and never the password."""
    url = sa.engine.make_url(pg_url).set(password="s3cret").render_as_string(hide_password=False)
    Database(url).upgrade()
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    name = sa.engine.make_url(url).database
    with engine.connect() as connection:
        connection.execute(
            sa.text(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
        )
    engine.dispose()
    refused = invoke(
        url, "run", "--records", str(records_file(tmp_path)), "--model-dir", str(tiny_model)
    )
    assert refused.exit_code == 1
    shown = sa.engine.make_url(url).render_as_string(hide_password=False).replace("s3cret", "***")
    assert refused.output.startswith(
        f"Error: cannot write database {shown}: cannot execute INSERT in a read-only transaction; "
        "make it writable"
    ), refused.output
    assert "s3cret" not in refused.output


def test_a_scope_lock_is_on_the_database_file_however_its_url_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`file:` URI URLs, with their query strings, lock the file they name, beside it, as its
    plain URL does: one scheduler per scope whichever way each process names the database."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # nothing may land in the working directory
    folder = tmp_path / "data dir"
    folder.mkdir()
    path = folder / "db.sqlite3"
    plain = Database(f"sqlite:///{path}")
    plain.ensure_schema()
    scope = {"datasets": ["31"]}
    encoded = str(path).replace(" ", "%20")
    for url in (
        f"sqlite:///file:{encoded}?mode=ro&uri=true",
        f"sqlite:///file://{encoded}?uri=true",
        f"sqlite:///file://localhost{encoded}?mode=rw&uri=true",
        f"sqlite:///{path}?timeout=5",
    ):
        named = Database(url)
        for first, second in ((named, plain), (plain, named)):
            with scope_lock(first, scope), pytest.raises(ScopeBusy), scope_lock(second, scope):
                pass
            with scope_lock(second, scope):  # released with the first
                pass
        named.dispose()
    plain.dispose()
    assert list(elsewhere.iterdir()) == []
    locks = sorted(p.name for p in folder.iterdir() if ".scope-" in p.name)
    assert len(locks) == 1 and locks[0].startswith("db.sqlite3.scope-"), locks

    in_memory = Database("sqlite:///file:scratch?mode=memory&uri=true")
    with scope_lock(in_memory, scope), scope_lock(in_memory, scope):  # nothing to share it with
        pass
    in_memory.dispose()
    assert list(elsewhere.iterdir()) == []


def test_server_side_cursors_are_planned_for_every_row_on_each_pooled_connection(
    pg_url: str,
) -> None:
    """Every server-side cursor here is read to its end; planned for its first tenth (the
    default), the review stats of a 20,000-record collection took 9.5 s instead of 0.4.
    The setting outlives a rolled-back transaction and a connection's return to the pool."""
    db = Database(pg_url)
    with pytest.raises(ZeroDivisionError), db.transaction() as session:
        session.execute(sa.text("SELECT 1"))
        raise ZeroDivisionError  # rolled back
    for _ in range(2):
        with db.transaction() as session:
            shown = session.execute(sa.text("SHOW cursor_tuple_fraction")).scalar_one()
            assert shown == "1"
    db.dispose()
