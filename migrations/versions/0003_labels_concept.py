"""`labels.concept_uri` becomes `labels.concept`: one name for the concept everywhere.

model.json, the model spec, the annotations and the reporting commands all say
`concept`; the column was the one place that said `concept_uri`.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("labels") as batch:
        batch.alter_column("concept_uri", new_column_name="concept")


def downgrade() -> None:
    with op.batch_alter_table("labels") as batch:
        batch.alter_column("concept", new_column_name="concept_uri")
