"""Indexes of the few batches that are not done, for the checks that run all the time.

- `ix_batches_beating`: the batches being worked (those with a heartbeat), for the
  sweep every worker process makes each interval (`store.batches.claim_stale_batches`).
- `ix_batches_unfinished`: each run's batches not yet done or failed, for the check
  after every batch whether its run is complete (`store.runs.complete_run_if_done`).

Without them both read every batch of every run ever: about 700,000 rows after one
run over Europeana's 60 million records, and more with each run; near the end of a
run the check after each of its batches read all of them. Both are partial: a few
rows at any time.

Both ways tolerate finding a step done: on SQLite a DDL statement commits at once, so
a later migration of the same command that fails (0017 refusing to go down while a
relabelling is pending) leaves this one done while the revision stays where it was.

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
UNFINISHED = sa.text("status NOT IN ('done', 'failed')")
INDEXES = {
    "ix_batches_beating": (["heartbeat_at"], BEATING),
    "ix_batches_unfinished": (["run_id", "seq"], UNFINISHED),
}


def upgrade() -> None:
    for name, (columns, where) in INDEXES.items():
        op.create_index(
            name,
            "batches",
            columns,
            postgresql_where=where,
            sqlite_where=where,
            if_not_exists=True,
        )


def downgrade() -> None:
    for name in INDEXES:
        op.drop_index(name, table_name="batches", if_exists=True)
