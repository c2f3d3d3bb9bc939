"""`enrich run --sample N [--seed S]`: a stable random draw of the scope, reviewed records first.

In-process on SQLite, as a newcomer runs it; the same scheduler cuts a sample
for Celery workers (tests/test_rolling_upgrade.py runs one there).
"""

from __future__ import annotations

import json
from pathlib import Path

import sqlalchemy as sa

from enrichment.model.spec import read_model_json
from enrichment.store.database import Database
from enrichment.store.decisions import NewDecision, record_decisions
from tests.conftest import enrich, enrich_here, image_bytes, make_tiny_model, write_jsonl

RECORDS = 24


def records(tmp_path: Path, image_host, name: str, rows: list[dict]) -> Path:
    return write_jsonl(tmp_path / f"{name}.jsonl", rows)


def all_rows(image_host) -> list[dict]:
    return [
        {
            "id": f"/sample/r{index:02d}",
            "image_url": image_host.add(
                f"/sample/{index}.png", image_bytes((10 * index, 120, 60), "bar")
            ),
        }
        for index in range(RECORDS)
    ]


def run(env: dict[str, str], path: Path, *args: str) -> dict:
    """`enrich run` in this process (its subprocess is covered by the refusal below and by
    tests/test_run_in_process.py): the model loaded without a new interpreter each time."""
    done = enrich_here("run", "--records", str(path), "--batch-size", "4", *args, "--json", env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def drawn(database: str, run_id: int) -> set[str]:
    engine = sa.create_engine(database)
    with engine.connect() as connection:
        found = connection.execute(
            sa.text("SELECT record_id FROM results WHERE run_id = :id"), {"id": run_id}
        )
        rows = {row[0] for row in found}
    engine.dispose()
    return rows


def test_the_same_size_and_seed_draw_the_same_records_whatever_the_order(
    tmp_path: Path, image_host, tiny_model: Path
) -> None:
    database = f"sqlite:///{tmp_path}/sample.sqlite3"
    env = {"DATABASE_URL": database, "ENRICH_MODEL": str(tiny_model)}
    env["ENRICH_FETCH_ALLOW"] = "127.0.0.1"
    rows = all_rows(image_host)
    forward = records(tmp_path, image_host, "forward", rows)
    backward = records(tmp_path, image_host, "backward", rows[::-1])

    first = run(env, forward, "--sample", "5", "--seed", "3")
    assert (first["status"], first["records_seen"], first["records_enqueued"]) == (
        "completed",
        RECORDS,
        5,
    )
    chosen = drawn(database, first["id"])
    assert len(chosen) == 5
    # Paged in the other order, and classified again (--full): the same five.
    again = run(env, backward, "--sample", "5", "--seed", "3", "--full")
    assert drawn(database, again["id"]) == chosen
    # Not --full: the draw is the same and already classified, so nothing is enqueued.
    assert run(env, forward, "--sample", "5", "--seed", "3")["records_enqueued"] == 0
    other = run(env, forward, "--sample", "5", "--seed", "4", "--full")
    assert len(drawn(database, other["id"])) == 5 and drawn(database, other["id"]) != chosen

    refused = enrich("run", "--records", str(forward), "--seed", "3", env=env)
    assert refused.returncode == 2 and "--sample" in refused.stderr


def test_a_sample_prefers_records_the_current_version_classified_and_curators_reviewed(
    tmp_path: Path, image_host, tiny_model: Path
) -> None:
    database = f"sqlite:///{tmp_path}/prefer.sqlite3"
    env = {"DATABASE_URL": database, "ENRICH_MODEL": str(tiny_model)}
    env["ENRICH_FETCH_ALLOW"] = "127.0.0.1"
    _, current, _ = read_model_json(tiny_model)
    candidate = tmp_path / "candidate"
    candidate.mkdir()
    make_tiny_model(candidate, seed=1)
    rows = all_rows(image_host)
    classified = [row["id"] for row in rows[8:16]]
    run(env, records(tmp_path, image_host, "current", rows[8:16]))
    reviewed = set(classified[:3])
    record_decisions(
        Database(database),
        [NewDecision(record_id, "map", current, "reject", "curator") for record_id in reviewed],
    )

    sample = run(
        env,
        records(tmp_path, image_host, "all", rows),
        "--sample",
        "5",
        "--model-dir",
        str(candidate),
    )
    chosen = drawn(database, sample["id"])
    assert len(chosen) == 5
    assert reviewed <= chosen, "every reviewed record comes first"
    assert chosen <= set(classified), "then records the current version classified"
