"""Labels without a foreign key to results, and without the (model_version, label_key) index.

A label row is derived from its result and written only by `save_outcomes`, in
the same transaction as the result it comes from; the per-row foreign-key check
cost more than half of a batch's database time (see benchmarks/bench_db.py).
The (model_version, label_key) index served no query the primary key does not,
and on a table without planner statistics yet (a new model's first run) it made
PostgreSQL clear a batch's old labels by scanning every label of the version.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

POSTGRES_NAME = "labels_record_id_model_version_fkey"
# SQLite keeps the constraint unnamed; this convention names it for batch mode.
SQLITE_CONVENTION = {"fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s"}


def upgrade() -> None:
    op.drop_index("ix_labels_model_label", table_name="labels")
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table("labels", naming_convention=SQLITE_CONVENTION) as batch:
            batch.drop_constraint("fk_labels_record_id_results", type_="foreignkey")
    else:
        op.drop_constraint(POSTGRES_NAME, "labels", type_="foreignkey")


def downgrade() -> None:
    op.create_index("ix_labels_model_label", "labels", ["model_version", "label_key"])
    with op.batch_alter_table("labels") as batch:
        batch.create_foreign_key(
            POSTGRES_NAME,
            "results",
            ["record_id", "model_version"],
            ["record_id", "model_version"],
            ondelete="CASCADE",
        )
