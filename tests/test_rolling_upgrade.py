"""A rolling upgrade under a run: real Redis, real Celery workers, real PostgreSQL.

A run is queued for model A and A's worker has done part of it when the
machine is upgraded: a worker for B starts and A's stops. Nothing of A's run
may fail or be classified by B: its batches wait on A's queue, `enrich status`
says the run waits for a worker with model A, and an old message that does
reach B (as a release before routing left it on the shared queue) is handed
back without counting an attempt. When an A worker comes back the run
completes; a second run (a sample run) is moved to B explicitly
(`enrich resume --model-dir`) and completes there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from enrichment.model.spec import read_model_json
from enrichment.runs.schedule import version_queue
from tests.conftest import enrich, image_bytes, make_tiny_model, write_jsonl
from tests.services import CeleryWorker, wait_for
from tests.test_worker_runtime import Db, stack_env, start


@pytest.fixture
def broker(redis_server) -> str:
    """The URL of the session's Redis, emptied for this test (`redis_server`)."""
    return redis_server if isinstance(redis_server, str) else redis_server.url


@pytest.fixture
def workers() -> Iterator[list[CeleryWorker]]:
    started: list[CeleryWorker] = []
    yield started
    for worker in started:
        worker.stop()


CELERY_CALL = (sys.executable, "-m", "celery", "--app", "worker.app", "call")


def records_file(tmp_path: Path, image_host, name: str, count: int, delay: float) -> Path:
    rows = [
        {
            "id": f"/{name}/r{index}",
            "image_url": image_host.add(
                f"/{name}/{index}.png", image_bytes((25 * index, 80, 140), "circle"), delay=delay
            ),
        }
        for index in range(count)
    ]
    return write_jsonl(tmp_path / f"{name}.jsonl", rows)


def status(env: dict[str, str], run_id: int) -> dict:
    shown = enrich("status", "--run", str(run_id), "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    return json.loads(shown.stdout)


def send_old_message(env: dict[str, str], batch_id: int, queue: str) -> None:
    """A message for the batch on `queue`, as a release before routing by version sent it."""
    call = subprocess.run(
        [
            *CELERY_CALL,
            "enrichment.process_batch",
            "--args",
            json.dumps([batch_id]),
            "--queue",
            queue,
        ],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert call.returncode == 0, call.stderr


def test_a_rolling_upgrade_fails_nothing_and_b_never_runs_a_batch_of_a(
    tmp_path: Path,
    pg_url: str,
    broker: str,
    tiny_model: Path,
    image_host,
    workers,
) -> None:
    _, version_a, _ = read_model_json(tiny_model)
    model_b = tmp_path / "model-b"
    model_b.mkdir()
    version_b = make_tiny_model(model_b, name="tiny", seed=1)
    assert version_b != version_a
    env_a = stack_env(
        pg_url,
        broker,
        tiny_model,
        ENRICH_HEARTBEAT_INTERVAL="1",
        ENRICH_HEARTBEAT_STALE="5",
        ENRICH_PROCESSES_PER_GPU="1",
        ENRICH_FETCH_HOST_LIMITS="127.0.0.1=16",
    )
    env_b = {**env_a, "ENRICH_MODEL": str(model_b)}
    assert enrich("db", "upgrade", env=env_a).returncode == 0
    db = Db(pg_url)
    slow = records_file(tmp_path, image_host, "rolling", 10, delay=1.0)

    worker_a = CeleryWorker(env_a, tmp_path / "a.log")
    workers.append(worker_a)
    run_id = start(env_a, "--records", str(slow), "--batch-size", "2")
    wait_for(
        lambda: any(b["status"] == "done" for b in db.batches(run_id)), 60, "A to finish a batch"
    )
    worker_a.stop()  # a warm shutdown: the batch in hand finishes, the rest waits on A's queue
    for index in range(10):
        image_host.routes[f"/rolling/{index}.png"].delay = 0.0
    before = db.batches(run_id)
    assert any(b["status"] == "queued" for b in before)

    worker_b = CeleryWorker(env_b, tmp_path / "b.log")
    workers.append(worker_b)
    waiting = db.value(
        "SELECT min(id) FROM batches WHERE run_id = :id AND status = 'queued'", id=run_id
    )
    send_old_message(env_b, waiting, "enrich.on_demand")
    wait_for(lambda: "handed back to" in worker_b.output(), 60, "B to hand the old message back")
    assert version_queue("enrich.on_demand", version_a) in worker_b.output()
    wait_for(
        lambda: status(env_a, run_id)["waiting_for_model"] == version_a,
        30,
        "status to say the run waits for a worker with model A",
    )
    shown = enrich("status", "--run", str(run_id), env=env_a).stdout
    assert f"waiting        for a worker with model {version_a}" in shown
    assert status(env_a, run_id)["status"] == "running"
    assert db.batches(run_id) == before, "B started (or failed) a batch of A's run"
    assert db.value("SELECT count(*) FROM results WHERE model_version = :v", v=version_b) == 0

    worker_a = CeleryWorker(env_a, tmp_path / "a-again.log")
    workers.append(worker_a)
    wait_for(lambda: db.run_status(run_id) == "completed", 90, "the run to complete on A")
    assert status(env_a, run_id)["waiting_for_model"] is None
    finished = db.batches(run_id)
    assert [(b["status"], b["attempts"]) for b in finished] == [("done", 1)] * 5
    per_record = db.rows(
        "SELECT record_id, model_version FROM results WHERE run_id = :id ORDER BY record_id",
        id=run_id,
    )
    assert len(per_record) == 10 and {r["model_version"] for r in per_record} == {version_a}
    assert db.value("SELECT count(*) FROM results") == 10
    worker_a.stop()

    # No A worker now: a new run for A (a sample of 4 of 6 records) waits, and is moved to
    # B only when asked.
    quick = records_file(tmp_path, image_host, "moved", 6, delay=0.0)
    moved = start(env_a, "--records", str(quick), "--batch-size", "2", "--sample", "4")
    wait_for(lambda: status(env_a, moved)["waiting_for_model"] == version_a, 30, "the run to wait")
    assert db.value("SELECT count(*) FROM results WHERE run_id = :id", id=moved) == 0
    resumed = enrich("resume", "--run", str(moved), "--model-dir", str(model_b), env=env_a)
    assert resumed.returncode == 0, resumed.stderr
    assert f"run {moved} is for model {version_b}" in resumed.stderr
    wait_for(lambda: db.run_status(moved) == "completed", 90, "the moved run to complete on B")
    assert db.rows(
        "SELECT model_version, count(*) AS n FROM results WHERE run_id = :id GROUP BY 1", id=moved
    ) == [{"model_version": version_b, "n": 4}]
    again = enrich("resume", "--run", str(moved), "--model-dir", str(tiny_model), env=env_a)
    assert again.returncode == 1
    assert "nothing left to move" in again.stderr
