"""An index of the batches being worked (those with a heartbeat), for the sweep.

Every worker process looks for stale heartbeats every interval
(`store.batches.claim_stale_batches`); without it, each look read every batch of
every run ever, about 700,000 rows after one run over Europeana's 60 million
records, and more with each run. The index is partial: only batches with a
heartbeat, a few at any time.

Both ways tolerate finding the step done: on SQLite a DDL statement commits at once,
so a later migration of the same command that fails (0017 refusing to go down while
a relabelling is pending) leaves this one done while the revision stays where it was.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

BEATING = sa.text("heartbeat_at IS NOT NULL")


def upgrade() -> None:
    op.create_index(
        "ix_batches_beating",
        "batches",
        ["heartbeat_at"],
        postgresql_where=BEATING,
        sqlite_where=BEATING,
        if_not_exists=True,
    )


def downgrade() -> None:
    op.drop_index("ix_batches_beating", table_name="batches", if_exists=True)
