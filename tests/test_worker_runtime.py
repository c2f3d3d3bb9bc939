"""The Celery runtime under failure: real workers, Redis and PostgreSQL, killed and restarted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from enrichment.store.schema import utc_now
from tests.conftest import enrich, enrich_here, image_bytes, write_jsonl
from tests.search_api import KEY, SearchAPI, generated_item
from tests.services import CeleryWorker, PostgresServer, RedisServer, wait_for


@pytest.fixture
def broker(redis_server) -> str:
    """The URL of the session's Redis, emptied for this test (`redis_server`)."""
    return redis_server if isinstance(redis_server, str) else redis_server.url


def stack_env(database_url: str, broker_url: str, model: Path, **extra: str) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "CELERY_BROKER_URL": broker_url,
        "ENRICH_MODEL": str(model),
        "ENRICH_FETCH_ALLOW": "127.0.0.1",
        **extra,
    }


def slow_records(tmp: Path, host, name: str, count: int, delay: float) -> Path:
    rows = [
        {
            "id": f"/{name}/r{index:03d}",
            "image_url": host.add(
                f"/{name}/{index}.png",
                image_bytes((40 * index % 255, 90, 160), "circle"),
                delay=delay,
            ),
        }
        for index in range(count)
    ]
    return write_jsonl(tmp / f"{name}.jsonl", rows)


def slow_collection(host, prefix: str, datasets: dict[str, int], delay: float = 1.0) -> SearchAPI:
    """A local Search API over datasets whose images each take `delay` seconds to arrive."""
    api = SearchAPI()
    for dataset, count in datasets.items():
        for index in range(count):
            body = image_bytes((index * 5 % 255, 100, 50))
            url = host.add(f"/{prefix}/{dataset}/{index}.png", body, delay=delay)
            api.items.append(generated_item(dataset, index, url))
    return api


def api_env(database_url: str, broker_url: str, model: Path, api: SearchAPI) -> dict[str, str]:
    return stack_env(
        database_url,
        broker_url,
        model,
        EUROPEANA_API_KEY=KEY,
        EUROPEANA_API_URL=api.url,
        ENRICH_BATCH_SIZE="4",
    )


class Db:
    """Direct reads of what the workers wrote."""

    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(url, pool_pre_ping=True)

    def rows(self, sql: str, **params) -> list[dict]:
        with self.engine.connect() as connection:
            return [dict(row) for row in connection.execute(sa.text(sql), params).mappings()]

    def value(self, sql: str, **params):
        with self.engine.connect() as connection:
            return connection.execute(sa.text(sql), params).scalar()

    def run_status(self, run_id: int) -> str | None:
        try:
            return self.value("SELECT status FROM runs WHERE id = :id", id=run_id)
        except sa.exc.OperationalError:
            return None

    def batches(self, run_id: int) -> list[dict]:
        return self.rows(
            "SELECT seq, status, attempts, updated_at FROM batches WHERE run_id = :id ORDER BY seq",
            id=run_id,
        )


def start(env: dict[str, str], *args: str) -> int:
    result = enrich("run", *args, "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["id"]


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[CeleryWorker]]:
    started: list[CeleryWorker] = []
    yield started
    for worker in started:
        worker.stop()


def test_on_demand_dataset_overtakes_a_nightly_backlog(
    tmp_path: Path, pg_url: str, broker: str, tiny_model: Path, image_host, workers
) -> None:
    # Slow enough that the nightly backlog outlasts starting the on-demand run, with a
    # worker running two batches at once.
    api = slow_collection(image_host, "prio", {"1000": 60, "2000": 12}, delay=2.0)
    env = api_env(pg_url, broker, tiny_model, api)
    assert enrich_here("db", "upgrade", env=env).returncode == 0
    db = Db(pg_url)
    workers.append(CeleryWorker(env, tmp_path / "worker.log"))
    nightly = start(env, "--all")
    wait_for(lambda: any(b["status"] == "done" for b in db.batches(nightly)), 60, "a nightly batch")
    on_demand = start(env, "--dataset", "2000")
    sent = utc_now()
    wait_for(lambda: db.run_status(on_demand) == "completed", 120, "the on-demand run")
    on_demand_done = max(b["updated_at"] for b in db.batches(on_demand))
    wait_for(lambda: db.run_status(nightly) == "completed", 120, "the nightly run")
    api.close()

    nightly_batches = db.batches(nightly)
    assert len(nightly_batches) == 18 and len(db.batches(on_demand)) == 3
    overtaken = [b for b in nightly_batches if b["updated_at"] > on_demand_done]
    in_between = [b for b in nightly_batches if sent < b["updated_at"] <= on_demand_done]
    # A worker runs two batches at once (ENRICH_PROCESSES_PER_GPU): the nightly batches
    # already running when the on-demand run arrives may finish in between, no others.
    assert len(in_between) <= 2, "only the nightly batches already running may finish in between"
    assert len(overtaken) >= 3, "the on-demand run must finish ahead of the nightly backlog"


def test_sigkilled_worker_mid_batch_loses_and_duplicates_nothing(
    tmp_path: Path, pg_url: str, broker: str, tiny_model: Path, image_host, workers
) -> None:
    env = stack_env(pg_url, broker, tiny_model, ENRICH_VISIBILITY_TIMEOUT="10")
    assert enrich_here("db", "upgrade", env=env).returncode == 0
    db = Db(pg_url)
    first = CeleryWorker(env, tmp_path / "first.log")
    run_id = start(
        env,
        "--records",
        str(slow_records(tmp_path, image_host, "kill", 8, 2.0)),
        "--batch-size",
        "4",
    )
    wait_for(lambda: db.batches(run_id)[0]["attempts"] == 1, 60, "the first batch to start")
    assert db.batches(run_id)[0]["status"] != "done"
    first.kill()
    started = [b["attempts"] for b in db.batches(run_id)]  # a worker runs two batches at once

    workers.append(CeleryWorker(env, tmp_path / "second.log"))
    wait_for(lambda: db.run_status(run_id) == "completed", 120, "the run to complete")

    assert db.value("SELECT count(*) FROM results WHERE run_id = :id", id=run_id) == 8
    assert db.value("SELECT count(DISTINCT record_id) FROM results") == 8
    duplicates = db.value(
        "SELECT count(*) FROM (SELECT record_id, label_key FROM labels"
        " GROUP BY 1, 2 HAVING count(*) > 1) AS repeated"
    )
    assert duplicates == 0
    # The dead worker's attempts stay counted and each restart counts its own. At least:
    # an attempt the dead worker was committing as it died may land after `started` was
    # read, and under load a batch running past the 10 s visibility timeout is sent once
    # more (idempotent: the rows above are written once).
    finished = db.batches(run_id)
    assert [b["status"] for b in finished] == ["done"] * len(started)
    assert all(b["attempts"] >= attempts + 1 for b, attempts in zip(finished, started, strict=True))
    assert finished[0]["attempts"] >= 2, "the killed batch: the dead worker's and the restart"


def test_redis_restart_mid_run_then_resume_completes(
    tmp_path: Path, pg_url: str, tiny_model: Path, image_host, workers
) -> None:
    server = RedisServer()
    try:
        env = stack_env(pg_url, server.url, tiny_model)
        assert enrich_here("db", "upgrade", env=env).returncode == 0
        db = Db(pg_url)
        workers.append(CeleryWorker(env, tmp_path / "worker.log"))
        records = slow_records(tmp_path, image_host, "redis", 12, 1.0)
        run_id = start(env, "--records", str(records), "--batch-size", "4")
        wait_for(lambda: db.batches(run_id)[0]["status"] == "done", 60, "the first batch")
        server.stop()  # queued messages are gone with it: this Redis keeps nothing on disk
        server.start()
        resumed = enrich("resume", "--run", str(run_id), "--json", env=env)
        assert resumed.returncode == 0, resumed.stderr
        wait_for(lambda: db.run_status(run_id) == "completed", 120, "the run to complete")
        assert db.value("SELECT count(*) FROM results WHERE run_id = :id", id=run_id) == 12
        assert all(b["status"] == "done" for b in db.batches(run_id))
    finally:
        server.close()


def test_postgres_refusing_connections_during_a_batch_is_retried(
    tmp_path: Path, broker: str, tiny_model: Path, image_host, workers
) -> None:
    server = PostgresServer()
    try:
        env = stack_env(server.url, broker, tiny_model)
        assert enrich_here("db", "upgrade", env=env).returncode == 0
        db = Db(server.url)
        workers.append(CeleryWorker(env, tmp_path / "worker.log"))
        run_id = start(
            env,
            "--records",
            str(slow_records(tmp_path, image_host, "pg", 4, 3.0)),
            "--batch-size",
            "4",
        )
        wait_for(
            lambda: (db.batches(run_id) or [{}])[0].get("attempts") == 1, 60, "the batch to start"
        )
        db.engine.dispose()
        server.stop()
        time.sleep(4)
        server.start()
        wait_for(lambda: db.run_status(run_id) == "completed", 120, "the run to complete")
        assert db.value("SELECT count(*) FROM results WHERE run_id = :id", id=run_id) == 4
        assert "Retry in" in workers[0].output()
        assert db.batches(run_id)[0]["status"] == "done"
    finally:
        server.close()


def test_poison_batch_is_given_up_after_its_attempts(
    tmp_path: Path, pg_url: str, broker: str, tiny_model: Path, image_host, workers
) -> None:
    # One pool process, so that killing it kills only the batch that "poisons" it.
    env = stack_env(
        pg_url, broker, tiny_model, ENRICH_MAX_ATTEMPTS="2", ENRICH_PROCESSES_PER_GPU="1"
    )
    assert enrich_here("db", "upgrade", env=env).returncode == 0
    db = Db(pg_url)
    worker = CeleryWorker(env, tmp_path / "worker.log")
    workers.append(worker)
    run_id = start(
        env,
        "--records",
        str(slow_records(tmp_path, image_host, "poison", 8, 2.0)),
        "--batch-size",
        "4",
    )
    for attempt in (1, 2):  # the first batch kills its pool process every time it runs
        wait_for(lambda a=attempt: db.batches(run_id)[0]["attempts"] == a, 60, f"attempt {attempt}")
        for pid in worker.pool_pids():
            os.kill(pid, 9)
    wait_for(lambda: db.run_status(run_id) == "completed", 120, "the run to complete")

    poisoned, healthy = db.batches(run_id)
    assert (poisoned["status"], poisoned["attempts"]) == ("failed", 2)
    assert healthy["status"] == "done"
    failed = db.rows(
        "SELECT record_id, error_reason, error_message FROM results"
        " WHERE run_id = :id AND status = 'error'",
        id=run_id,
    )
    assert sorted(row["record_id"] for row in failed) == [f"/poison/r{i:03d}" for i in range(4)]
    assert all(row["error_reason"] == "batch_failed" for row in failed)
    assert all("started 2 times without finishing" in row["error_message"] for row in failed)


def test_nightly_task_runs_the_whole_collection_and_never_overlaps(
    tmp_path: Path, pg_url: str, broker: str, tiny_model: Path, image_host, workers
) -> None:
    api = slow_collection(image_host, "nightly", {"3000": 40})
    env = api_env(pg_url, broker, tiny_model, api)
    assert enrich_here("db", "upgrade", env=env).returncode == 0
    scheduler_argv = [
        sys.executable,
        "-m",
        "celery",
        "--app",
        "worker.app",
        "worker",
        "--queues",
        "enrich.scheduler",
        "--pool",
        "solo",
        "--without-gossip",
        "--without-mingle",
        "--hostname",
        "scheduler@%h",
        "--loglevel",
        "INFO",
    ]
    workers.append(
        CeleryWorker(
            {**env, "ENRICH_PRELOAD_MODEL": "0"}, tmp_path / "scheduler.log", scheduler_argv
        )
    )
    workers.append(CeleryWorker(env, tmp_path / "gpu.log"))
    db = Db(pg_url)

    def trigger() -> None:
        call = subprocess.run(
            [
                sys.executable,
                "-m",
                "celery",
                "--app",
                "worker.app",
                "call",
                "enrichment.nightly_run",
            ],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert call.returncode == 0, call.stderr

    trigger()
    wait_for(lambda: db.value("SELECT count(*) FROM runs") == 1, 60, "the nightly run to start")
    trigger()  # the first is still running: this one must not start a second run
    wait_for(
        lambda: "nightly run not started" in workers[0].output(), 60, "the overlap to be refused"
    )
    wait_for(lambda: db.run_status(1) == "completed", 120, "the nightly run")
    api.close()
    assert db.value("SELECT count(*) FROM runs") == 1
    assert db.rows("SELECT kind, queue, records_seen FROM runs") == [
        {"kind": "nightly", "queue": "enrich.nightly", "records_seen": 40}
    ]
    assert db.value("SELECT count(*) FROM results WHERE run_id = 1") == 40


def test_a_worker_whose_weights_do_not_match_its_model_json_does_not_start(
    tiny_model: Path, tmp_path: Path
) -> None:
    """It started, took each batch message and dropped it (its processes could not load
    the weights), and the run waited for ever with nothing said."""
    damaged = tmp_path / "model"
    shutil.copytree(tiny_model, damaged)
    weights = damaged / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10] + b"\0" * 10)
    env = {
        "CELERY_BROKER_URL": "redis://127.0.0.1:9/0",  # never reached: it stops before
        "DATABASE_URL": f"sqlite:///{tmp_path}/db.sqlite3",
        "ENRICH_MODEL": str(damaged),
    }
    refused = enrich_here("worker", env=env)
    assert refused.returncode == 1
    assert "the weights do not belong to this model.json" in refused.stderr
    assert "Traceback" not in refused.stderr
