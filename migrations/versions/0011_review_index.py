"""The review index: each record's current result stored, and the items a curator's page reads.

`current_results` says which result counts for a record (the latest classified
one), which every queue page worked out over all of `results` with a window
function; `review_items` keeps the items of those results within the band of
their class threshold, and every labelled one, ordered by margin and by sample
key (see `enrichment/store/review_index.py`). Both are made empty here and
built from the existing rows by migration 0016, which reshapes them (this
revision cannot run the index's code, which knows only the shapes at head).
Down, the tables go: nothing else depends on them.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "current_results",
        sa.Column("record_id", sa.String(512), primary_key=True),
        sa.Column("model_version", sa.String(120), nullable=False),
    )
    op.create_table(
        "review_items",
        sa.Column("record_id", sa.String(512), primary_key=True),
        sa.Column("label_key", sa.String(100), primary_key=True),
        sa.Column("model_version", sa.String(120), nullable=False),
        sa.Column("margin", sa.Float(), nullable=True),
        sa.Column("labelled", sa.Boolean(), nullable=False),
        sa.Column("sample_key", sa.Integer(), nullable=False),
    )
    op.create_index("ix_review_items_margin", "review_items", ["label_key", "margin", "record_id"])
    op.create_index(
        "ix_review_items_sample",
        "review_items",
        ["label_key", "sample_key", "record_id"],
        postgresql_where=sa.text("labelled"),
        sqlite_where=sa.text("labelled = 1"),
    )


def downgrade() -> None:
    op.drop_index("ix_review_items_sample", table_name="review_items")
    op.drop_index("ix_review_items_margin", table_name="review_items")
    op.drop_table("review_items")
    op.drop_table("current_results")
