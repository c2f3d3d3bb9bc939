"""Initial schema: runs, batches, records, models, results and labels.

Revision ID: 0001
Revises:
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("version", sa.String(120), primary_key=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("architecture", sa.String(100), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("thresholds", sa.JSON(), nullable=False),
        sa.Column("registered_at", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "records",
        sa.Column("id", sa.String(512), primary_key=True),
        sa.Column("dataset", sa.String(128), nullable=False),
        sa.Column("item_uri", sa.Text(), nullable=False),
        sa.Column("image_url", sa.Text(), nullable=True),
        sa.Column("provider", sa.Text(), nullable=True),
        sa.Column("timestamp_update", sa.DateTime(), nullable=True),
        sa.Column("first_seen", sa.DateTime(), nullable=False),
        sa.Column("last_seen", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_records_dataset", "records", ["dataset"])
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("scope", sa.JSON(), nullable=False),
        sa.Column("model_version", sa.String(120), sa.ForeignKey("models.version"), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("queue", sa.String(60), nullable=False),
        sa.Column("records_seen", sa.Integer(), nullable=False),
        sa.Column("records_enqueued", sa.Integer(), nullable=False),
        sa.Column("batches_total", sa.Integer(), nullable=False),
        sa.Column("checkpoint", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
    )
    op.create_index("ix_runs_status", "runs", ["status"])
    op.create_table(
        "batches",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "run_id", sa.Integer(), sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("record_ids", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("run_id", "seq"),
    )
    op.create_index("ix_batches_run_id", "batches", ["run_id"])
    op.create_index("ix_batches_status", "batches", ["status"])
    op.create_table(
        "results",
        sa.Column(
            "record_id",
            sa.String(512),
            sa.ForeignKey("records.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column(
            "model_version", sa.String(120), sa.ForeignKey("models.version"), primary_key=True
        ),
        sa.Column(
            "run_id", sa.Integer(), sa.ForeignKey("runs.id", ondelete="SET NULL"), nullable=True
        ),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("error_reason", sa.String(40), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("scores", sa.JSON(), nullable=True),
        sa.Column("image_url", sa.Text(), nullable=True),
        sa.Column("image_sha256", sa.String(64), nullable=True),
        sa.Column("source_timestamp", sa.DateTime(), nullable=True),
        sa.Column("classified_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_results_run_id", "results", ["run_id"])
    op.create_index("ix_results_image_sha256", "results", ["image_sha256"])
    op.create_index("ix_results_model_status", "results", ["model_version", "status"])
    op.create_table(
        "labels",
        sa.Column("record_id", sa.String(512), primary_key=True),
        sa.Column("model_version", sa.String(120), primary_key=True),
        sa.Column("label_key", sa.String(100), primary_key=True),
        sa.Column("concept_uri", sa.Text(), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["record_id", "model_version"],
            ["results.record_id", "results.model_version"],
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_labels_model_label", "labels", ["model_version", "label_key"])


def downgrade() -> None:
    op.drop_table("labels")
    op.drop_table("results")
    op.drop_table("batches")
    op.drop_table("runs")
    op.drop_table("records")
    op.drop_table("models")
