"""`models.classes`: a model's outputs are its classes; a label is a class given to a record.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.alter_column("labels", new_column_name="classes")


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.alter_column("classes", new_column_name="labels")
