"""Bad input gets one clear line, a non-zero exit, and leaves nothing half-written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from enrichment.cli import cli
from enrichment.cli.base import Commands
from enrichment.errors import InvalidValue
from enrichment.store.runs import UnfinishedRun
from tests.conftest import empty_database, enrich, write_jsonl
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


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--qf", "TYPE:IMAGE"], "--qf"),
        (["--reusability", "open", "--media"], "--reusability, --media"),
        (["--image-source", "auto"], "--image-source"),
    ],
)
def test_search_api_filters_on_a_records_file_are_a_usage_error(
    tmp_path: Path, options: list[str], named: str
) -> None:
    """Nothing of a records file is filtered by them: silently ignored, they would look
    like a narrower run than the one made."""
    records = tmp_path / "records.csv"
    records.write_text("id,image_url\n/d/1,http://example.org/1.jpg\n")
    result = CliRunner().invoke(cli, ["run", "--records", str(records), *options])
    assert result.exit_code == 2
    assert f"Error: {named}: for Search API scopes only" in result.output


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
    assert error_line(result) == (
        "Error: Invalid value for '--model-dir': no model directory given, "
        "and ENRICH_MODEL is not set"
    )


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


@pytest.mark.parametrize("run", [["42"], ["--run", "42"]], ids=["positional", "option"])
def test_status_of_unknown_run(tmp_path: Path, run: list[str]) -> None:
    env = {"DATABASE_URL": empty_database(tmp_path / "db.sqlite3")}
    result = enrich("status", *run, env=env)
    assert result.returncode == 1
    assert error_line(result) == "Error: run 42 does not exist"


def test_two_different_runs_are_refused(tmp_path: Path) -> None:
    result = enrich(
        "status", "--run", "1", "2", env={"DATABASE_URL": f"sqlite:///{tmp_path}/db.sqlite3"}
    )
    assert result.returncode == 2
    assert "two runs given: --run 1 and 2" in result.stderr


@click.group(cls=Commands)
def boundary() -> None:
    """A command group behind the CLI's error boundary, with commands that fail on purpose."""


@boundary.command()
@click.option("--image-source", default="auto")
@click.option("--field", default="image_source")
def choose(image_source: str, field: str) -> None:
    raise InvalidValue(field, f"must be one of preview, full, auto (got {image_source})")


@boundary.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--read", is_flag=True)
def save(path: Path, read: bool) -> None:
    if read:
        path.read_text()
    else:
        path.write_text("x")


def test_a_library_error_about_a_field_names_the_option_that_gave_it() -> None:
    result = CliRunner().invoke(boundary, ["choose", "--image-source", "thumb"])
    assert result.exit_code == 1
    assert result.output == (
        "Error: Invalid value for '--image-source': must be one of preview, full, auto "
        "(got thumb)\n"
    )
    unknown = CliRunner().invoke(boundary, ["choose", "--field", "colour"])
    assert unknown.output == "Error: must be one of preview, full, auto (got auto)\n"


@boundary.command()
def overlap() -> None:
    raise UnfinishedRun(7)


def test_an_unfinished_run_over_the_scope_gets_the_commands_that_follow_it() -> None:
    result = CliRunner().invoke(boundary, ["overlap"])
    assert result.exit_code == 1
    assert result.output == (
        "Error: run 7 over the same scope has not finished: follow it with "
        "`enrich status --run 7` or continue it with `enrich resume --run 7`\n"
    )


def test_a_file_that_cannot_be_written_or_read_is_one_line_naming_it(tmp_path: Path) -> None:
    missing_folder = tmp_path / "no" / "out.json"
    written = CliRunner().invoke(boundary, ["save", str(missing_folder)])
    assert written.exit_code == 1
    assert written.output == f"Error: cannot write {missing_folder}: No such file or directory\n"
    missing_file = tmp_path / "in.json"
    read = CliRunner().invoke(boundary, ["save", "--read", str(missing_file)])
    assert read.output == f"Error: cannot read {missing_file}: No such file or directory\n"
    folder = tmp_path / "folder"
    folder.mkdir()
    over = CliRunner().invoke(boundary, ["save", str(folder)])
    assert over.output == f"Error: cannot write {folder}: Is a directory\n"


def test_help_describes_every_command() -> None:
    top = enrich("--help", env={})  # the installed entry point
    assert top.returncode == 0
    for command in ("run", "resume", "status", "results", "export", "db", "model"):
        assert command in top.stdout
        sub = CliRunner().invoke(cli, [command, "--help"])
        assert sub.exit_code == 0 and "Usage:" in sub.stdout


def test_report_names_its_run_with_run_as_the_other_commands_do(tmp_path: Path) -> None:
    env = {"DATABASE_URL": empty_database(tmp_path / "db.sqlite3")}
    out = str(tmp_path / "report")
    for run in (["--run", "7"], ["7"]):
        result = CliRunner().invoke(cli, ["report", *run, "--out", out], env=env)
        assert result.exit_code == 1
        assert result.output == "Error: run 7 does not exist\n"
    both = CliRunner().invoke(cli, ["report", "--run", "7", "8", "--out", out], env=env)
    assert both.exit_code == 2
    assert "two runs given: --run 7 and 8" in both.output


@pytest.mark.parametrize(
    "command",
    [
        ["review", "stats"],
        ["review", "export", "--out", "reviewed.jsonl"],
        ["review", "label-studio", "export", "--out", "tasks.json"],
    ],
)
def test_a_review_command_refuses_a_dataset_no_record_belongs_to(
    tmp_path: Path, command: list[str]
) -> None:
    """As export and publish do: a mistyped dataset would read as "no decisions yet"."""
    database = empty_database(tmp_path / "db.sqlite3")
    out = tmp_path / "out"
    out.mkdir()
    command = [str(out / part) if part.endswith((".json", ".jsonl")) else part for part in command]
    result = CliRunner().invoke(
        cli, [*command, "--dataset", "nope"], env={"DATABASE_URL": database}
    )
    assert result.exit_code == 1, result.output
    assert error_line(result) == (
        "Error: Invalid value for '--dataset': no record belongs to dataset nope"
    )
    assert list(out.iterdir()) == []


def test_a_full_disk_under_standard_output_is_one_line(tiny_model: Path) -> None:
    """Files name themselves when they cannot be written; standard output cannot."""
    for args in (["model", "info", str(tiny_model)], ["--help"]):
        with open("/dev/full", "w") as full:
            done = subprocess.run(
                [sys.executable, "-m", "enrichment", *args],
                stdout=full,
                stderr=subprocess.PIPE,
                text=True,
                timeout=60,
            )
        assert done.returncode == 1
        assert done.stderr == "Error: cannot write the output: No space left on device\n"
