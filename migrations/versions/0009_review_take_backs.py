"""`reviews.reverses`: a take-back (undo) is a row of its own, so the audit trail keeps it.

A take-back row has decision `undo`, its reviewer and time, and `reverses`, the id of the
decision it takes back; that decision stays in the table and no longer counts. Down, the
old rule comes back: the taken-back decisions and the take-back rows are deleted.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("reviews") as batch:
        batch.add_column(sa.Column("reverses", sa.Integer(), nullable=True))
    op.create_index("ix_reviews_reverses", "reviews", ["reverses"])


def downgrade() -> None:
    op.execute(
        "DELETE FROM reviews WHERE id IN (SELECT reverses FROM reviews WHERE reverses IS NOT NULL)"
    )
    op.execute("DELETE FROM reviews WHERE decision = 'undo'")
    op.drop_index("ix_reviews_reverses", table_name="reviews")
    with op.batch_alter_table("reviews") as batch:
        batch.drop_column("reverses")
