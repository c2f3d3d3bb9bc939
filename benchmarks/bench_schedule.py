"""The scheduler against the source it pages: its overhead over fetching the pages alone (item 6).

A local Search API (tests/search_api, subclassed in peers.py) serves 100,000
records (10,000 with --quick), 100 a page by cursor, each page after 20 ms.
Timed side by side, in one child process:

- pages alone: `SearchClient.pages` over the whole query, nothing else;
- the scheduler: `enrichment.runs.service.start` for a nightly run over the same
  query, with the real `CeleryDispatcher` sending one message per batch of
  128 to a throwaway Redis, and every record, the run, its checkpoint and its
  batches written to PostgreSQL (as production does; the embedded default is
  SQLite) page by page;
- pages alone again, so that a change in load over the run shows.

Target: scheduler time over the mean of the two pages-alone times <= 1.1.

The child is a fresh interpreter because `worker.app` reads CELERY_BROKER_URL
when it is imported: set before that import, it cannot point anywhere else.

    python benchmarks/bench_schedule.py [--quick]

Not a test: it measures time, which the tests never do. `run(quick)` returns
the figures for `benchmarks/run_all.py`.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import common
import redis
import sqlalchemy as sa

from enrichment.config import Settings
from enrichment.model.spec import ModelSpec
from enrichment.runs.schedule import QUEUES, ModelIdentity, RunKind, version_queue
from enrichment.sources.europeana import SearchClient, whole_collection_query
from enrichment.store.database import Database
from enrichment.store.schema import Batch, RecordRow, Run
from tests.search_api import KEY

LATENCY = 0.02
TARGET = 1.1
VERSION = "bench@000000000000"


def measure(api_url: str, database_url: str, broker_url: str) -> dict[str, Any]:
    """In the child: pages alone, the scheduler, pages alone; seconds of each and what was done."""
    os.environ["CELERY_BROKER_URL"] = broker_url
    from enrichment.runs import service
    from worker.dispatch import CeleryDispatcher  # configures the Celery app from settings

    settings = Settings(
        database_url=database_url,
        broker_url=broker_url,
        europeana_api_key=KEY,
        europeana_api_url=api_url,
    )
    query = whole_collection_query()
    db = Database(database_url)
    spec = ModelSpec(
        name="bench", architecture="resnet50", input_size=224, classes=common.vocabulary_labels()
    )

    def pages_alone() -> int:
        return sum(len(page.items) for page in SearchClient(settings).pages(query))

    def schedule() -> Any:
        with CeleryDispatcher(settings) as dispatcher:
            return service.start(
                db,
                settings,
                service.europeana_scope([query]),
                RunKind.NIGHTLY,
                ModelIdentity(VERSION, spec),
                dispatcher,
                settings.batch_size,
            )

    pages_before, items = common.timed(pages_alone)
    clock = common.StatementClock(db.engine)
    scheduler_s, progress = common.timed(schedule)
    pages_after, _ = common.timed(pages_alone)
    with db.transaction() as session:
        run = session.get(Run, progress.run_id)
        assert run is not None
        stored = {
            "records": session.scalar(sa.select(sa.func.count()).select_from(RecordRow)),
            "batches": session.scalar(sa.select(sa.func.count()).select_from(Batch)),
            "run_status": run.status,
        }
    db.dispose()
    return {
        "items_paged": items,
        "pages_before_s": round(pages_before, 2),
        "pages_after_s": round(pages_after, 2),
        "scheduler_s": round(scheduler_s, 2),
        "scheduler_statement_seconds": clock.largest(),
        "records_seen": progress.records_seen,
        "batch_size": settings.batch_size,
        **stored,
    }


def queued_messages(broker_url: str, queue: str) -> int:
    """Messages waiting in Redis for `queue`, all priority levels together."""
    client = redis.Redis.from_url(broker_url)
    try:
        return sum(
            client.llen(key)
            for key in client.scan_iter(match=f"{queue}*")
            if client.type(key) == b"list"
        )
    finally:
        client.close()


def run(quick: bool) -> dict[str, Any]:
    records = 10_000 if quick else 100_000
    with (
        common.database_server() as base,
        common.fresh_database(base) as url,
        common.redis_server() as broker,
        common.peers("search", str(records), str(LATENCY)) as api,
    ):
        if sa.engine.make_url(url).get_backend_name() != "postgresql":
            raise RuntimeError("bench_schedule measures PostgreSQL: BENCH_DATABASE_URL must be one")
        Database(url).upgrade()
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as child:
            figures = child.submit(measure, api["url"], url, broker).result()
        figures["messages_queued"] = queued_messages(
            broker, version_queue(QUEUES[RunKind.NIGHTLY], VERSION)
        )
    batches = math.ceil(records / figures["batch_size"])
    expected = (records, records, batches, batches)
    done = (
        figures["items_paged"],
        figures["records"],
        figures["batches"],
        figures["messages_queued"],
    )
    if done != expected:
        raise RuntimeError(f"paged/stored/batches/messages {done}, expected {expected}")
    pages_s = (figures["pages_before_s"] + figures["pages_after_s"]) / 2
    return {
        "records": records,
        "rows_per_page": 100,
        "page_latency_s": LATENCY,
        "database": "postgresql",
        **figures,
        "pages_s": round(pages_s, 2),
        "schedule_overhead": round(figures["scheduler_s"] / pages_s, 3),
    }


def report(figures: dict[str, Any]) -> list[str]:
    pages = figures["records"] // figures["rows_per_page"]
    statements = ", ".join(
        f"{kind} {spent:.1f} s" for kind, spent in figures["scheduler_statement_seconds"].items()
    )
    return [
        f"  {figures['records']:,} records, {pages:,} pages of {figures['rows_per_page']}, "
        f"{figures['page_latency_s'] * 1000:.0f} ms per page; PostgreSQL, Redis, CeleryDispatcher",
        f"    pages alone (SearchClient.pages): {figures['pages_before_s']:6.1f} s before, "
        f"{figures['pages_after_s']:6.1f} s after",
        f"    scheduler (service.start):        {figures['scheduler_s']:6.1f} s: "
        f"{figures['records']:,} records stored, {figures['batches']:,} batches, "
        f"{figures['messages_queued']:,} messages in Redis, run {figures['run_status']}",
        f"    its database statements (on the main thread, while the next pages are fetched): "
        f"{statements}",
    ]


def summary(figures: dict[str, Any]) -> list[common.Figure]:
    return [
        common.Figure(
            "schedule_overhead",
            figures["schedule_overhead"],
            f"<= {TARGET}",
            note="scheduler time over pages-alone time",
        )
    ]


def main(argv: list[str] | None = None) -> int:
    return common.stand_alone(
        __doc__, "10,000 records instead of 100,000", run, report, summary, argv
    )


if __name__ == "__main__":
    sys.exit(main())
