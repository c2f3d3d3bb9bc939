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


def upgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("retired_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.drop_column("retired_at")
