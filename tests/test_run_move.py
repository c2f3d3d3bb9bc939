"""`enrich resume --model-dir`: a run moves to another model version only when asked.

A run queued for workers of model A that never come is finished in process
with model B: refused while the operator only points ENRICH_MODEL at B, done
once `--model-dir B` says so, and refused again once nothing is left to move.
"""

from __future__ import annotations

import json
from pathlib import Path

import redis
import sqlalchemy as sa

from enrichment.model.spec import read_model_json
from tests.conftest import enrich, image_bytes, make_tiny_model, write_jsonl


def test_resume_moves_a_run_only_with_model_dir_and_refuses_when_nothing_is_left(
    tmp_path: Path, image_host, tiny_model: Path, redis_server
) -> None:
    broker = redis_server if isinstance(redis_server, str) else redis_server.url
    redis.Redis.from_url(broker).flushall()
    _, version_a, _ = read_model_json(tiny_model)
    model_b = tmp_path / "model-b"
    model_b.mkdir()
    version_b = make_tiny_model(model_b, seed=1)
    database = f"sqlite:///{tmp_path}/move.sqlite3"
    env_a = {
        "DATABASE_URL": database,
        "ENRICH_MODEL": str(tiny_model),
        "ENRICH_FETCH_ALLOW": "127.0.0.1",
    }
    rows = [
        {"id": f"/move/r{n}", "image_url": image_host.add(f"/move/{n}.png", image_bytes((n, 9, 9)))}
        for n in range(5)
    ]
    records = write_jsonl(tmp_path / "move.jsonl", rows)
    queued = enrich(
        "run", "--records", str(records), "--batch-size", "2", "--json",
        env={**env_a, "CELERY_BROKER_URL": broker},
    )  # fmt: skip
    assert queued.returncode == 0, queued.stderr
    run_id = json.loads(queued.stdout)["id"]
    shown = json.loads(enrich("status", "--run", str(run_id), "--json", env=env_a).stdout)
    assert shown["batches"] == {"queued": 3} and shown["waiting_for_model"] == version_a

    env_b = {**env_a, "ENRICH_MODEL": str(model_b)}
    implicit = enrich("resume", "--run", str(run_id), env=env_b)
    assert implicit.returncode == 1
    assert f"run {run_id} is for model {version_a}" in implicit.stderr
    assert "--model-dir" in implicit.stderr

    moved = enrich("resume", "--run", str(run_id), "--model-dir", str(model_b), "--json", env=env_a)
    assert moved.returncode == 0, moved.stderr
    summary = json.loads(moved.stdout)
    assert (summary["status"], summary["model_version"]) == ("completed", version_b)
    assert summary["batches"] == {"done": 3} and summary["waiting_for_model"] is None
    engine = sa.create_engine(database)
    with engine.connect() as connection:
        results = connection.execute(
            sa.text("SELECT model_version, count(*) FROM results GROUP BY 1")
        ).all()
    engine.dispose()
    assert [tuple(row) for row in results] == [(version_b, 5)]

    again = enrich("resume", "--run", str(run_id), "--model-dir", str(tiny_model), env=env_a)
    assert again.returncode == 1
    assert f"run {run_id} has nothing left to move to model {version_a}" in again.stderr
