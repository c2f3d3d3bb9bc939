"""Scope locks: one scheduler at a time per scope, refused rather than queued.

A nightly run and an on-demand run over the same scope would page the same
records twice and race on the run's checkpoint; the lock makes the second one
fail at once with a clear message instead.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from enrichment.errors import ScopeBusy
from enrichment.store.database import Database


def scope_key(scope: dict[str, Any]) -> int:
    """A stable signed 64-bit key for a scope, as PostgreSQL advisory locks want."""
    digest = hashlib.sha256(json.dumps(scope, sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextmanager
def scope_lock(db: Database, scope: dict[str, Any]) -> Iterator[None]:
    """Hold the scheduler lock for a scope: a second scheduler on it is refused, not queued.

    PostgreSQL: a session advisory lock on a dedicated connection, released if
    the process dies. SQLite: an flock on a file beside the database.
    """
    key = scope_key(scope)
    refused = ScopeBusy("another scheduler is working on this scope right now; try again later")
    if db.dialect == "postgresql":
        with db.session_connection() as connection:
            if not connection.execute(sa.select(sa.func.pg_try_advisory_lock(key))).scalar_one():
                raise refused
            # The lock is the session's, not the transaction's: end the transaction, so a
            # scheduler paging for hours is not "idle in transaction" on the server.
            connection.commit()
            try:
                yield
            finally:
                connection.execute(sa.select(sa.func.pg_advisory_unlock(key)))
                connection.commit()
        return
    database = db.sqlite_file  # its lock files sit beside it; None in memory
    if database is None:
        yield
        return
    with Path(f"{database}.scope-{key & 0xFFFFFFFF:08x}.lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise refused from None
        yield


def execution_scope(run_id: int) -> dict[str, Any]:
    """The lock key of a run's executing process: no real scope looks like it."""
    return {"executing_run": run_id}


class LockLiveness:
    """Liveness read from the locks a live process holds, released when it dies (even SIGKILL).

    A scheduler holds its scope's lock while it pages; `enrich run` and
    `enrich resume` hold `execution_scope(run)`'s lock until the batches they
    run in-process are finished. Probed by taking the lock for an instant.
    """

    def __init__(self, db: Database) -> None:
        self.db = db

    def scheduling(self, scope: dict[str, Any]) -> bool:
        return self._held(scope)

    def executing(self, run_id: int) -> bool:
        return self._held(execution_scope(run_id))

    def _held(self, scope: dict[str, Any]) -> bool:
        try:
            with scope_lock(self.db, scope):
                return False
        except ScopeBusy:
            return True
