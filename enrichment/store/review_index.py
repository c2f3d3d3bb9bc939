"""The review index: the items a curator's page reads, kept where an index orders them.

The review queue orders the items of each record's current result (one per
class) by their margin |score - threshold|, closest first, and the audit
sample draws labelled items at random. Worked out from `results` on each page,
both cost a pass over every result; here they are stored, so that a page
costs the same at any collection size:

- `results.is_current` (the rule in `store/current.py`): which result counts for
  a record, flagged in its row;
- `review_items`: of each record's current result, the items within `BAND` of
  their class threshold, and every labelled item (the audit sample draws from
  those, whatever their margin). An index on (class, margin, record) serves the
  queue; a partial one on (class, sample key, record) over labelled items serves
  the audit sample, the sample key being a hash of the record id.

Most sigmoid scores are near 0, far below any threshold, so the band holds a
few items per record rather than one per class: the queue's pages beyond the
band are read from `results` as before (`review_queue` does), so answers stay
exact at any depth.

Both are kept by the transaction that writes results (`save_outcomes`:
`refresh` in Python, or on PostgreSQL `staged_sql`, set-based SQL sent with the
batch), worked out again for a model version whose thresholds change (with its labels,
a chunk at a time: `store.relabel`), and built whole by migration 0016 where none was
(`rebuild_on`) or after a bulk load (`rebuild`). Margins are the queue's: |score -
threshold| in double precision, the score as `Scores` reads it (in SQL,
`columns.exact_score`), the threshold as `store.models` reads it.
"""

from __future__ import annotations

import functools
import hashlib
import io
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from enrichment.store.columns import (
    NULL,
    among,
    copy_text,
    exact_score,
    packed_scores,
    score_matrix,
)
from enrichment.store.current import newest_classified, newest_of_staged
from enrichment.store.database import Database
from enrichment.store.models import ModelClasses, model_classes
from enrichment.store.review_tables import ReviewItem
from enrichment.store.schema import Label, RecordRow, Result

# Items at most this far from their threshold are indexed. With 20 classes, 60 % of records
# labelled and sigmoid scores mostly near 0 it costs about 0.4 rows per record besides the
# labelled ones (1.2); scores spread evenly below the thresholds would cost 2.3 (0.25: 9).
# At 10 million records that leaves some 200,000 items per class in the band.
BAND = 0.1
CHUNK = 500  # record ids per IN (...) list, well under SQLite's variable limit
REBUILD_BATCH = 2000  # records read, scored and written at a time by `rebuild`


def sample_key(record_id: str) -> int:
    """A 31-bit hash of the record id: the audit sample's order, independent of any score."""
    digest = hashlib.blake2b(record_id.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") >> 1


# An index row, in the table's column order (what COPY and the inserts take).
ITEM_COLUMNS = ("record_id", "label_key", "margin", "labelled", "sample_key")
ItemRow = tuple[str, str, float | None, bool, int]


def item_rows(
    record_id: str, model: ModelClasses, scores: Sequence[float | None], labelled: Iterable[str]
) -> list[ItemRow]:
    """The index rows of one result: its classes within the band, and its labels."""
    labelled = set(labelled)
    rows = []
    key_of_record = None
    for index, (key, threshold) in enumerate(zip(model.keys, model.thresholds, strict=True)):
        score = scores[index] if index < len(scores) else None
        margin = None if score is None else abs(score - threshold)
        if key in labelled or (margin is not None and margin <= BAND):
            if key_of_record is None:
                key_of_record = sample_key(record_id)
            rows.append((record_id, key, margin, key in labelled, key_of_record))
    return rows


def items_of(
    record_ids: Sequence[str], model: ModelClasses, scores: np.ndarray, labelled: np.ndarray
) -> list[ItemRow]:
    """`item_rows` of many results of one version at once, in the same order: `scores` has
    each result's full vector as a row (as `columns.score_matrix` reads them), `labelled`
    the same shape (`labelled_classes`). The store's chunked rewrites (a recalibration, a
    retirement, a rebuild) compute thousands of results' items at a time, where a Python
    loop over every class of every result was most of a chunk's time."""
    margins = np.abs(scores - np.asarray(model.thresholds, dtype=np.float64))
    rows, classes = np.nonzero(labelled | (margins <= BAND))
    keys = model.keys
    sample_keys = {row: sample_key(record_ids[row]) for row in set(rows.tolist())}
    return [
        (record_ids[row], keys[index], margin, on, sample_keys[row])
        for row, index, margin, on in zip(
            rows.tolist(),
            classes.tolist(),
            margins[rows, classes].tolist(),
            labelled[rows, classes].tolist(),
            strict=True,
        )
    ]


def labelled_classes(model: ModelClasses, labels: Sequence[Iterable[str]]) -> np.ndarray:
    """Which of the model's classes each result has a label of, as `items_of` takes it
    (a key the model lacks is ignored, as `item_rows` ignores it)."""
    index = {key: i for i, key in enumerate(model.keys)}
    labelled = np.zeros((len(labels), len(model.keys)), dtype=bool)
    for row, keys in enumerate(labels):
        labelled[row, [index[key] for key in keys if key in index]] = True
    return labelled


def _insert(connection: sa.Connection, rows: Sequence[ItemRow]) -> None:
    if rows and connection.dialect.name == "postgresql" and connection.dialect.driver == "psycopg2":
        _copy_rows(connection, rows)
    elif rows:
        connection.execute(
            sa.insert(ReviewItem.__table__),
            [dict(zip(ITEM_COLUMNS, row, strict=True)) for row in rows],
        )


def refresh(
    connection: sa.Connection,
    model_version: str,
    outcomes: Iterable[tuple[str, Sequence[float] | None, Iterable[str]]],
) -> None:
    """Bring the current flags and the items up to date for records whose `model_version`
    result was just written, in the writer's transaction. `outcomes`: (record id, scores
    or None, labelled keys).

    The current result of each record is worked out again from its few results; the
    items come from the scores just written, or, where another version's result counts
    (this one failed), from that result's stored scores. PostgreSQL's COPY path has its
    own, in SQL: `staged_sql`.
    """
    written = {record_id: (scores, list(keys)) for record_id, scores, keys in outcomes}
    models = model_classes(connection)
    current = _flag_current(connection, sorted(written))
    rows = [
        row
        for record_id, (scores, keys) in written.items()
        if current.get(record_id) == model_version
        for row in item_rows(record_id, models[model_version], scores or [], keys)
    ]
    others = sorted((r, v) for r, v in current.items() if v != model_version)
    rows.extend(items_from_results(connection, others, models, Result.__table__))
    _insert(connection, rows)


# Two transactions writing results of one record (two model versions, say) each see only
# their own new row: each would flag it current, and the second would then fail on the
# first's review items. Each takes its records' rows first, in id order (as
# `upsert_records` writes them: no deadlock), and looks the current result up once it has
# them, when the other's rows are committed and seen.
# The ids as one array, so that the records are found by primary key whatever the plan
# costs say: as a join (`IN (SELECT ...)`) under `staged_sql`'s `enable_seqscan = off`, the
# planner read the whole primary key in order instead, one pass over the collection per
# batch (a third of a second at 1,000,000 records: bench_scale's `write_batch`).
LOCK_RECORDS_SQL = (
    "SELECT count(*) FROM (SELECT 1 FROM records r"
    " WHERE r.id = ANY (ARRAY(SELECT record_id FROM stage_results))"
    " ORDER BY r.id FOR NO KEY UPDATE) AS locked"
)


@functools.cache
def staged_sql() -> str:
    """`refresh` for PostgreSQL's COPY path, as SQL that `save_outcomes` sends in the same
    round trip as the batch: for the records of the session's `stage_results` table (with
    their `sample_key`), whose results and labels are already merged (each merged result
    flagged current if it is classified, as it nearly always is: see `writes.MERGES`).

    Set-based, no Python per item: each staged record's current result is looked up
    again, the flags that differ from it set (only those rows are written), and its items
    computed from that result's stored scores and labels, whichever
    version it is. The margins are those of the queue's SQL (`columns.score_at`), which
    are `item_rows`'s for the scores as they read back. Made once: the exact score and the
    current result's lookup are compiled from their one definition."""
    dialect = postgresql.dialect()
    literal = {"literal_binds": True}
    newest = newest_of_staged("sample_key").compile(dialect=dialect, compile_kwargs=literal)
    exact = exact_score(sa.literal_column("w.scores[k.i]")).compile(
        dialect=dialect, compile_kwargs=literal
    )
    # A batch's few ids are always best found by primary key. Until autovacuum has first
    # analysed the tables (a new database's first run), PostgreSQL guesses many rows per
    # id and reads whole tables instead, once per batch: each batch cost more as the
    # tables grew (bench_db: 13 ms a DELETE at 200,000 items, 0.2 ms by the index).
    # The staging table has no index: it is read whole either way, at a cost the planner
    # then counts as huge, which would start JIT compilation (tens of ms a statement).
    return f"""
SET LOCAL enable_seqscan = off;
SET LOCAL jit = off;
{LOCK_RECORDS_SQL};
DELETE FROM review_items i USING stage_results s WHERE i.record_id = s.record_id;
WITH current AS ({newest}
), flagged AS (
    UPDATE results r SET is_current = (r.model_version = c.model_version)
    FROM current c
    WHERE r.record_id = c.record_id AND r.is_current <> (r.model_version = c.model_version)
), written AS (
    SELECT c.record_id, c.model_version, c.sample_key, r.scores,
        ARRAY(
            SELECT l.label_key FROM labels l
            WHERE l.record_id = c.record_id AND l.model_version = c.model_version
        ) AS labelled
    FROM current c
    JOIN results r ON r.record_id = c.record_id AND r.model_version = c.model_version
), classes AS MATERIALIZED (
    SELECT m.version, k.i, k.class ->> 'key' AS key, t.threshold::text::float8 AS threshold
    FROM models m
    CROSS JOIN LATERAL json_array_elements(m.classes) WITH ORDINALITY AS k (class, i)
    JOIN LATERAL json_array_elements(m.thresholds) WITH ORDINALITY AS t (threshold, i)
        ON t.i = k.i
    WHERE m.version IN (SELECT model_version FROM written)
), items AS (
    SELECT w.record_id, k.key,
        abs({exact} - k.threshold) AS margin,
        k.key = ANY (w.labelled) AS labelled, w.sample_key
    FROM written w JOIN classes k ON k.version = w.model_version
)
INSERT INTO review_items ({", ".join(ITEM_COLUMNS)})
SELECT * FROM items WHERE labelled OR margin <= {BAND!r};
SET LOCAL enable_seqscan TO DEFAULT;
SET LOCAL jit TO DEFAULT
"""


def _copy_rows(connection: sa.Connection, rows: Sequence[ItemRow]) -> None:
    """PostgreSQL: COPY index rows into the table, several times faster than INSERTs."""
    if not rows:
        return
    buffer = io.StringIO()
    for record_id, key, margin, labelled, key_of_record in rows:
        fields = (
            copy_text(record_id),
            copy_text(key),
            NULL if margin is None else repr(margin),
            "t" if labelled else "f",
            str(key_of_record),
        )
        buffer.write("\t".join(fields) + "\n")
    buffer.seek(0)
    cursor = connection.connection.dbapi_connection.cursor()
    try:
        cursor.copy_expert(f"COPY review_items ({', '.join(ITEM_COLUMNS)}) FROM STDIN", buffer)
    finally:
        cursor.close()


def rebuild(db: Database) -> int:
    """Work out the current flags and the items again from `results`, `REBUILD_BATCH`
    records per transaction; returns the records indexed.

    A transaction per batch, because in one PostgreSQL keeps every replaced flag's old row
    version (and its index entries) to the end: at 10 million records that slowed the
    rebuild from 195,000 to 83,000 records a minute by the second million (docs/scale.md).
    Stopped, it leaves the batches done indexed; run again, it starts over."""
    count = 0
    last: str | None = None
    while True:
        with db.transaction() as session:
            connection = session.connection()
            batch = _next_batch(connection, Result.__table__, last)
            if not batch:
                return count
            count += _index_batch(connection, batch, Result.__table__, model_classes(connection))
        last = batch[-1]


def rebuild_on(
    connection: sa.Connection,
    results: sa.Table | None = None,
    models: dict[str, ModelClasses] | None = None,
) -> int:
    """`rebuild` in the caller's transaction (a migration's, which cannot commit along the
    way). A migration passes its own description of the `results` table (the ORM's may
    describe a later schema) and of the models."""
    results = Result.__table__ if results is None else results
    models = model_classes(connection) if models is None else models
    count = 0
    last: str | None = None
    while batch := _next_batch(connection, results, last):
        count += _index_batch(connection, batch, results, models)
        last = batch[-1]
    return count


def _index_batch(
    connection: sa.Connection,
    batch: Sequence[str],
    results: sa.Table,
    models: dict[str, ModelClasses],
) -> int:
    """Flag these records' current results and write their items; returns how many have one."""
    current = _flag_current(connection, batch, results)
    _insert(connection, items_from_results(connection, sorted(current.items()), models, results))
    return len(current)


def reindex(connection: sa.Connection, record_ids: Sequence[str]) -> None:
    """Work out again which result counts for these records, and their items, in the
    caller's transaction: after some of their results were removed (a retired version)."""
    current = _flag_current(connection, record_ids)
    models = model_classes(connection)
    _insert(
        connection,
        items_from_results(connection, sorted(current.items()), models, Result.__table__),
    )


def replace_items(
    connection: sa.Connection, record_ids: Sequence[str], rows: Sequence[ItemRow]
) -> None:
    """The items of these records replaced by `rows`: after the labels of their current
    results were decided again. In the caller's transaction, which holds the records' rows
    (`lock_records`), so that which result is current cannot change meanwhile."""
    for chunk in _chunks(record_ids):
        connection.execute(
            sa.delete(ReviewItem.__table__).where(
                among(ReviewItem.record_id, chunk, connection.dialect.name)
            )
        )
    _insert(connection, rows)


def _next_batch(connection: sa.Connection, results: sa.Table, after: str | None) -> list[str]:
    """The ids of the next `REBUILD_BATCH` records with a result after `after`, in key order."""
    column = results.c.record_id
    query = sa.select(column).distinct().order_by(column).limit(REBUILD_BATCH)
    if after is not None:
        query = query.where(column > after)
    return list(connection.scalars(query))


def _chunks(values: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), CHUNK):
        yield values[start : start + CHUNK]


def lock_records(connection: sa.Connection, record_ids: Sequence[str]) -> None:
    """On PostgreSQL, hold these records' rows until commit, taken in id order as every
    writer of their results takes them (see LOCK_RECORDS_SQL)."""
    if connection.dialect.name != "postgresql":
        return  # one writer at a time
    # One array, not IN lists of `CHUNK` (a bound parameter each to render): a chunk of a
    # recalibration locks 2,000 records in one statement.
    connection.execute(
        sa.select(RecordRow.id)
        .where(among(RecordRow.id, sorted(record_ids), "postgresql"))
        .order_by(RecordRow.id)
        .with_for_update(key_share=True)
    ).all()


def _flag_current(
    connection: sa.Connection, record_ids: Sequence[str], results: sa.Table | None = None
) -> dict[str, str]:
    """Flag the result that counts for each of these records (and no other), and drop their
    items; returns {record: model version} for those with a classified result. Only the
    rows whose flag changes are written: a result rewritten in place keeps its row."""
    table = Result.__table__ if results is None else results
    dialect = connection.dialect.name
    current: dict[str, str] = {}
    for chunk in _chunks(sorted(record_ids)):
        lock_records(connection, chunk)
        found = dict(connection.execute(newest_classified(chunk, dialect, table)).all())
        flags = connection.execute(
            sa.select(table.c.record_id, table.c.model_version, table.c.is_current).where(
                among(table.c.record_id, chunk, dialect)
            )
        )
        changed: dict[tuple[bool, str], list[str]] = {}
        for record_id, version, flagged in flags:
            if bool(flagged) != (found.get(record_id) == version):
                changed.setdefault((not flagged, version), []).append(record_id)
        # One statement a value and version, not one a row (a round trip each: most of a
        # retirement's chunk).
        for (flag, version), flipped in changed.items():
            connection.execute(
                sa.update(table)
                .where(table.c.model_version == version, among(table.c.record_id, flipped, dialect))
                .values(is_current=flag)
            )
        current.update(found)
        connection.execute(
            sa.delete(ReviewItem.__table__).where(among(ReviewItem.record_id, chunk, dialect))
        )
    return current


def items_from_results(
    connection: sa.Connection,
    pairs: Sequence[tuple[str, str]],
    models: dict[str, ModelClasses],
    results: sa.Table,
) -> list[ItemRow]:
    """The index rows of these (record, model version) results, from their stored scores
    (read as the table's `Scores` column reads them) and labels."""
    dialect = connection.dialect.name
    rows: list[ItemRow] = []
    by_version: dict[str, list[str]] = {}
    for record_id, version in pairs:
        by_version.setdefault(version, []).append(record_id)
    for version, record_ids in by_version.items():
        model = models[version]
        for chunk in _chunks(record_ids):
            stored = dict(
                connection.execute(
                    sa.select(results.c.record_id, packed_scores(results.c.scores, dialect)).where(
                        results.c.model_version == version,
                        among(results.c.record_id, chunk, dialect),
                    )
                ).all()
            )
            labels: dict[str, list[str]] = {}
            for record_id, key in connection.execute(
                sa.select(Label.record_id, Label.label_key).where(
                    Label.model_version == version, among(Label.record_id, chunk, dialect)
                )
            ):
                labels.setdefault(record_id, []).append(key)
            # A full vector each (nearly all): at once. A result without one, or with one
            # of another length, one at a time (`item_rows`, which gives a class without a
            # score only its label's item).
            full = [r for r in chunk if len(stored.get(r) or ()) == len(model.keys)]
            if full:
                rows += items_of(
                    full,
                    model,
                    score_matrix([stored[r] for r in full], dialect, len(model.keys)),
                    labelled_classes(model, [labels.get(r, ()) for r in full]),
                )
            for record_id in chunk:
                vector = stored.get(record_id) or []
                if len(vector) != len(model.keys):
                    read = score_matrix([vector], dialect, len(vector))[0].tolist()
                    rows += item_rows(record_id, model, read, labels.get(record_id, []))
    return rows
