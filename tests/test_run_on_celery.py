"""A run distributed: a real Celery worker, Redis as broker, PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import sqlalchemy as sa

from enrichment.model.spec import read_model_json
from tests.conftest import VOCABULARY, enrich, enrich_here, image_bytes, write_jsonl
from tests.scenario import assert_rows_match, build_scenario, stored_rows
from tests.services import CeleryWorker, free_port, wait_for


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

    summary = json.loads(enrich("status", "--run", str(run_id), "--json", env=env).stdout)
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


def _records(tmp_path: Path, image_host) -> Path:
    return write_jsonl(
        tmp_path / "one.jsonl",
        [{"id": "/broker/a", "image_url": image_host.add("/broker/a.png", image_bytes((1, 2, 3)))}],
    )


def _runs(database_url: str) -> int:
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as connection:
            return connection.execute(sa.text("SELECT count(*) FROM runs")).scalar_one()
    finally:
        engine.dispose()


def test_a_broker_url_with_an_unknown_scheme_is_refused_before_any_run(
    tmp_path: Path, image_host, tiny_model: Path
) -> None:
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path}/db.sqlite3",
        "CELERY_BROKER_URL": "rabbit://guest:secret@127.0.0.1/",
        "ENRICH_MODEL": str(tiny_model),
        "ENRICH_FETCH_ALLOW": "127.0.0.1",
    }
    assert enrich_here("db", "upgrade", env=env).returncode == 0
    result = enrich("run", "--records", str(_records(tmp_path, image_host)), env=env)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert "unknown scheme 'rabbit'" in line and "secret" not in line
    assert _runs(env["DATABASE_URL"]) == 0


def test_an_unreachable_broker_is_retried_for_a_while_then_one_clear_line(
    tmp_path: Path, image_host, tiny_model: Path
) -> None:
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path}/db.sqlite3",
        "CELERY_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0",
        "ENRICH_MODEL": str(tiny_model),
        "ENRICH_FETCH_ALLOW": "127.0.0.1",
        "ENRICH_BROKER_RETRY_SECONDS": "3",
    }
    assert enrich_here("db", "upgrade", env=env).returncode == 0
    began = time.monotonic()
    result = enrich("run", "--records", str(_records(tmp_path, image_host)), env=env)
    waited = time.monotonic() - began
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("Error: cannot reach the broker at redis://127.0.0.1:"), line
    assert "retried for about 3 s" in line
    assert 2 <= waited < 60
    assert _runs(env["DATABASE_URL"]) == 0


def test_the_nightly_task_fails_visibly_when_it_cannot_start(
    tmp_path: Path, tiny_model: Path, redis_server
) -> None:
    """A missing API key is not 'the scope is busy': the task fails, it is not logged away."""
    broker = redis_server if isinstance(redis_server, str) else redis_server.url
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path}/db.sqlite3",
        "CELERY_BROKER_URL": broker,
        "ENRICH_MODEL": str(tiny_model),
        "EUROPEANA_API_KEY": "",
    }
    task = subprocess.run(
        [sys.executable, "-c", "from worker.tasks import nightly_run_task; nightly_run_task()"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert task.returncode != 0
    assert "ConfigError: EUROPEANA_API_KEY is not set" in task.stderr
