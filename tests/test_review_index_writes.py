"""The review index as the batch writes keep it: on PostgreSQL computed in SQL from the stored
scores (`review_index.staged_sql`), on SQLite in Python (`item_rows`); both give `item_rows`'s
rows for the outcomes written, whichever version's result counts for a record.

The cases: a score exactly at threshold - BAND and at threshold + BAND (in the band by
double-precision arithmetic) and one a hair beyond it; a raw float32 score (not a 6-decimal
number); labels above and below threshold (a fallback) and outside the band; a score vector
shorter than the classes with a label on the missing class; a labelled result with no score
vector; a failed result whose record's other version counts; a failed result with no other;
a non-finite score (stored as a failure); a record classified again by the older version
later; a batch written twice; two batches in one transaction.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.types import REAL

from enrichment.errors import InvalidValue
from enrichment.sources.records_file import Record
from enrichment.store import review_index
from enrichment.store.columns import exact_score, exact_scores
from enrichment.store.database import Database
from enrichment.store.models import ModelClasses, model_classes
from enrichment.store.relabel import finish_relabelling
from enrichment.store.review_index import BAND, ReviewItem, item_rows
from enrichment.store.review_queue import _indexed_items
from enrichment.store.schema import Label, Result
from enrichment.store.writes import (
    LabelScore,
    RecordOutcome,
    register_model,
    save_outcomes,
    upsert_records,
)
from tests.conftest import upgraded_database
from tests.plans import scans_of

OLD, NEW = "idx@000000000001", "idx@000000000002"
KEYS = ("map", "photo", "drawing", "coin")
THRESHOLDS = [0.5, 0.3, 0.45, 0.7]
RAW = float(np.float32(0.3812345678))  # a model's own float32 output, not 6 decimals


def classes() -> list[dict[str, str]]:
    return [{"key": k, "label": k.title(), "concept": f"http://vocab.test/{k}"} for k in KEYS]


def labelled(
    rid: str, scores: list[float], keys: tuple[str, ...], concept_note: str = ""
) -> RecordOutcome:
    """A labelled outcome; a label with no score (a vector shorter than the classes) has 0.9."""
    labels = [
        LabelScore(
            key,
            f"http://vocab.test/{key}{concept_note}",
            scores[KEYS.index(key)] if KEYS.index(key) < len(scores) else 0.9,
        )
        for key in keys
    ]
    return RecordOutcome(rid, "labelled", scores=scores, labels=labels, image_url=f"http://i{rid}")


def first_batch() -> list[RecordOutcome]:
    """OLD's results: every record classified."""
    return [
        # |0.6 - 0.5|, |0.4 - 0.3| and |0.6 - 0.7| are all BAND in decimals; in doubles the
        # first and last are a hair inside the band (threshold + BAND, threshold - BAND),
        # the second a hair beyond it.
        labelled("/1/edges", [0.6, 0.4, 0.1, 0.6], ("map",)),
        labelled("/1/raw", [0.02, RAW, 0.9, 0.0], ("photo", "drawing")),
        labelled("/1/fallback", [0.1, 0.2, 0.05, 0.3], ("coin",)),  # top-1 below threshold
        labelled("/1/short", [0.55, 0.31], ("map", "drawing")),  # no score for two classes
        RecordOutcome("/1/below", "below_threshold", scores=[0.0, 0.0, 0.0, 0.0]),
        labelled("/1/fails-later", [0.45, 0.25, 0.5, 0.75], ("drawing", "coin")),
        labelled("/1/old-again", [0.49, 0.29, 0.44, 0.69], ()),
        RecordOutcome.failed("/1/never", "http_404", "gone"),
        labelled("/1/nan-later", [0.52, 0.1, 0.1, 0.1], ("map",)),
        # Labelled with no score vector at all: its labels are items without a margin.
        RecordOutcome("/1/no-scores", "labelled", labels=[LabelScore("map", "http://m", 0.9)]),
    ]


def second_batch() -> list[RecordOutcome]:
    """NEW's results over the same records: some newer, some failed."""
    return [
        labelled("/1/edges", [0.41, 0.2, 0.6, 0.799999], ("drawing", "coin"), "-new"),
        labelled("/1/raw", [0.5, 0.5, 0.5, 0.5], ("map",)),
        RecordOutcome.failed("/1/fails-later", "timeout", "too slow"),
        labelled("/1/old-again", [0.9, 0.9, 0.9, 0.9], ("map", "photo", "drawing", "coin")),
        RecordOutcome.failed("/1/never", "http_404", "still gone"),
        labelled("/1/nan-later", [float("nan"), 0.1, 0.1, 0.1], ("map",)),
    ]


def third_batch() -> list[RecordOutcome]:
    """OLD again, later, for one record: its result counts once more."""
    return [labelled("/1/old-again", [0.4, 0.39, 0.4, 0.6], ("map",))]


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    database = upgraded_database(request, tmp_path)
    ids = sorted({o.record_id for o in first_batch()})
    with database.transaction() as session:
        register_model(session, OLD, "idx", "resnet18", classes(), THRESHOLDS)
        register_model(session, NEW, "idx", "resnet18", classes(), [0.55, 0.35, 0.4, 0.5])
        upsert_records(session, [Record(r, "1", f"http://item{r}", f"http://i{r}") for r in ids])
    return database


def write(db: Database, version: str, outcomes: list[RecordOutcome]) -> None:
    with db.transaction() as session:
        save_outcomes(session, None, version, outcomes)


def stored(db: Database) -> tuple[dict[str, str], list[tuple]]:
    with db.transaction() as session:
        flagged = session.execute(
            sa.select(Result.record_id, Result.model_version).where(Result.is_current)
        ).all()
        current = dict(flagged)
        assert len(current) == len(flagged)  # at most one current result a record
        items = session.execute(
            sa.select(ReviewItem.__table__).order_by(ReviewItem.record_id, ReviewItem.label_key)
        ).all()
    return current, [tuple(row) for row in items]


def classes_of(db: Database) -> dict[str, ModelClasses]:
    with db.transaction() as session:
        return model_classes(session)


def expected(db: Database, current: dict[str, str], written: dict[str, dict[str, RecordOutcome]]):
    """`item_rows` of each record's current result, from the outcome that wrote it."""
    models = classes_of(db)
    rows = []
    for record_id, version in current.items():
        outcome = written[version][record_id]
        keys = [label.key for label in outcome.labels]
        rows += item_rows(record_id, models[version], outcome.scores or [], keys)
    return sorted(rows, key=lambda row: (row[0], row[1]))


def test_the_writes_keep_item_rows_rows_of_the_current_results(db: Database) -> None:
    written: dict[str, dict[str, RecordOutcome]] = {OLD: {}, NEW: {}}
    for version, batch in ((OLD, first_batch()), (NEW, second_batch()), (OLD, third_batch())):
        write(db, version, batch)
        written[version].update((o.record_id, o) for o in batch)
    current, items = stored(db)
    assert current == {
        "/1/below": OLD,
        "/1/edges": NEW,
        "/1/fallback": OLD,
        "/1/fails-later": OLD,  # NEW failed: OLD's result counts, its items from its scores
        "/1/nan-later": OLD,  # NEW's NaN made it a failure
        "/1/no-scores": OLD,
        "/1/old-again": OLD,  # classified by OLD after NEW
        "/1/raw": NEW,
        "/1/short": OLD,
    }
    assert items == expected(db, current, written)
    by_item = {(row[0], row[1]): row for row in items}
    assert by_item[("/1/fails-later", "map")][2] == abs(0.45 - 0.5)
    assert abs(0.6 - 0.5) <= BAND < abs(0.4 - 0.3) and abs(0.6 - 0.7) <= BAND  # as doubles
    with db.transaction() as session:  # the edges as OLD's current result had them
        edges = item_rows("/1/edges", model_classes(session)[OLD], [0.6, 0.4, 0.1, 0.6], ["map"])
    assert [row[1] for row in edges] == ["map", "coin"]
    assert ("/1/short", "coin") not in by_item and by_item[("/1/short", "drawing")][2] is None
    assert ("/1/never", "map") not in by_item
    assert by_item[("/1/no-scores", "map")][2:4] == (None, True)
    # What the writes keep is what a rebuild from `results` gives.
    review_index.rebuild(db)
    assert stored(db) == (current, items)


def test_a_batch_written_twice_and_two_batches_in_one_transaction(db: Database) -> None:
    batch = first_batch()
    written = {OLD: {o.record_id: o for o in batch}}
    with db.transaction() as session:
        save_outcomes(session, None, OLD, batch[:4])
        save_outcomes(session, None, OLD, batch[4:])
    once = stored(db)
    write(db, OLD, batch)
    assert stored(db) == once
    current, items = once
    assert set(current) == set(written[OLD]) - {"/1/never"}
    assert items == expected(db, current, written)
    moved = labelled("/1/edges", [0.1, 0.1, 0.1, 0.95], ("coin",))
    write(db, OLD, [moved])
    current, items = stored(db)
    assert [row for row in items if row[0] == "/1/edges"] == item_rows(
        "/1/edges", classes_of(db)[OLD], moved.scores, ["coin"]
    )


def test_a_rebuild_commits_each_batch_so_a_stopped_one_keeps_what_it_did(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a bulk load (no flags, no items) the rebuild commits a batch of records at a time:
    in one transaction PostgreSQL keeps every replaced flag's old row version to the end,
    which slowed a 10-million-record rebuild to under half its speed. Stopped part-way, the
    batches done stay; run again, it gives what the writes keep."""
    write(db, OLD, first_batch())
    kept = stored(db)
    with db.transaction() as session:  # as a COPY of `results` leaves them
        session.execute(sa.update(Result).values(is_current=False))
        session.execute(sa.delete(ReviewItem.__table__))
    monkeypatch.setattr(review_index, "REBUILD_BATCH", 2)
    index_batch = review_index._index_batch
    batches: list[Sequence[str]] = []

    def stopped_at_the_third(connection: sa.Connection, batch: Sequence[str], *args: Any) -> int:
        batches.append(batch)
        if len(batches) == 3:
            raise KeyboardInterrupt  # the operator's ^C
        return index_batch(connection, batch, *args)

    monkeypatch.setattr(review_index, "_index_batch", stopped_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        review_index.rebuild(db)
    done = {record_id for batch in batches[:2] for record_id in batch}
    current, items = stored(db)
    assert set(current) == done & set(kept[0]) and len(done) == 4
    assert items == [row for row in kept[1] if row[0] in done]
    monkeypatch.setattr(review_index, "_index_batch", index_batch)
    assert review_index.rebuild(db) == len(kept[0])
    assert stored(db) == kept


def test_exact_score_in_sql_is_exact_scores_to_the_last_bit(pg_url: str) -> None:
    """PostgreSQL's reading of a stored `real` score (the queue's and the index's margins)
    is the one `Scores` gives Python, for 6-decimal scores, raw float32 ones, ties at the
    seventh decimal, tiny ones and those above 1."""
    rng = np.random.default_rng(3)
    values = np.concatenate(
        [
            np.round(rng.uniform(0, 1, 3000), 6),
            np.round(rng.uniform(1, 4, 1000), 6),
            rng.uniform(0, 4, 3000),
            rng.uniform(0, 1e-4, 1000),
            np.arange(0, 512) / 128,  # x * 10**6 ends in .5: rounding ties
            [0.0, 1.0, 0.43, 0.999999, 0.0000005],
        ]
    ).astype(np.float32)
    array = sa.literal([float(value) for value in values], postgresql.ARRAY(sa.Float))
    unnested = (
        sa.func.unnest(sa.cast(array, postgresql.ARRAY(REAL)))
        .table_valued("packed", with_ordinality="i")
        .render_derived()
    )
    engine = sa.create_engine(pg_url)
    with engine.connect() as connection:
        read = connection.scalars(
            sa.select(exact_score(unnested.c.packed)).order_by(unnested.c.i)
        ).all()
    engine.dispose()
    assert read == exact_scores(values.tolist())


def test_a_failing_batch_raises_sqlalchemys_error_and_leaves_nothing(pg_url: str) -> None:
    """The COPY path's statements go through the driver's cursor; their errors still arrive
    as SQLAlchemy's (what callers catch: `database.TRANSIENT_ERRORS` for a blip)."""
    db = Database(pg_url)
    db.upgrade()
    with db.transaction() as session:
        register_model(session, OLD, "idx", "resnet18", classes(), THRESHOLDS)
    with pytest.raises(sa.exc.IntegrityError, match="results_record_id_fkey"):
        write(db, OLD, first_batch())  # no such records
    assert stored(db) == ({}, [])
    db.dispose()


def test_a_model_with_a_threshold_missing_is_refused(db: Database) -> None:
    """The index pairs classes and thresholds one to one; a short list would drop a class."""
    with (
        pytest.raises(InvalidValue, match="3 thresholds for 4 classes"),
        db.transaction() as session,
    ):
        register_model(session, "idx@000000000003", "idx", "resnet18", classes(), [0.5] * 3)
    assert set(classes_of(db)) == {OLD, NEW}


def test_two_versions_of_a_record_written_at_once_leave_one_current_result(pg_url: str) -> None:
    """Two workers write two versions' results for the same records at the same time. Each
    sees only its own new rows until the other commits: the second waits for the first's
    records, then flags what the rule gives over both. (Without waiting, the second failed
    on the first's review items, or, for a record with none, flagged its own row as well.)"""
    db = Database(pg_url)
    db.upgrade()
    ids = ["/1/a", "/1/b"]
    with db.transaction() as session:
        register_model(session, OLD, "idx", "resnet18", classes(), THRESHOLDS)
        register_model(session, NEW, "idx", "resnet18", classes(), THRESHOLDS)
        upsert_records(session, [Record(r, "1", f"http://item{r}", f"http://i{r}") for r in ids])
    started = threading.Event()
    errors: list[BaseException] = []

    def second_writer() -> None:
        try:
            started.set()
            write(db, NEW, [labelled(r, [0.9, 0.1, 0.1, 0.1], ("map",)) for r in ids])
        except BaseException as error:
            errors.append(error)

    with db.transaction() as session:
        save_outcomes(
            session, None, OLD, [labelled(r, [0.8, 0.1, 0.1, 0.1], ("map",)) for r in ids]
        )
        thread = threading.Thread(target=second_writer)
        thread.start()
        started.wait(10)
        time.sleep(0.5)  # the second writer is waiting for these records now
        assert thread.is_alive()
    thread.join(30)
    assert not thread.is_alive() and errors == []
    current, items = stored(db)
    assert current == {"/1/a": NEW, "/1/b": NEW}  # the later one, and only it
    assert {row[0] for row in items} == set(ids)
    db.dispose()


def test_an_index_row_whose_current_result_went_meanwhile_is_left_out(db: Database) -> None:
    """A page reads the index, then the items' current results: a result removed or taken
    over in between (on PostgreSQL's read committed) leaves its item out, not the page."""
    write(db, OLD, first_batch())
    gone = SimpleNamespace(record_id="/1/never", label_key="map", margin=0.0, labelled=False)
    kept = SimpleNamespace(record_id="/1/below", label_key="map", margin=0.5, labelled=False)
    # A class the record's current result now lacks (another version took over meanwhile).
    other = SimpleNamespace(record_id="/1/below", label_key="textile", margin=0.0, labelled=False)
    with db.transaction() as session:
        items = _indexed_items(session, [gone, kept, other], model_classes(session))
    assert [(item.record_id, item.model_version) for item in items] == [("/1/below", OLD)]


def test_a_batch_write_reads_the_rows_of_its_records_not_whole_tables(pg_url: str) -> None:
    """Each statement of a batch write on PostgreSQL reads rows of the batch's own records,
    however many the tables hold: the plans as PostgreSQL ran them (auto_explain), with the
    rows each scan of a table gave. Lock the records as a join under the block's
    `enable_seqscan = off`, and the planner read the whole primary key instead: every batch
    a pass over the collection (a third of a second at 1,000,000 records)."""
    db = Database(pg_url)
    db.upgrade()
    ids = [f"/1/r{n:05d}" for n in range(3000)]
    with db.transaction() as session:
        register_model(session, OLD, "idx", "resnet18", classes(), THRESHOLDS)
        register_model(session, NEW, "idx", "resnet18", classes(), THRESHOLDS)
        upsert_records(session, [Record(r, "1", f"http://item{r}", f"http://i{r}") for r in ids])
    for start in range(0, len(ids), 1000):
        chunk = ids[start : start + 1000]
        write(db, OLD, [labelled(r, [0.8, 0.1, 0.5, 0.1], ("map",)) for r in chunk])
    with db.engine.connect() as connection:
        connection.execute(sa.text("COMMIT"))
        connection.execute(sa.text("ANALYZE"))
    batch = ids[-32:]  # the end of the id range: a scan of the key in order reads it all
    with scans_of(db) as scans:
        write(db, NEW, [labelled(r, [0.9, 0.1, 0.1, 0.1], ("map",)) for r in batch])
    assert {scan.table for scan in scans} >= {"records", "results", "labels", "review_items"}
    assert [scan for scan in scans if scan.rows > 3 * len(batch)] == []


def test_items_of_many_results_are_item_rows_of_each() -> None:
    """The chunked rewrites' items (`items_of`, a matrix at a time) are `item_rows`'s, row by
    row, in the same order: scores a hair inside and beyond the band, a raw float32, labels
    outside the band, and a label the model lacks (ignored by both)."""
    model = ModelClasses(OLD, KEYS, KEYS, KEYS, tuple(THRESHOLDS), 0)
    rng = np.random.default_rng(7)
    vectors = [[0.6, 0.4, 0.1, 0.6], [0.02, RAW, 0.9, 0.0], [0.0] * 4, [0.5, 0.3, 0.45, 0.7]]
    vectors += np.round(rng.random((200, len(KEYS))), 6).tolist()
    labels = [["map"], ["photo", "drawing", "sculpture"], ["coin"], []]
    labels += [[k for k in KEYS if rng.random() < 0.3] for _ in range(200)]
    ids = [f"/1/r{i:03d}" for i in range(len(vectors))]
    expected = [
        row
        for record_id, vector, keys in zip(ids, vectors, labels, strict=True)
        for row in item_rows(record_id, model, vector, keys)
    ]
    matrix = np.asarray(vectors, dtype=np.float64)
    got = review_index.items_of(ids, model, matrix, review_index.labelled_classes(model, labels))
    assert got == expected
    assert len(got) > 200 and {row[3] for row in got} == {True, False}
    assert all(type(row[2]) is float and type(row[3]) is bool for row in got)


def test_a_recalibrations_items_are_item_rows_of_the_relabelled_results(db: Database) -> None:
    """A recalibration's chunks write each current result's items from the matrix of the
    chunk's scores: they are `item_rows`'s for the new thresholds and the labels now
    stored, and what a rebuild gives."""
    write(db, OLD, first_batch())
    write(db, NEW, second_batch())
    moved = [0.52, 0.32, 0.47, 0.4]
    with db.transaction() as session:
        register_model(session, OLD, "idx", "resnet18", classes(), moved)
    assert finish_relabelling(db, [OLD])[OLD].results > 0
    current, items = stored(db)
    models = classes_of(db)
    expected = []
    with db.transaction() as session:
        for record_id, version in sorted(current.items()):
            scores = session.scalar(
                sa.select(Result.scores).where(
                    Result.record_id == record_id, Result.model_version == version
                )
            )
            keys = session.scalars(
                sa.select(Label.label_key).where(
                    Label.record_id == record_id, Label.model_version == version
                )
            ).all()
            expected += item_rows(record_id, models[version], scores or [], keys)
    assert models[OLD].thresholds == tuple(moved)
    assert items == sorted(expected, key=lambda row: (row[0], row[1]))
    assert any(current[row[0]] == OLD and row[2] is not None for row in items)
    review_index.rebuild(db)
    assert stored(db) == (current, items)
