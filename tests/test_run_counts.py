"""A completed run keeps its counts when a later run takes its records' results over."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import enrich
from tests.scenario import build_scenario


def test_a_later_full_run_leaves_an_earlier_runs_counts_alone(
    tmp_path: Path, image_host, tiny_model: Path
) -> None:
    records, expected = build_scenario(image_host, tmp_path, tiny_model, prefix="/counts")
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path}/enrich.sqlite3",
        "ENRICH_MODEL": str(tiny_model),
        "ENRICH_FETCH_ALLOW": "127.0.0.1",
    }
    first = enrich("run", "--records", str(records), "--json", env=env)
    assert first.returncode == 0, first.stderr
    before = json.loads(first.stdout)
    assert before["records_done"] == len(expected)

    again = enrich("run", "--records", str(records), "--full", "--json", env=env)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["records_done"] == len(expected)

    status = enrich("status", "--run", str(before["id"]), "--json", env=env)
    assert status.returncode == 0, status.stderr
    after = json.loads(status.stdout)
    keys = ("status", "records_done", "outcomes", "errors_by_reason", "finished_at")
    assert {key: after[key] for key in keys} == {key: before[key] for key in keys}
