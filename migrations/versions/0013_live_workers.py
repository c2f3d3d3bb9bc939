"""`workers`: which model version each live worker process holds, and when it last said so.

Batches are routed to the workers of their run's model version; a run whose
version no live worker holds waits, and `enrich status` says so from this
table. Nothing else refers to it: going down drops it.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "workers",
        sa.Column("node", sa.String(255), primary_key=True),
        sa.Column("model_version", sa.String(120), nullable=False),
        sa.Column("seen_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_workers_model_version", "workers", ["model_version"])


def downgrade() -> None:
    op.drop_table("workers")
