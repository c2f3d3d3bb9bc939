"""No idle model between batches: the next batch downloads while this one is classified.

Two batches of slow images must finish in about the time of one, in-process
and through a real Celery worker. Bounds are generous (a loaded 2-core machine):
what is asserted is that the batches overlapped, not how fast they were.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import sqlalchemy as sa

from enrichment.bootstrap import in_process_dispatcher
from enrichment.config import Settings
from enrichment.model.classifier import Classifier
from enrichment.runs import service
from enrichment.runs.pipeline import process_batch
from enrichment.runs.schedule import ModelIdentity, RunKind
from enrichment.store.database import Database
from enrichment.store.schema import Batch, BatchStatus, Result, Run, RunStatus, utc_now
from tests.conftest import enrich, enrich_here, image_bytes, write_jsonl
from tests.services import CeleryWorker, wait_for

DELAY = 2.0


def slow_file(tmp: Path, host, name: str, count: int, delay: float = DELAY) -> Path:
    rows = [
        {
            "id": f"/{name}/r{index:02d}",
            "image_url": host.add(
                f"/{name}/{index}.png", image_bytes((index * 20 % 255, 80, 140)), delay=delay
            ),
        }
        for index in range(count)
    ]
    return write_jsonl(tmp / f"{name}.jsonl", rows)


def timed_run(settings: Settings, classifier: Classifier, records: Path) -> tuple[float, int]:
    db = Database(settings.database_url)
    db.ensure_schema()
    began = time.monotonic()
    with in_process_dispatcher(settings, classifier) as dispatcher:
        progress = service.start(
            db,
            settings,
            service.records_scope(records),
            RunKind.ON_DEMAND,
            ModelIdentity(classifier.version, classifier.spec),
            dispatcher,
            batch_size=4,
        )
    return time.monotonic() - began, progress.run_id


def test_two_batches_in_process_take_about_the_time_of_one(
    tmp_path: Path, tiny_model: Path, image_host
) -> None:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path}/db.sqlite3",
        fetch_allow=("127.0.0.1",),
        fetch_host_limits=(("127.0.0.1", 32),),
        batch_size=4,
    )
    classifier = Classifier.load(tiny_model)
    one, _ = timed_run(settings, classifier, slow_file(tmp_path, image_host, "one", 4))
    two, run_id = timed_run(settings, classifier, slow_file(tmp_path, image_host, "two", 8))
    assert one >= DELAY
    assert two < one + DELAY * 0.6, f"one batch {one:.1f} s, two batches {two:.1f} s"
    db = Database(settings.database_url)
    with db.transaction() as session:
        assert session.get(Run, run_id).status == RunStatus.COMPLETED
        assert session.scalar(sa.select(sa.func.count()).where(Result.run_id == run_id)) == 8


def test_a_record_listed_twice_in_a_batch_is_classified_once(
    tmp_path: Path, tiny_model: Path, image_host
) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path}/db.sqlite3", fetch_allow=("127.0.0.1",))
    classifier = Classifier.load(tiny_model)
    _, run_id = timed_run(settings, classifier, slow_file(tmp_path, image_host, "twice", 3, 0.0))
    db = Database(settings.database_url)
    with db.transaction() as session:
        batch = session.scalars(sa.select(Batch).where(Batch.run_id == run_id)).first()
        doubled = Batch(
            run_id=run_id,
            seq=99,
            status=BatchStatus.PENDING,
            attempts=0,
            record_ids=[*batch.record_ids, batch.record_ids[0]],
            updated_at=utc_now(),
        )
        session.add(doubled)
        session.flush()
        doubled_id = doubled.id
    with in_process_dispatcher(settings, classifier) as d:
        report = process_batch(db, doubled_id, classifier, d.fetcher, max_attempts=3)
    assert sum(report.outcomes.values()) == 3
    assert "error" not in report.outcomes


def test_two_batches_through_one_celery_worker_run_side_by_side(
    tmp_path: Path, tiny_model: Path, image_host, pg_url: str, redis_server
) -> None:
    broker = redis_server if isinstance(redis_server, str) else redis_server.url
    env = {
        "DATABASE_URL": pg_url,
        "CELERY_BROKER_URL": broker,
        "ENRICH_MODEL": str(tiny_model),
        "ENRICH_FETCH_ALLOW": "127.0.0.1",
        "ENRICH_FETCH_HOST_LIMITS": "127.0.0.1=32",
    }
    assert enrich_here("db", "upgrade", env=env).returncode == 0
    worker = CeleryWorker(env, tmp_path / "worker.log")
    try:
        records = slow_file(tmp_path, image_host, "celery-overlap", 8, 3.0)
        started = enrich("run", "--records", str(records), "--batch-size", "4", "--json", env=env)
        assert started.returncode == 0, started.stderr
        run_id = json.loads(started.stdout)["id"]
        db = Database(pg_url)

        def done() -> list[Batch]:
            with db.transaction() as session:
                batches = session.scalars(sa.select(Batch).where(Batch.run_id == run_id)).all()
                session.expunge_all()
                return list(batches)

        wait_for(lambda: all(b.status == "done" for b in done()), 120, "both batches")
    finally:
        worker.stop()
    first, second = sorted(b.updated_at for b in done())
    gap = (second - first).total_seconds()
    assert gap < 1.5, f"the batches finished {gap:.1f} s apart: one waited for the other"
