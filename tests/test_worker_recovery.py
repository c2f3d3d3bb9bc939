"""A killed worker recovered without an operator: heartbeats, and the sweep by live workers.

With the default visibility timeout (an hour), a batch whose worker machine
died would wait an hour for the broker to hand it out again. The live workers
find it by its stale heartbeat and send it again; nobody runs `enrich resume`.
"""

from __future__ import annotations

import json
from pathlib import Path

import redis

from enrichment.model.spec import read_model_json
from tests.conftest import enrich, enrich_here, image_bytes, write_jsonl
from tests.services import CeleryWorker, wait_for
from tests.test_worker_runtime import Db


def test_a_sigkilled_worker_machine_is_recovered_by_the_live_worker(
    tmp_path: Path, pg_url: str, redis_server, tiny_model: Path, image_host
) -> None:
    broker = redis_server if isinstance(redis_server, str) else redis_server.url
    redis.Redis.from_url(broker).flushall()
    env = {
        "DATABASE_URL": pg_url,
        "CELERY_BROKER_URL": broker,
        "ENRICH_MODEL": str(tiny_model),
        "ENRICH_FETCH_ALLOW": "127.0.0.1",
        "ENRICH_FETCH_HOST_LIMITS": "127.0.0.1=16",
        "ENRICH_HEARTBEAT_INTERVAL": "1",
        "ENRICH_HEARTBEAT_STALE": "5",
    }  # ENRICH_VISIBILITY_TIMEOUT stays at its default, 3600 s
    assert enrich_here("db", "upgrade", env=env).returncode == 0
    routes = []
    rows = []
    for index in range(8):
        path = f"/recover/{index}.png"
        rows.append(
            {
                "id": f"/recover/r{index}",
                "image_url": image_host.add(path, image_bytes((index * 30, 60, 90)), delay=30.0),
            }
        )
        routes.append(path)
    records = write_jsonl(tmp_path / "recover.jsonl", rows)
    db = Db(pg_url)
    doomed = CeleryWorker(env, tmp_path / "doomed.log")
    live: CeleryWorker | None = None
    try:
        started = enrich("run", "--records", str(records), "--batch-size", "4", "--json", env=env)
        assert started.returncode == 0, started.stderr
        run_id = json.loads(started.stdout)["id"]
        wait_for(
            lambda: [b["attempts"] for b in db.batches(run_id)] == [1, 1],
            60,
            "both batches to start on the doomed worker",
        )
        doomed.kill_group()
        for path in routes:  # the images come quickly from now on
            image_host.routes[path].delay = 0.0
        live = CeleryWorker(env, tmp_path / "live.log")
        wait_for(lambda: db.run_status(run_id) == "completed", 90, "the run to complete")
    finally:
        if live is not None:
            live.stop()
        doomed.stop()

    assert db.value("SELECT count(*) FROM results WHERE run_id = :id", id=run_id) == 8
    assert db.value("SELECT count(DISTINCT record_id) FROM results") == 8
    duplicates = db.value(
        "SELECT count(*) FROM (SELECT record_id, label_key FROM labels"
        " GROUP BY 1, 2 HAVING count(*) > 1) AS repeated"
    )
    assert duplicates == 0
    assert [(b["status"], b["attempts"]) for b in db.batches(run_id)] == [("done", 2)] * 2
    # ... to the queue of the run's model version, which only workers holding it consume.
    version = read_model_json(tiny_model)[1]
    assert f"stopped beating; sent again to enrich.on_demand.{version.replace('@', '-')}" in (
        live.output()
    )
