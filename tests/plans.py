"""What PostgreSQL read to run a database's statements: each plan as it ran, as its
`auto_explain` module reports it, with the rows each scan of a table gave.

A plan that reads a whole table or index where a few keys would do is fast on a test's
small tables and slow at Europeana's size; the rows a scan read say which it is at any
size, where a timing would not. (`tests.test_store_scale.plans_of` asks instead which
index a read's SELECTs can use, sequential scans ruled out; this reports what ran,
writes and the COPY path's statements included.) Loading `auto_explain` takes a superuser,
as the suite's own throwaway server has; on a server of one's own (`TEST_DATABASE_URL`),
these tests need one too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from enrichment.store.database import Database

SETTINGS = {
    "log_min_duration": "0",
    "log_analyze": "on",
    "log_format": "json",
    "log_level": "notice",  # to the client, not to the server's log
    "log_nested_statements": "on",
}


READ = ("Actual Rows", "Rows Removed by Filter", "Rows Removed by Index Recheck")


@dataclass(frozen=True)
class Scan:
    node: str  # "Index Scan", "Seq Scan", "Bitmap Index Scan", ...
    table: str  # or, for a bitmap's index scan, the index
    rows: float  # the rows it read, over all its loops (not the dead ones it passed)


class Notices:
    """A connection's notices, all of them: psycopg2 keeps only the last 50 in a list, and
    SQLAlchemy logs and empties a connection's notices after each statement it runs, unless
    they are falsy: psycopg2 only ever calls `append`."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def append(self, text: str) -> None:
        self.texts.append(text)

    def __bool__(self) -> bool:
        return False


@contextmanager
def scans_of(db: Database) -> Iterator[list[Scan]]:
    """The scans of tables (the sessions' temporary staging tables left out) in the plans
    of every statement run through `db` in the block, in transactions that end in it.

    Every connection taken from the pool in the block explains what it runs; the pool is
    emptied after, so that none goes on doing so."""
    notices = Notices()

    def explaining(raw: Any, *_: Any) -> None:
        raw.notices = notices
        with raw.cursor() as cursor:
            cursor.execute("LOAD 'auto_explain'")
            for name, value in SETTINGS.items():
                cursor.execute(f"SET auto_explain.{name} = {value}")
        raw.commit()

    sa.event.listen(db.engine, "checkout", explaining)
    scans: list[Scan] = []
    try:
        yield scans
    finally:
        sa.event.remove(db.engine, "checkout", explaining)
        db.engine.dispose()
    # A COPY's notices reach psycopg2 with the next answer: its transaction's COMMIT.
    for text in notices.texts:
        if '"Plan"' in text:
            scans.extend(_scans(json.loads(text[text.index("{") :])["Plan"]))


def _scans(plan: dict[str, Any]) -> list[Scan]:
    found = []
    # A bitmap's index scan names its index only; the heap scan above it gives fewer rows
    # where a LIMIT stops it, but the bitmap holds every entry that matched.
    table = plan.get("Relation Name") or plan.get("Index Name", "")
    if table and not table.startswith("stage_"):
        # Read: what it gave and what its filters then dropped (per loop, as shown).
        read = sum(plan.get(name, 0) for name in READ)
        found.append(Scan(plan["Node Type"], table, read * plan.get("Actual Loops", 1)))
    for child in plan.get("Plans", ()):
        found.extend(_scans(child))
    return found
