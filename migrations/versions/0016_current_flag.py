"""The current result a flag in its row; review items without their model version.

- `results.is_current` says which result counts for its record (the rule in
  `store/current.py`), where the `current_results` table kept a (record id,
  model version) row and its primary key for every record: about 160 bytes a
  record (docs/scale.md). The flags are set from that table in batches of
  `BATCH` records, in id order, then the table goes.
- `review_items` loses `model_version`, which was always the record's current
  result's; the audit sample's index loses the record id, which its sample key
  (a hash of the record id) already orders.
- Migration 0011 no longer builds the review index (it would have to run this
  code against its older tables): where the index was never built (no current
  result stored although a classified result exists), it is built here.

On PostgreSQL dropping a column frees nothing until the rows are rewritten
(`VACUUM FULL review_items`, or as the writes replace them), and each flagged
result leaves a dead copy until a vacuum: docs/scale.md says what this asks of
an operator. Going down restores the table from the flags, and the column from
the table (on SQLite nullable, which it cannot make NOT NULL in place).

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-06
"""

from collections.abc import Iterator

import sqlalchemy as sa
from alembic import op

from enrichment.store.columns import Scores
from enrichment.store.review_index import rebuild_on

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

BATCH = 50_000
# A record id as 0015 left it: compared bytewise on PostgreSQL.
RECORD_ID = sa.String(512).with_variant(sa.String(512, collation="C"), "postgresql")
# `results` as this revision has it, for the review index's rebuild.
RESULTS = sa.table(
    "results",
    sa.column("record_id", sa.String),
    sa.column("model_version", sa.String),
    sa.column("status", sa.String),
    sa.column("scores", Scores()),
    sa.column("classified_at", sa.DateTime),
    sa.column("is_current", sa.Boolean),
)


def batches(table: str, column: str) -> Iterator[dict[str, str]]:
    """The table's record ids cut into ranges of about BATCH rows, in id order (the
    parameters :after and :last of a range condition)."""
    connection = op.get_bind()
    after = ""
    following = f"SELECT {column} FROM {table} WHERE {column} > :after"
    while True:
        last = (
            connection.execute(
                sa.text(f"{following} ORDER BY {column} LIMIT 1 OFFSET {BATCH - 1}"),
                {"after": after},
            ).scalar()
            or connection.execute(
                sa.text(f"{following} ORDER BY {column} DESC LIMIT 1"), {"after": after}
            ).scalar()
        )
        if last is None:
            return
        yield {"after": after, "last": last}
        after = last


def in_range(column: str) -> str:
    return f"{column} > :after AND {column} <= :last"


def upgrade() -> None:
    connection = op.get_bind()
    built = connection.execute(sa.text("SELECT count(*) FROM current_results")).scalar() > 0
    op.add_column(
        "results",
        sa.Column("is_current", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    for bounds in batches("current_results", "record_id"):
        op.execute(
            sa.text(
                "UPDATE results SET is_current = true FROM current_results c"
                " WHERE c.record_id = results.record_id"
                " AND c.model_version = results.model_version"
                f" AND {in_range('c.record_id')} AND {in_range('results.record_id')}"
            ).bindparams(**bounds)
        )
    op.drop_table("current_results")
    op.drop_index("ix_review_items_sample", table_name="review_items")
    op.execute("ALTER TABLE review_items DROP COLUMN model_version")
    op.create_index(
        "ix_review_items_sample",
        "review_items",
        ["label_key", "sample_key"],
        postgresql_where=sa.text("labelled"),
        sqlite_where=sa.text("labelled = 1"),
    )
    if not built:
        rebuild_on(connection, results=RESULTS)


def downgrade() -> None:
    op.create_table(
        "current_results",
        sa.Column("record_id", RECORD_ID, primary_key=True),
        sa.Column("model_version", sa.String(120), nullable=False),
    )
    for bounds in batches("results", "record_id"):
        op.execute(
            sa.text(
                "INSERT INTO current_results (record_id, model_version)"
                " SELECT record_id, model_version FROM results"
                f" WHERE is_current AND {in_range('record_id')}"
            ).bindparams(**bounds)
        )
    op.add_column("review_items", sa.Column("model_version", sa.String(120), nullable=True))
    for bounds in batches("review_items", "record_id"):
        op.execute(
            sa.text(
                "UPDATE review_items SET model_version = c.model_version FROM current_results c"
                " WHERE c.record_id = review_items.record_id"
                f" AND {in_range('c.record_id')} AND {in_range('review_items.record_id')}"
            ).bindparams(**bounds)
        )
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column("review_items", "model_version", nullable=False)
    op.drop_index("ix_review_items_sample", table_name="review_items")
    op.create_index(
        "ix_review_items_sample",
        "review_items",
        ["label_key", "sample_key", "record_id"],
        postgresql_where=sa.text("labelled"),
        sqlite_where=sa.text("labelled = 1"),
    )
    op.execute("ALTER TABLE results DROP COLUMN is_current")
