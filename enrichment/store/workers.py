"""Which model versions live workers hold: each worker process reports in, with a time.

Batches are routed by model version (`runs.schedule.version_queue`), so a run
whose version no live worker holds waits rather than fails; `enrich status`
says so. A worker process reports its version every heartbeat (`advertise`)
and removes itself when it stops cleanly (`withdraw`). A machine that dies
says nothing: its row simply stops being fresh, and after the same window
that makes its batches stale (`ENRICH_HEARTBEAT_INTERVAL` x
`ENRICH_HEARTBEAT_STALE`) it no longer counts. That is why this is a table of
timestamps rather than a lock or a broker connection, which a lost machine
can hold open for a long time.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from enrichment.store.database import Database
from enrichment.store.schema import Base, utc_now

# Rows of processes unseen for this long are deleted as others report in.
FORGOTTEN_AFTER = timedelta(days=1)


class LiveWorker(Base):
    """A worker process (`host:pid`) and the model version it holds, as last reported."""

    __tablename__ = "workers"

    node: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    model_version: Mapped[str] = mapped_column(sa.String(120), index=True)
    seen_at: Mapped[datetime] = mapped_column(sa.DateTime)


def advertise(db: Database, node: str, version: str) -> None:
    """`node` holds `version` now; long-silent processes are forgotten in the same step."""
    now = utc_now()
    with db.transaction() as session:
        session.execute(sa.delete(LiveWorker).where(LiveWorker.seen_at < now - FORGOTTEN_AFTER))
        session.merge(LiveWorker(node=node, model_version=version, seen_at=now))


def withdraw(db: Database, node: str) -> None:
    """`node` stops cleanly: it holds nothing from now on."""
    with db.transaction() as session:
        session.execute(sa.delete(LiveWorker).where(LiveWorker.node == node))


def live_versions(db: Database, within: float) -> set[str]:
    """The model versions some worker reported holding in the last `within` seconds."""
    cutoff = utc_now() - timedelta(seconds=within)
    with db.transaction() as session:
        return set(
            session.scalars(
                sa.select(LiveWorker.model_version).where(LiveWorker.seen_at >= cutoff).distinct()
            )
        )
