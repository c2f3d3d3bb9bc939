"""`models.retired_at`: a model version retired (`enrich model retire`) keeps its row.

Its runs and its curators' reviews still name it, so the row stays, marked
with when it was retired; runs and exports refuse a retired version. Going
down forgets the mark (the results and labels it removed stay removed).

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


# Plain ALTER TABLE on both databases (SQLite has had DROP COLUMN since 3.35): a batch
# operation would copy `models` and drop the original, which the foreign keys of runs and
# results refuse once either has rows.


def upgrade() -> None:
    op.add_column("models", sa.Column("retired_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    op.drop_column("models", "retired_at")
