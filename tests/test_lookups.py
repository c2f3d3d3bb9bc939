"""Lookups that name nothing, ids that could break a line, and a run whose scheduler died."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from enrichment.sources.records_file import Record
from enrichment.store.writes import RecordOutcome, save_outcomes, upsert_records
from tests.conftest import REPO, empty_database, enrich, enrich_here, image_bytes, write_jsonl
from tests.export_support import build_catalogue, open_database
from tests.services import wait_for

HOSTILE_ID = "/9/tab\there\nnew\u202eline"


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('lookups')}/lookups.sqlite3"
    db = open_database(url)
    build_catalogue(db)
    # An id from before ids were checked (or from a source that did not check): it must
    # still print as one line with three fields.
    with db.transaction() as session:
        upsert_records(session, [Record(HOSTILE_ID, "9", "urn:x", None)])
        save_outcomes(
            session,
            None,
            "pilot@aaaaaaaaaaaa",
            [RecordOutcome.failed(HOSTILE_ID, "http_404", "first line\nsecond\tline\\")],
        )
    db.dispose()
    return url


def one_line(result) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["results", "--record", "/demo/x/"],
            "record id '/demo/x/' is not of the form /DATASET/LOCAL_ID",
        ),
        (["results", "--record", "/demo/a b"], "record id '/demo/a b' contains SPACE"),
        (["status", "99999999999999999999999"], "run 99999999999999999999999 does not exist"),
        (["resume", "99999999999999999999999"], "run 99999999999999999999999 does not exist"),
        (["results", "--run", "-99999999999999999999"], "run -99999999999999999999 does not exist"),
        (["results", "--run", "77"], "run 77 does not exist"),
        (["results", "--record", "/1001/none"], "no results match --record /1001/none"),
        (["results", "--dataset", "nope", "--record", "/1001/item_00"], "no results match"),
        (["results", "--dataset", "nope"], "no results match --dataset nope"),
    ],
)
def test_a_lookup_that_names_nothing_is_one_line_and_exit_1(
    database: str, args: list[str], message: str
) -> None:
    # In this process (the real command's one-line errors: test_no_results_on_an_empty_database).
    found = one_line(enrich_here(*args, env={"DATABASE_URL": database}))
    assert found.startswith(f"Error: {message}")


def test_plain_results_keep_one_line_and_four_fields_per_result(database: str) -> None:
    result = enrich("results", "--dataset", "9", env={"DATABASE_URL": database})
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1
    fields = result.stdout.rstrip("\n").split("\t")
    assert fields[:3] == [
        "/9/tab\\there\\nnew\\u202eline",
        "error",
        "http_404: first line\\nsecond\\tline\\\\",
    ]
    # The model version, so that two versions' lines for one record can be told apart.
    assert (
        fields[3]
        == json.loads(
            enrich("results", "--dataset", "9", "--json", env={"DATABASE_URL": database}).stdout
        )["model_version"]
    )
    everything = enrich("results", env={"DATABASE_URL": database}).stdout.splitlines()
    assert len(everything) == 29 and all(line.count("\t") == 3 for line in everything)
    as_json = enrich("results", "--dataset", "9", "--json", env={"DATABASE_URL": database})
    assert json.loads(as_json.stdout)["record_id"] == HOSTILE_ID


def test_no_results_on_an_empty_database(tmp_path: Path) -> None:
    line = one_line(enrich("results", env={"DATABASE_URL": empty_database(tmp_path / "new.db")}))
    assert line == "Error: no results yet: run `enrich run`"


def slow_run(
    tmp_path: Path, image_host, model: Path, name: str, **popen: Any
) -> tuple[list[dict[str, str]], dict[str, str], subprocess.Popen]:
    """`enrich run` in a process of its own over one image that comes at once and four that
    take 30 s, one a batch: (the records, its environment, the process)."""
    rows = [
        {
            "id": f"/{name}/fast",
            "image_url": image_host.add(f"/{name}/fast.png", image_bytes((9, 9, 9))),
        }
    ]
    for n in range(4):
        url = image_host.add(f"/{name}/slow{n}.png", image_bytes((n, 0, 0)), delay=30)
        rows.append({"id": f"/{name}/slow{n}", "image_url": url})
    records = write_jsonl(tmp_path / "records.jsonl", rows)
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path}/{name}.sqlite3",
        "ENRICH_MODEL": str(model),
        "ENRICH_FETCH_ALLOW": "127.0.0.1",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "enrichment", "run", "--records", str(records), "--batch-size", "1"],
        env={**os.environ, **env},
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        **popen,
    )
    return rows, env, process


def first_result_of(database: str) -> tuple[sa.Engine, Callable[[], bool]]:
    """An engine on the run's database, and whether its first result is stored yet."""
    engine = sa.create_engine(database)

    def first_result_stored() -> bool:
        try:
            with engine.connect() as connection:
                return connection.execute(sa.text("SELECT count(*) FROM results")).scalar() > 0
        except sa.exc.OperationalError:
            return False

    return engine, first_result_stored


def test_a_killed_in_process_run_shows_interrupted_with_the_resume_hint(
    tmp_path: Path, image_host, tiny_model: Path
) -> None:
    """While its process lives the run is `running`; once it is killed, `interrupted`."""
    rows, env, process = slow_run(
        tmp_path, image_host, tiny_model, "kill", stderr=subprocess.DEVNULL, start_new_session=True
    )
    engine, first_result_stored = first_result_of(env["DATABASE_URL"])

    try:
        wait_for(first_result_stored, 90, "the first batch")
        live = json.loads(enrich("status", "--json", env=env).stdout)
        assert live["status"] == "running"  # batches pending, but its process is alive
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        engine.dispose()
    shown = enrich("status", env=env)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == f"run {live['id']} (on_demand) interrupted"
    assert (
        "  interrupted    no process is scheduling it: "
        f"continue with `enrich resume --run {live['id']}`" in lines
    )
    assert "s left" not in shown.stdout  # no ETA for a run nobody is working on
    summary = json.loads(enrich("status", "--json", env=env).stdout)
    assert summary["status"] == "interrupted" and summary["eta_seconds"] is None
    # The hint works: with the images answering again, resume finishes the run.
    for n in range(4):
        image_host.add(f"/kill/slow{n}.png", image_bytes((n, 0, 0)))
    resumed = enrich("resume", "--run", str(live["id"]), "--json", env=env)
    assert resumed.returncode == 0, resumed.stderr
    done = json.loads(resumed.stdout)
    assert (done["status"], done["records_done"]) == ("completed", len(rows))


def test_ctrl_c_on_a_run_names_it_and_how_to_go_on(
    tmp_path: Path, image_host, tiny_model: Path
) -> None:
    """Ctrl-C: the run's id and the command that continues it, and 130 as a shell reports a
    command Ctrl-C ended (click alone says "Aborted!" and exits 1). No progress bar either:
    stderr is no terminal."""
    _, _, process = slow_run(
        tmp_path, image_host, tiny_model, "int", stderr=subprocess.PIPE, text=True
    )
    engine, first_result_stored = first_result_of(f"sqlite:///{tmp_path}/int.sqlite3")

    try:
        wait_for(first_result_stored, 90, "the first batch")
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
        engine.dispose()
    assert process.returncode == 130, stderr
    assert stderr.splitlines()[-1] == (
        "run 1 interrupted: the records it finished are kept; continue it with "
        "`enrich resume --run 1`"
    )
    assert "Traceback" not in stderr and "Aborted!" not in stderr
    assert "classified" not in stderr  # the progress bar's


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_a_run_left_scheduling_is_interrupted_once_no_scheduler_holds_its_scope(
    tmp_path: Path, tiny_model: Path, dialect: str, request: pytest.FixtureRequest
) -> None:
    from enrichment.model.spec import read_model_json
    from enrichment.runs.schedule import ModelIdentity, start_run
    from enrichment.store.locks import LockLiveness, execution_scope, scope_lock
    from enrichment.store.query import run_summary

    spec, version, _ = read_model_json(tiny_model)
    url = (
        request.getfixturevalue("pg_url")
        if dialect == "postgresql"
        else f"sqlite:///{tmp_path}/scheduling.sqlite3"
    )
    db = open_database(url)
    scope = {"source": "records_file", "path": str(tmp_path / "records.jsonl")}
    run_id = start_run(db, ModelIdentity(version, spec), "on_demand", scope, full=False)
    liveness = LockLiveness(db)
    with scope_lock(db, scope):  # a scheduler at work: shown as it is
        assert run_summary(db, run_id, liveness).status == "scheduling"
    summary = run_summary(db, run_id, liveness)
    assert (summary.status, summary.eta_seconds) == ("interrupted", None)
    assert run_summary(db, run_id).status == "scheduling"  # stored as it was: not rewritten
    # The probe leaves the lock free for the next scheduler (`enrich resume`).
    with scope_lock(db, scope), scope_lock(db, execution_scope(run_id)):
        pass
    db.dispose()
