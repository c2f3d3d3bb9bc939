"""A completed run keeps its counts when a later run takes its records' results over."""

from __future__ import annotations

from pathlib import Path

from enrichment.config import Settings
from enrichment.runs import service
from enrichment.store.database import Database
from enrichment.store.query import run_summary
from tests.scenario import build_scenario, run_in_process


def test_a_later_full_run_leaves_an_earlier_runs_counts_alone(
    tmp_path: Path, image_host, tiny_model: Path
) -> None:
    records, expected = build_scenario(image_host, tmp_path, tiny_model, prefix="/counts")
    settings = Settings(
        database_url=f"sqlite:///{tmp_path}/enrich.sqlite3",
        model_dir=tiny_model,
        fetch_allow=("127.0.0.1",),
    )
    scope = service.records_scope(records)
    db = Database(settings.database_url)
    first = run_in_process(settings, scope)
    before = run_summary(db, first)
    assert before.records_done == len(expected)

    again = run_in_process(settings, scope, full=True)
    assert run_summary(db, again).records_done == len(expected)

    after = run_summary(db, first)
    keys = ("status", "records_done", "outcomes", "errors_by_reason", "finished_at")
    assert {key: getattr(after, key) for key in keys} == {key: getattr(before, key) for key in keys}
