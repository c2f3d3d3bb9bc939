"""Fewer bytes a record: item URIs derived, datasets as id ranges, a hash index of digests.

- `records.item_uri` is NULL where it is ITEM_URI_BASE + id (nearly every
  record; `schema.record_item_uri` reads it back). Rows are converted in
  bounded batches of `BATCH` records, in id order, so no statement holds more
  than a batch's rows (the migration is still one transaction: docs/scale.md
  says what that asks of an operator, and the VACUUM FULL that gives the
  updated rows' old space back). PostgreSQL drops the column's NOT NULL; SQLite, which
  cannot, copies it into a new nullable column (batch by batch) that takes its
  place.
- A record id is "/DATASET/LOCAL", so a dataset's records are one range of the
  primary key where ids compare bytewise (`schema.of_datasets`): on PostgreSQL
  `records.id` and every column holding a record id become COLLATE "C" (their
  indexes are rebuilt; the rows are not rewritten), and `ix_records_dataset_id`
  goes. SQLite compares text bytewise already.
- `ix_results_image_sha256` is a hash index on PostgreSQL: the image dedupe only
  looks digests up by equality. SQLite has none and keeps its b-tree.

Going down restores each: the item URIs written out in batches the same way
(on SQLite into a NOT NULL column with an empty default, which nothing reads),
the database's collation and the b-tree indexes.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-06
"""

from collections.abc import Iterator

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

BATCH = 50_000
# As it was when this migration was written (`schema.ITEM_URI_BASE`).
ITEM_URI_BASE = "http://data.europeana.eu/item"
OWN_URI = f"'{ITEM_URI_BASE}' || records.id"
# Every column that holds a record id, by table.
RECORD_ID_COLUMNS = (
    ("records", "id"),
    ("results", "record_id"),
    ("labels", "record_id"),
    ("current_results", "record_id"),
    ("review_items", "record_id"),
    ("publications", "record_id"),
    ("reviews", "record_id"),
)
IN_BATCH = "records.id > :after AND records.id <= :last"


def batches() -> Iterator[dict[str, str]]:
    """The records' ids cut into ranges of BATCH rows, in id order (parameters of IN_BATCH)."""
    connection = op.get_bind()
    after = ""
    following = "SELECT id FROM records WHERE id > :after"
    while True:
        last = (
            connection.execute(
                sa.text(f"{following} ORDER BY id LIMIT 1 OFFSET {BATCH - 1}"), {"after": after}
            ).scalar()
            or connection.execute(
                sa.text(f"{following} ORDER BY id DESC LIMIT 1"), {"after": after}
            ).scalar()
        )
        if last is None:
            return
        yield {"after": after, "last": last}
        after = last


def set_record_id_collation(collation: str) -> None:
    """PostgreSQL: every record id column compared by this collation ("" the database's)."""
    clause = f' COLLATE "{collation}"' if collation else ""
    for table, column in RECORD_ID_COLUMNS:
        op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} TYPE VARCHAR(512){clause}")


def replace_item_uri(definition: str, value: str) -> None:
    """SQLite: `records.item_uri` rewritten as `value`, into a new column of this definition."""
    op.execute(f"ALTER TABLE records ADD COLUMN item_uri_new {definition}")
    for bounds in batches():
        op.execute(
            sa.text(f"UPDATE records SET item_uri_new = {value} WHERE {IN_BATCH}").bindparams(
                **bounds
            )
        )
    op.execute("ALTER TABLE records DROP COLUMN item_uri")
    op.execute("ALTER TABLE records RENAME COLUMN item_uri_new TO item_uri")


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE records ALTER COLUMN item_uri DROP NOT NULL")
        for bounds in batches():
            op.execute(
                sa.text(
                    "UPDATE records SET item_uri = NULL"
                    f" WHERE {IN_BATCH} AND records.item_uri = {OWN_URI}"
                ).bindparams(**bounds)
            )
        set_record_id_collation("C")
        op.drop_index("ix_results_image_sha256", table_name="results")
        op.create_index(
            "ix_results_image_sha256", "results", ["image_sha256"], postgresql_using="hash"
        )
    else:
        replace_item_uri(
            "TEXT", f"CASE WHEN records.item_uri = {OWN_URI} THEN NULL ELSE records.item_uri END"
        )
    op.drop_index("ix_records_dataset_id", table_name="records")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.drop_index("ix_results_image_sha256", table_name="results")
        op.create_index("ix_results_image_sha256", "results", ["image_sha256"])
        set_record_id_collation("")
        for bounds in batches():
            op.execute(
                sa.text(
                    f"UPDATE records SET item_uri = {OWN_URI}"
                    f" WHERE {IN_BATCH} AND records.item_uri IS NULL"
                ).bindparams(**bounds)
            )
        op.execute("ALTER TABLE records ALTER COLUMN item_uri SET NOT NULL")
    else:
        replace_item_uri("TEXT NOT NULL DEFAULT ''", f"coalesce(records.item_uri, {OWN_URI})")
    op.create_index("ix_records_dataset_id", "records", ["dataset", "id"])
