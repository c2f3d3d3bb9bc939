"""`runs.final_counts`: a completed run keeps its counts by outcome.

A result row belongs to the last run that wrote it, so a later `--full` run
over the same records used to turn an earlier run's summary into "0 done".

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("final_counts", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("final_counts")
