"""Curators' review decisions on machine labels.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("record_id", sa.String(512), nullable=False),
        sa.Column("label_key", sa.String(100), nullable=False),
        sa.Column("model_version", sa.String(120), nullable=False),
        sa.Column("decision", sa.String(10), nullable=False),
        sa.Column("reviewer", sa.String(200), nullable=False),
        sa.Column("audit", sa.Boolean(), nullable=False, server_default="0"),
        sa.Column("decided_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_reviews_label", "reviews", ["record_id", "label_key", "model_version"])


def downgrade() -> None:
    op.drop_table("reviews")
