"""A run on the embedded default: records file -> SQLite -> JSON-LD, in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from enrichment.model.spec import read_model_json
from tests.conftest import REPO, VOCABULARY, enrich, pseudo_terminal, read_terminal
from tests.scenario import assert_rows_match, build_scenario, stored_rows


def test_run_status_results_export_on_sqlite(tmp_path: Path, image_host, tiny_model: Path) -> None:
    records, expected = build_scenario(image_host, tmp_path, tiny_model, prefix="/inproc")
    _, version, _ = read_model_json(tiny_model)
    database = f"sqlite:///{tmp_path}/enrich.sqlite3"
    env = {
        "DATABASE_URL": database,
        "ENRICH_MODEL": str(tiny_model),
        "ENRICH_FETCH_ALLOW": "127.0.0.1",
    }

    run = enrich("run", "--records", str(records), "--batch-size", "3", "--json", env=env)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["status"] == "completed"
    assert summary["batches"] == {"done": 3}
    assert summary["records_enqueued"] == len(expected)
    assert sum(summary["outcomes"].values()) == summary["records_done"] == len(expected)
    assert summary["rate"] > 0 and summary["eta_seconds"] is None  # finished: nothing left
    assert summary["errors_by_reason"] == {"http_404": 1, "not_an_image": 1, "no_image": 1}
    assert_rows_match(stored_rows(database), expected, version)

    listing = enrich("results", "--record", "/e2e/missing", env=env)
    assert listing.returncode == 0, listing.stderr
    assert (
        listing.stdout.strip()
        == f"/e2e/missing\terror\thttp_404: the image server answered HTTP 404\t{version}"
    )

    lines = enrich("results", "--json", env=env).stdout.splitlines()
    assert [json.loads(line)["record_id"] for line in lines] == sorted(expected)

    out = tmp_path / "labels.jsonld"
    exported = enrich("export", "--out", str(out), env=env)
    assert exported.returncode == 0, exported.stderr
    document = json.loads(out.read_text())
    annotations = document["first"]["items"]
    want = sorted((record, key) for record, item in expected.items() for key in item.labels)
    assert document["total"] == len(want) == len(annotations)
    assert all(a["type"] == "Annotation" and a["motivation"] == "classifying" for a in annotations)
    got = sorted(
        (a["target"]["scope"].removeprefix("http://data.europeana.eu/item"), a["body"])
        for a in annotations
    )
    assert got == sorted((record, VOCABULARY[key]) for record, key in want)

    again = enrich("run", "--records", str(records), "--json", env=env)
    assert again.returncode == 3, again.stderr  # the three it retried all failed again
    rerun = json.loads(again.stdout)
    # Incremental: only the three records whose result was an error are retried.
    assert rerun["records_enqueued"] == 3
    assert_rows_match(stored_rows(database), expected, version)


def enrich_on_a_terminal(
    *args: str, env: dict[str, str]
) -> tuple[subprocess.CompletedProcess, str]:
    """`enrich` with its stderr on a pseudo-terminal, as a person at one sees it: the
    command and what the terminal showed."""
    controller, terminal = pseudo_terminal()
    process = subprocess.Popen(
        [sys.executable, "-m", "enrichment", *args],
        env={**os.environ, **env},
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=terminal,
        text=True,
    )
    os.close(terminal)
    try:  # read as it is written: a full terminal would hold the command up
        shown = read_terminal(controller)
        stdout, _ = process.communicate(timeout=180)
    finally:
        process.kill()
        os.close(controller)
    done = subprocess.CompletedProcess(process.args, process.returncode, stdout, None)
    return done, shown.decode()


def test_a_run_in_which_every_record_failed_exits_3_and_the_bar_has_its_own_line(
    tmp_path: Path, image_host, tiny_model: Path
) -> None:
    records = tmp_path / "records.jsonl"
    records.write_text(
        "".join(
            json.dumps({"id": f"/gone/{n}", "image_url": image_host.url(f"/gone/{n}.png")}) + "\n"
            for n in range(4)
        )
    )
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path}/enrich.sqlite3",
        "ENRICH_MODEL": str(tiny_model),
        "ENRICH_FETCH_ALLOW": "127.0.0.1",
    }
    run, stderr = enrich_on_a_terminal("run", "--records", str(records), env=env)
    assert run.returncode == 3, stderr
    assert "run 1 completed" in run.stdout
    # What the run did, counted when it completed (later thresholds may tell otherwise).
    assert "  outcomes       4 error (when it completed)" in run.stdout.splitlines()
    lines = stderr.replace("\r", "\n").splitlines()
    assert lines[0].startswith("run 1 started for model tiny@")
    bars = [line for line in lines if line.startswith("classified:")]
    assert bars and "4 records [" in bars[-1] and "record/s" not in bars[-1]
    assert "every record of run 1 failed: see `enrich results --run 1`" in lines
    # Not on a terminal (a cron job's log): no bar.
    logged = enrich("run", "--records", str(records), "--full", env=env)
    assert logged.returncode == 3 and "classified:" not in logged.stderr
    assert "every record of run 2 failed: see `enrich results --run 2`" in logged.stderr

    as_json = enrich("resume", "--run", "1", "--json", env=env)
    assert as_json.returncode == 3 and json.loads(as_json.stdout)["outcomes"] == {"error": 4}
