"""Bad input gets one clear line, a non-zero exit, and leaves nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import sqlalchemy as sa

from tests.conftest import enrich, write_jsonl
from tests.services import free_port


def run_count(database_url: str) -> int:
    engine = sa.create_engine(database_url)
    with engine.connect() as connection:
        count = connection.execute(sa.text("SELECT count(*) FROM runs")).scalar_one()
    engine.dispose()
    return count


def error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_malformed_records_line_is_named_and_nothing_is_written(
    tmp_path: Path, tiny_model: Path
) -> None:
    records = tmp_path / "records.jsonl"
    good = json.dumps({"id": "/d/1", "image_url": "http://example.org/1.jpg"})
    records.write_text(f'{good}\n{good.replace("/d/1", "/d/2")}\n{{"id": "/d/3", \n{good}\n')
    database = f"sqlite:///{tmp_path}/db.sqlite3"
    result = enrich(
        "run",
        "--records",
        str(records),
        env={"DATABASE_URL": database, "ENRICH_MODEL": str(tiny_model)},
    )
    assert result.returncode == 1
    assert f"{records}:3: not valid JSON" in error_line(result)
    # The file is checked whole before the database is even opened.
    assert not (tmp_path / "db.sqlite3").exists()

    # Against an existing database, too, no run and no record is left behind.
    assert enrich("db", "upgrade", env={"DATABASE_URL": database}).returncode == 0
    again = enrich(
        "run",
        "--records",
        str(records),
        env={"DATABASE_URL": database, "ENRICH_MODEL": str(tiny_model)},
    )
    assert again.returncode == 1
    assert run_count(database) == 0


def test_csv_records_with_a_bad_id_name_the_line(tmp_path: Path, tiny_model: Path) -> None:
    records = tmp_path / "records.csv"
    records.write_text(
        "id,image_url\n/d/1,http://example.org/1.jpg\nnot-an-id,http://example.org/2.jpg\n"
    )
    result = enrich(
        "run",
        "--records",
        str(records),
        env={"DATABASE_URL": f"sqlite:///{tmp_path}/db.sqlite3", "ENRICH_MODEL": str(tiny_model)},
    )
    assert result.returncode == 1
    assert f"{records}:3: record id 'not-an-id' is not of the form /DATASET/LOCAL_ID" in error_line(
        result
    )


def test_missing_model_directory(tmp_path: Path) -> None:
    records = write_jsonl(
        tmp_path / "records.jsonl", [{"id": "/d/1", "image_url": "http://example.org/1.jpg"}]
    )
    database = f"sqlite:///{tmp_path}/db.sqlite3"
    result = enrich(
        "run",
        "--records",
        str(records),
        env={"DATABASE_URL": database, "ENRICH_MODEL": str(tmp_path / "no-such-model")},
    )
    assert result.returncode == 1
    assert (
        error_line(result) == f"Error: model directory {tmp_path / 'no-such-model'} does not exist"
    )
    assert not (tmp_path / "db.sqlite3").exists()


def test_no_model_configured(tmp_path: Path) -> None:
    records = write_jsonl(
        tmp_path / "records.jsonl", [{"id": "/d/1", "image_url": "http://example.org/1.jpg"}]
    )
    result = enrich(
        "run",
        "--records",
        str(records),
        env={"DATABASE_URL": f"sqlite:///{tmp_path}/db.sqlite3", "ENRICH_MODEL": ""},
    )
    assert result.returncode == 1
    assert "set ENRICH_MODEL or pass --model-dir DIR" in error_line(result)


def test_unreachable_database_url_is_one_line_without_the_password(
    tmp_path: Path, tiny_model: Path
) -> None:
    records = write_jsonl(
        tmp_path / "records.jsonl", [{"id": "/d/1", "image_url": "http://example.org/1.jpg"}]
    )
    url = f"postgresql+psycopg2://enrich:s3cret@127.0.0.1:{free_port()}/enrich"
    result = enrich(
        "run", "--records", str(records), env={"DATABASE_URL": url, "ENRICH_MODEL": str(tiny_model)}
    )
    assert result.returncode == 1
    line = error_line(result)
    assert line.startswith(
        "Error: cannot connect to database postgresql+psycopg2://enrich:***@127.0.0.1"
    )
    assert "s3cret" not in result.stderr + result.stdout


def test_status_of_unknown_run(tmp_path: Path) -> None:
    result = enrich("status", "42", env={"DATABASE_URL": f"sqlite:///{tmp_path}/db.sqlite3"})
    assert result.returncode == 1
    assert error_line(result) == "Error: run 42 does not exist"


def test_help_describes_every_command() -> None:
    top = enrich("--help", env={})
    assert top.returncode == 0
    for command in ("run", "resume", "status", "results", "export", "db", "model"):
        assert command in top.stdout
        sub = enrich(command, "--help", env={})
        assert sub.returncode == 0 and "Usage:" in sub.stdout
