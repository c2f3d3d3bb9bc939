"""Compact result rows, and the indexes per-dataset commands, the report and publish use.

Results keep the same values in fewer bytes (`enrichment.store.columns`): on
PostgreSQL the score vector as `real[]` rather than JSON text (SQLite keeps
JSON); the image hash as 32 bytes rather than 64 hex characters; the image URL
NULL where it is the record's own ("" where the result has none although the
record has one). Existing rows are converted in bounded batches of `BATCH`
results, in key order, so no statement holds more than a batch's rows.
Labels store their concept as "" where it is their class's in the model's
classes (read back from there), converted in batches the same way.

Indexes: records by (dataset, id) for keyset pages within a dataset; labels by
(class, confidence) for the report's galleries; the ledger by (API,
published_at) for the account lookup of every publish.

Going down converts every row back the same way.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06
"""

import json
from collections.abc import Iterator

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

BATCH = 5000
RESULT_KEY = ("record_id", "model_version")
LABEL_KEY = ("record_id", "model_version", "label_key")
SAME_URL = (
    "CASE WHEN results.image_url IS NOT DISTINCT FROM records.image_url THEN NULL"
    " ELSE coalesce(results.image_url, '') END"
)
SQLITE_SAME_URL = SAME_URL.replace("IS NOT DISTINCT FROM", "IS")
RECORDS_URL = "nullif(coalesce(results.image_url, records.image_url), '')"
PACKED = (
    "CASE WHEN json_typeof(results.scores) = 'array'"
    " THEN CAST(translate(CAST(results.scores AS TEXT), '[]', '{}') AS REAL[]) END"
)
UNPACKED = (
    "CASE WHEN results.packed_scores IS NOT NULL"
    " THEN CAST(array_to_json(ARRAY(SELECT round(CAST(score AS NUMERIC), 6)"
    " FROM unnest(results.packed_scores) WITH ORDINALITY AS s(score, i) ORDER BY i)) AS JSON)"
    " END"
)


def in_range(table: str, key: tuple[str, ...]) -> str:
    """The condition of one batch: its rows' keys after `:a0, ...` and up to `:b0, ...`."""
    columns = ", ".join(f"{table}.{column}" for column in key)
    after = ", ".join(f":a{i}" for i in range(len(key)))
    last = ", ".join(f":b{i}" for i in range(len(key)))
    return f"({columns}) > ({after}) AND ({columns}) <= ({last})"


def batches(table: str, key: tuple[str, ...]) -> Iterator[dict[str, str]]:
    """A table's keys cut into ranges of BATCH rows, in key order (parameters of `in_range`)."""
    connection = op.get_bind()
    after = ("",) * len(key)
    columns = ", ".join(key)
    placeholders = ", ".join(f":a{i}" for i in range(len(key)))
    following = f"SELECT {columns} FROM {table} WHERE ({columns}) > ({placeholders})"
    descending = ", ".join(f"{column} DESC" for column in key)
    while True:
        bounds = {f"a{i}": value for i, value in enumerate(after)}
        last = (
            connection.execute(
                sa.text(f"{following} ORDER BY {columns} LIMIT 1 OFFSET {BATCH - 1}"), bounds
            ).first()
            or connection.execute(
                sa.text(f"{following} ORDER BY {descending} LIMIT 1"), bounds
            ).first()
        )
        if last is None:
            return
        yield {**bounds, **{f"b{i}": value for i, value in enumerate(last)}}
        after = tuple(last)


def class_concepts() -> tuple[str, dict[str, str]]:
    """Every registered class's (version, key, concept), as a subquery `m` (v, k, c)."""
    connection = op.get_bind()
    triples = []
    for version, classes in connection.execute(sa.text("SELECT version, classes FROM models")):
        entries = json.loads(classes) if isinstance(classes, str) else classes
        triples += [(version, entry["key"], entry["concept"]) for entry in entries]
    selects = " UNION ALL ".join(
        f"SELECT :v{i} AS v, :k{i} AS k, :c{i} AS c" for i in range(len(triples))
    )
    values = {}
    for i, (version, key, concept) in enumerate(triples):
        values.update({f"v{i}": version, f"k{i}": key, f"c{i}": concept})
    return (f"({selects}) AS m" if triples else ""), values


def convert_digests(source: str, target: str, bounds: dict[str, str]) -> None:
    """SQLite has no hex functions: one batch's image hashes converted in Python (hex <-> bytes)."""
    connection = op.get_bind()
    rows = connection.execute(
        sa.text(
            f"SELECT record_id, model_version, {source} FROM results"
            f" WHERE {in_range('results', RESULT_KEY)} AND {source} IS NOT NULL"
        ),
        bounds,
    ).all()
    if not rows:
        return
    connection.execute(
        sa.text(
            f"UPDATE results SET {target} = :digest"
            " WHERE record_id = :record AND model_version = :version"
        ),
        [
            {
                "record": record,
                "version": version,
                "digest": bytes.fromhex(digest) if isinstance(digest, str) else digest.hex(),
            }
            for record, version, digest in rows
        ],
    )


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    if postgres:
        op.add_column("results", sa.Column("packed_scores", postgresql.ARRAY(sa.REAL())))
    op.add_column("results", sa.Column("image_digest", sa.LargeBinary()))
    for bounds in batches("results", RESULT_KEY):
        if postgres:
            op.execute(
                sa.text(
                    f"UPDATE results SET packed_scores = {PACKED},"
                    " image_digest = decode(results.image_sha256, 'hex'),"
                    f" image_url = {SAME_URL} FROM records"
                    f" WHERE records.id = results.record_id AND {in_range('results', RESULT_KEY)}"
                ).bindparams(**bounds)
            )
            continue
        convert_digests("image_sha256", "image_digest", bounds)
        op.execute(
            sa.text(
                f"UPDATE results SET image_url = (SELECT {SQLITE_SAME_URL} FROM records"
                f" WHERE records.id = results.record_id) WHERE {in_range('results', RESULT_KEY)}"
            ).bindparams(**bounds)
        )
    concepts, values = class_concepts()
    for bounds in batches("labels", LABEL_KEY) if concepts else ():
        op.execute(
            sa.text(
                f"UPDATE labels SET concept = '' FROM {concepts} WHERE labels.model_version = m.v"
                " AND labels.label_key = m.k AND labels.concept = m.c"
                f" AND {in_range('labels', LABEL_KEY)}"
            ).bindparams(**bounds, **values)
        )
    op.drop_index("ix_results_image_sha256", table_name="results")
    op.execute("ALTER TABLE results DROP COLUMN image_sha256")
    op.execute("ALTER TABLE results RENAME COLUMN image_digest TO image_sha256")
    if postgres:
        op.execute("ALTER TABLE results DROP COLUMN scores")
        op.execute("ALTER TABLE results RENAME COLUMN packed_scores TO scores")
    op.create_index("ix_results_image_sha256", "results", ["image_sha256"])
    op.drop_index("ix_records_dataset", table_name="records")
    op.create_index("ix_records_dataset_id", "records", ["dataset", "id"])
    op.create_index("ix_labels_class_confidence", "labels", ["label_key", "confidence"])
    op.create_index("ix_publications_account", "publications", ["api_url", "published_at"])


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    op.drop_index("ix_publications_account", table_name="publications")
    op.drop_index("ix_labels_class_confidence", table_name="labels")
    op.drop_index("ix_records_dataset_id", table_name="records")
    op.create_index("ix_records_dataset", "records", ["dataset"])
    op.drop_index("ix_results_image_sha256", table_name="results")
    op.execute("ALTER TABLE results RENAME COLUMN image_sha256 TO image_digest")
    op.add_column("results", sa.Column("image_sha256", sa.String(64)))
    if postgres:
        op.execute("ALTER TABLE results RENAME COLUMN scores TO packed_scores")
        op.add_column("results", sa.Column("scores", sa.JSON()))
    for bounds in batches("results", RESULT_KEY):
        if postgres:
            op.execute(
                sa.text(
                    f"UPDATE results SET scores = {UNPACKED},"
                    " image_sha256 = encode(results.image_digest, 'hex'),"
                    f" image_url = {RECORDS_URL} FROM records"
                    f" WHERE records.id = results.record_id AND {in_range('results', RESULT_KEY)}"
                ).bindparams(**bounds)
            )
            continue
        convert_digests("image_digest", "image_sha256", bounds)
        op.execute(
            sa.text(
                f"UPDATE results SET image_url = (SELECT {RECORDS_URL} FROM records"
                f" WHERE records.id = results.record_id) WHERE {in_range('results', RESULT_KEY)}"
            ).bindparams(**bounds)
        )
    concepts, values = class_concepts()
    for bounds in batches("labels", LABEL_KEY) if concepts else ():
        op.execute(
            sa.text(
                f"UPDATE labels SET concept = m.c FROM {concepts} WHERE labels.model_version = m.v"
                " AND labels.label_key = m.k AND labels.concept = ''"
                f" AND {in_range('labels', LABEL_KEY)}"
            ).bindparams(**bounds, **values)
        )
    if postgres:
        op.execute("ALTER TABLE results DROP COLUMN packed_scores")
    op.execute("ALTER TABLE results DROP COLUMN image_digest")
    op.create_index("ix_results_image_sha256", "results", ["image_sha256"])
