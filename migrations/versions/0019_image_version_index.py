"""The image dedupe's index keyed by digest and model version together (PostgreSQL).

`store.batches.stored_scores` looks up the scores a version already gave to an image,
by its SHA-256. The hash index of digests alone (0015) held every version's rows of an
image under one key: for an image many records share (a placeholder), each lookup read
every row of it, of every version, and during a new version's rollout all the older
versions' rows before any of its own. Keyed by `encode(image_sha256, 'hex') ||
model_version`, a lookup reads its version's rows only, and the first one does (LIMIT
1). The same size: a hash index keeps a 4-byte hash an entry, whatever the key.

SQLite keeps its index of digests: its embedded collections are small.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None

IMAGE_VERSION = sa.text("(encode(image_sha256, 'hex') || model_version)")


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.drop_index("ix_results_image_sha256", table_name="results")
    op.create_index("ix_results_image_version", "results", [IMAGE_VERSION], postgresql_using="hash")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.drop_index("ix_results_image_version", table_name="results")
    op.create_index("ix_results_image_sha256", "results", ["image_sha256"], postgresql_using="hash")
