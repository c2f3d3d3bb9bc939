"""The walking skeleton distributed: a real Celery worker, Redis as broker, PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

from enrichment.model.spec import read_model_json
from tests.conftest import VOCABULARY, enrich
from tests.scenario import assert_rows_match, build_scenario, stored_rows
from tests.services import CeleryWorker, wait_for


def test_run_through_celery_worker_redis_and_postgres(
    tmp_path: Path, image_host, tiny_model: Path, pg_url: str, redis_server
) -> None:
    broker = redis_server if isinstance(redis_server, str) else redis_server.url
    records, expected = build_scenario(image_host, tmp_path, tiny_model, prefix="/celery")
    _, version, _ = read_model_json(tiny_model)
    env = {
        "DATABASE_URL": pg_url,
        "CELERY_BROKER_URL": broker,
        "ENRICH_MODEL": str(tiny_model),
        "ENRICH_FETCH_ALLOW": "127.0.0.1",
    }
    upgraded = enrich("db", "upgrade", env=env)
    assert upgraded.returncode == 0, upgraded.stderr

    worker = CeleryWorker(env, tmp_path / "worker.log")
    try:
        started = enrich("run", "--records", str(records), "--batch-size", "3", "--json", env=env)
        assert started.returncode == 0, started.stderr
        run_id = json.loads(started.stdout)["id"]

        def finished() -> bool:
            status = enrich("status", str(run_id), "--json", env=env)
            return json.loads(status.stdout)["status"] == "completed"

        wait_for(finished, 120, "the run to complete")
    finally:
        worker.stop()
    log = worker.output()
    assert log.count("succeeded in") == 3, log

    summary = json.loads(enrich("status", str(run_id), "--json", env=env).stdout)
    assert summary["batches"] == {"done": 3}
    assert summary["outcomes"]["error"] == 3
    assert_rows_match(stored_rows(pg_url), expected, version)

    out = tmp_path / "labels.jsonld"
    assert enrich("export", "--out", str(out), "--run", str(run_id), env=env).returncode == 0
    document = json.loads(out.read_text())
    exported = sorted(
        (a["target"]["scope"].rsplit("/item", 1)[1], a["body"], a["confidence"])
        for a in document["first"]["items"]
    )
    want = sorted(
        (record, VOCABULARY[key], round(confidence, 6))
        for record, item in expected.items()
        for key, confidence in item.labels.items()
    )
    assert [(r, b) for r, b, _ in exported] == [(r, b) for r, b, _ in want]
    assert all(abs(got[2] - w[2]) < 1e-5 for got, w in zip(exported, want, strict=True))
    assert all(a["generator"]["version"] == version for a in document["first"]["items"])
