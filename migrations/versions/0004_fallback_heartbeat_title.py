"""What exports, the worker sweep and the review app need stored.

- `models.top_k_fallback`: re-thresholding stored scores (`enrich export
  --thresholds`) decides labels the way the classifier did, fallback included.
- `batches.heartbeat_at`: a running batch's worker touches it while it works,
  so a batch whose worker died is found and dispatched again within minutes.
- `records.title`: shown to curators beside the image.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.add_column(
            sa.Column("top_k_fallback", sa.Integer(), nullable=False, server_default="0")
        )
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("heartbeat_at", sa.DateTime(), nullable=True))
    with op.batch_alter_table("records") as batch:
        batch.add_column(sa.Column("title", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("records") as batch:
        batch.drop_column("title")
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("heartbeat_at")
    with op.batch_alter_table("models") as batch:
        batch.drop_column("top_k_fallback")
