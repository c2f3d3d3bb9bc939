"""A batch's lifecycle around its compute: started, finished, given up, kept alive.

The compute (fetch -> classify) is `enrichment.runs.pipeline`; the state
changes are `enrichment.store.batches`. This module joins the two where a
change to a batch may finish its run (the last batch to finish completes it),
and keeps the heartbeat of the batches a worker process is running.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from enrichment.store.batches import finish_batch, give_up_batch, touch_heartbeats
from enrichment.store.database import Database
from enrichment.store.runs import complete_run_if_done
from enrichment.store.writes import RecordOutcome
from enrichment.thresholds import DecisionRule


def commit_outcomes(
    db: Database,
    batch_id: int,
    run_id: int,
    version: str,
    outcomes: Sequence[RecordOutcome],
    decided_by: DecisionRule | None = None,
) -> None:
    """Store a batch's outcomes and mark it done; then its run, if it was the last batch."""
    finish_batch(db, batch_id, run_id, version, outcomes, decided_by)
    complete_run_if_done(db, run_id)


def fail_batch(db: Database, batch_id: int, reason: str, message: str) -> None:
    """Give up on a batch: each of its records gets an error result saying why."""
    run_id = give_up_batch(db, batch_id, reason, message)
    if run_id is not None:
        complete_run_if_done(db, run_id)


class Heartbeat:
    """Keeps the batches this process is working on alive in the database.

    One thread per worker process touches `batches.heartbeat_at` of every batch
    in progress each `interval` seconds. A worker that dies (SIGKILL, a machine
    taken away) stops touching them; the sweep of every live worker
    (`store.batches.claim_stale_batches`) then finds them and sends them again,
    long before the broker's visibility timeout would.
    """

    def __init__(self, db: Database, interval: float) -> None:
        self.db = db
        self.interval = interval
        self._batches: set[int] = set()
        self._lock = threading.Lock()

    def beating(self, batch_id: int) -> _Beating:
        return _Beating(self, batch_id)

    def in_progress(self) -> list[int]:
        with self._lock:
            return sorted(self._batches)

    def touch(self) -> None:
        """One beat for every batch in progress here."""
        touch_heartbeats(self.db, self.in_progress())


class _Beating:
    def __init__(self, heartbeat: Heartbeat, batch_id: int) -> None:
        self.heartbeat = heartbeat
        self.batch_id = batch_id

    def __enter__(self) -> None:
        with self.heartbeat._lock:
            self.heartbeat._batches.add(self.batch_id)

    def __exit__(self, *_: object) -> None:
        with self.heartbeat._lock:
            self.heartbeat._batches.discard(self.batch_id)
