"""A model version's cursor for deciding its labels again after a recalibration.

`models.relabel_after`: the record after which the version's labels and review items
are still to be decided again by its registered thresholds (`store.relabel`), "" for
all of them, NULL for none. Registering new thresholds used to do all of it in the
registration's transaction, about an hour at Europeana's size with every batch write
of the version waiting; the cursor lets it go a chunk per transaction and resume.

Going down drops the column, and is refused while a relabelling is pending: the code
before it would leave the rest undone for good. `enrich export` finishes it (any run of
the version, or a publish, does too).

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

from enrichment.errors import EnrichError

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

# A record id as 0015 left it: compared bytewise on PostgreSQL, as the ids it is compared to.
RECORD_ID = sa.String(512).with_variant(sa.String(512, collation="C"), "postgresql")


def upgrade() -> None:
    op.add_column("models", sa.Column("relabel_after", RECORD_ID, nullable=True))


def downgrade() -> None:
    pending = op.get_bind().execute(
        sa.text("SELECT version FROM models WHERE relabel_after IS NOT NULL ORDER BY version")
    )
    versions = ", ".join(pending.scalars())
    if versions:
        raise EnrichError(
            f"the labels of model version {versions} are still being decided again after a"
            " recalibration: finish that first (`enrich export` does), then downgrade"
        )
    op.execute("ALTER TABLE models DROP COLUMN relabel_after")  # SQLite too, since 3.35
