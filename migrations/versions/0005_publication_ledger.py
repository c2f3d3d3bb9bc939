"""The publication ledger: annotations posted to Europeana's Annotations API.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "publications",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("api_url", sa.Text(), nullable=False),
        sa.Column("record_id", sa.String(512), nullable=False),
        sa.Column("label_key", sa.String(100), nullable=False),
        sa.Column("concept", sa.Text(), nullable=False),
        sa.Column("model_version", sa.String(120), nullable=False),
        sa.Column("content_sha256", sa.String(64), nullable=False),
        sa.Column("annotation_id", sa.Text(), nullable=True),
        sa.Column("owner", sa.Text(), nullable=True),
        sa.Column("adopted", sa.Boolean(), server_default="0", nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("published_at", sa.DateTime(), nullable=True),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("withdrawn_at", sa.DateTime(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.UniqueConstraint("api_url", "record_id", "label_key"),
    )
    op.create_index("ix_publications_record_id", "publications", ["record_id"])
    op.create_index("ix_publications_model_version", "publications", ["model_version"])
    op.create_index("ix_publications_state", "publications", ["state"])


def downgrade() -> None:
    op.drop_table("publications")
