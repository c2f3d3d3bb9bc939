"""Fewer bytes a record (issue 24), same answers: item URIs that a record's id gives are
stored NULL, a dataset's records are a range of the record-id indexes (no index of their
own), and the image dedupe looks digests up in a hash index. Migration 0015 brings each
in with rows in the tables and takes each back out."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from enrichment.errors import InvalidValue
from enrichment.sources.records_file import Record
from enrichment.store.batches import stored_scores
from enrichment.store.database import Database
from enrichment.store.publications import entries_of_current_records, entries_published_by
from enrichment.store.query import record_results
from enrichment.store.schema import (
    ITEM_URI_BASE,
    Base,
    RecordRow,
    dataset_range,
    item_uri_of,
    of_datasets,
    record_item_uri,
    stored_item_uri,
)
from enrichment.store.selection import (
    Selection,
    classified_scores,
    stored_labels,
    unknown_datasets,
)
from enrichment.store.writes import upsert_records
from tests.test_store_scale import OLD, fill, plans_of

# Tables whose record id column PostgreSQL compares bytewise after 0015.
RECORD_ID_COLUMNS = {
    ("records", "id"),
    ("results", "record_id"),
    ("labels", "record_id"),
    ("current_results", "record_id"),
    ("review_items", "record_id"),
    ("publications", "record_id"),
    ("reviews", "record_id"),
}
# More records than one batch of 0015 (50,000); every 7th has an item URI of its own.
MIGRATED = 50_010


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/bytes.sqlite3"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    database.upgrade()
    yield database
    database.dispose()


def test_an_item_uri_is_stored_only_where_the_id_does_not_give_it(db: Database) -> None:
    own = "https://museum.example.org/objects/2"
    records = [
        Record("/9/1", "9", ITEM_URI_BASE + "/9/1", None),
        Record("/9/2", "9", own, None),
    ]
    with db.transaction() as session:
        upsert_records(session, records)
    stored = sa.select(RecordRow.id, RecordRow.item_uri).order_by(RecordRow.id)
    read = sa.select(RecordRow.id, record_item_uri(RecordRow.item_uri, RecordRow.id))
    with db.engine.connect() as connection:
        assert connection.execute(stored).all() == [("/9/1", None), ("/9/2", own)]
        assert dict(connection.execute(read).all()) == {"/9/1": ITEM_URI_BASE + "/9/1", "/9/2": own}
    # A record whose item URI changes either way keeps the one it has now.
    with db.transaction() as session:
        upsert_records(
            session,
            [
                Record("/9/1", "9", own, None),
                Record("/9/2", "9", ITEM_URI_BASE + "/9/2", None),
            ],
        )
    with db.engine.connect() as connection:
        assert connection.execute(stored).all() == [("/9/1", own), ("/9/2", None)]
        assert dict(connection.execute(read).all()) == {"/9/1": own, "/9/2": ITEM_URI_BASE + "/9/2"}


def test_the_python_and_sql_readings_of_an_item_uri_agree() -> None:
    assert stored_item_uri("/1/a", ITEM_URI_BASE + "/1/a") is None
    assert stored_item_uri("/1/a", ITEM_URI_BASE + "/1/b") == ITEM_URI_BASE + "/1/b"
    assert item_uri_of("/1/a", None) == ITEM_URI_BASE + "/1/a"
    assert item_uri_of("/1/a", "urn:x") == "urn:x"


def test_a_datasets_ids_are_one_range_that_no_other_datasets_id_falls_in() -> None:
    low, high = dataset_range("70")
    ours = ["/70/", "/70/a", "/70/\U0010ffff", "/70//x"]
    others = ["/7/a", "/700/a", "/70-1/a", "/70a/a", "/7/70/a", "/70", "/71/a", "/70.0/a"]
    assert all(low.encode() <= i.encode() < high.encode() for i in ours)
    assert not any(low.encode() <= i.encode() < high.encode() for i in others)


@pytest.mark.parametrize("name", ["70/a", "", "/70"])
def test_a_dataset_name_with_a_slash_is_refused_before_anything_is_read(
    db: Database, name: str
) -> None:
    """ "70/a" would be the part of dataset 70 under /70/a/: never a dataset of its own."""
    with pytest.raises(InvalidValue, match="not a dataset"):
        of_datasets(RecordRow.id, ["70", name])
    with pytest.raises(InvalidValue, match="not a dataset"):
        unknown_datasets(db, [name])
    results = record_results(db, datasets=["70", name])
    with pytest.raises(InvalidValue, match="not a dataset"):
        next(results)


@pytest.fixture
def icu_url(postgres, pg_url: str) -> Iterator[str]:
    """A PostgreSQL database whose own collation is ICU's English, which sorts "/a/" and "/A/"
    together: only a bytewise record id keeps a dataset's records one range there."""
    admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    name = f"icu_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.execute(
            sa.text(
                f'CREATE DATABASE "{name}" TEMPLATE template0 LOCALE_PROVIDER icu'
                " ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
            )
        )
    admin.dispose()
    yield sa.engine.make_url(pg_url).set(database=name).render_as_string(hide_password=False)


@pytest.mark.parametrize("where", ["sqlite", "icu"])
def test_a_dataset_filter_finds_exactly_its_records_whatever_the_databases_collation(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = (
        f"sqlite:///{tmp_path}/collation.sqlite3"
        if where == "sqlite"
        else request.getfixturevalue("icu_url")
    )
    db = Database(url)
    db.upgrade()
    datasets = ["A", "a", "A-1", "AB", "a0", "Å"]
    records = [
        Record(f"/{dataset}/{local}", dataset, ITEM_URI_BASE + f"/{dataset}/{local}", None)
        for dataset in datasets
        for local in ("0", "x", "Z", "é")
    ]
    with db.transaction() as session:
        upsert_records(session, records)
    for dataset in datasets:
        found = [row.id for row in _records_of(db, dataset)]
        assert found == sorted((r.id for r in records if r.dataset == dataset), key=str.encode), (
            dataset
        )
    assert unknown_datasets(db, ["A", "B", "å"]) == ["B", "å"]
    db.dispose()


def _records_of(db: Database, dataset: str) -> list[sa.Row]:
    with db.engine.connect() as connection:
        return connection.execute(
            sa.select(RecordRow.id)
            .where(of_datasets(RecordRow.id, [dataset]))
            .order_by(RecordRow.id)
        ).all()


def test_every_per_dataset_read_is_a_range_of_a_record_id_index(pg_url: str) -> None:
    """No sequential scan of a table that grows with the collection (sequential scans are
    ruled out: one appears only where no index serves), and the dataset's range is an index
    condition."""
    db = Database(pg_url)
    db.upgrade()
    fill(db)
    selection = Selection(datasets=["70"])
    reads = {
        "record_results": lambda: list(record_results(db, datasets=["70"])),
        "unknown_datasets": lambda: unknown_datasets(db, ["70", "71"]),
        "stored_labels": lambda: list(stored_labels(db, selection)),
        "stored_labels of a run": lambda: list(stored_labels(db, Selection(["70"], run_id=1))),
        "classified_scores": lambda: list(classified_scores(db, selection)),
        "entries_of_current_records": lambda: entries_of_current_records(db, "http://a", selection),
        "entries_published_by": lambda: entries_published_by(db, "http://a", selection),
    }
    low, high = dataset_range("70")
    for name, read in reads.items():
        plans = plans_of(db, read)
        ranged = [plan for plan in plans if f">= '{low}'" in plan and f"< '{high}'" in plan]
        assert ranged, name
        for plan in ranged:
            for table in ("records", "results", "labels", "publications"):
                assert f"Seq Scan on {table} " not in plan, (name, plan)
            assert "Index Cond: (" in plan and "ix_records_dataset_id" not in plan, name
    db.dispose()


def test_the_image_dedupe_reads_a_hash_index_on_postgresql(pg_url: str) -> None:
    db = Database(pg_url)
    db.upgrade()
    written = fill(db)
    digest = next(made.image_sha256 for made, _ in written.values() if made.scores)
    with db.engine.connect() as connection:
        definition = connection.execute(
            sa.text("SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_results_image_version'")
        ).scalar_one()
    assert "USING hash (((encode(image_sha256, 'hex'::text) || (model_version)::text)))" in (
        definition
    )
    # A batch's digests at once, once the planner knows the table (autovacuum's ANALYZE).
    with db.engine.begin() as connection:
        connection.execute(sa.text("ANALYZE results"))
    assert any(
        "Index Scan using ix_results_image_version" in plan
        for plan in plans_of(db, lambda: stored_scores(db, OLD, [digest, "f" * 64]))
    )
    db.dispose()


def _insert_rows(connection: sa.Connection, postgres: bool) -> None:
    """MIGRATED records at 0014 (in SQL: fast on both), each with a result, a label, a
    current result, a review item, a publication and a review."""
    numbers = (
        f"SELECT n FROM generate_series(0, {MIGRATED - 1}) AS n"
        if postgres
        else f"WITH RECURSIVE s(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM s"
        f" WHERE n < {MIGRATED - 1}) SELECT n FROM s"
    )
    record_id = "'/' || (n % 3) || '/r' || n"
    item_uri = f"CASE WHEN n % 7 = 0 THEN 'urn:own:' || n ELSE '{ITEM_URI_BASE}' || {record_id} END"
    connection.execute(
        sa.text(
            "INSERT INTO models (version, name, architecture, classes, thresholds,"
            " top_k_fallback, registered_at) VALUES ('m@1', 'm', 'resnet18',"
            ' \'[{"key": "a", "concept": "urn:a"}]\', \'[0.5]\', 0, \'2026-12-06\')'
        )
    )
    connection.execute(
        sa.text(
            "INSERT INTO records (id, dataset, item_uri, first_seen, last_seen)"
            f" SELECT {record_id}, CAST(n % 3 AS TEXT), {item_uri}, '2026-12-06', '2026-12-06'"
            f" FROM ({numbers}) AS numbers"
        )
    )
    for statement in (
        "INSERT INTO results (record_id, model_version, status, image_sha256, classified_at)"
        " SELECT id, 'm@1', 'labelled', {digest}, '2026-12-06' FROM records",
        "INSERT INTO labels (record_id, model_version, label_key, concept, confidence)"
        " SELECT id, 'm@1', 'a', '', 0.9 FROM records",
        "INSERT INTO current_results (record_id, model_version) SELECT id, 'm@1' FROM records",
        "INSERT INTO review_items (record_id, label_key, model_version, margin, labelled,"
        " sample_key) SELECT id, 'a', 'm@1', 0.1, {true}, 1 FROM records",
        "INSERT INTO publications (api_url, record_id, label_key, concept, model_version,"
        " content_sha256, adopted, state, updated_at)"
        " SELECT 'http://a', id, 'a', 'urn:a', 'm@1', 'x', {false}, 'published', '2026-12-06'"
        " FROM records WHERE id LIKE '/1/%'",
        "INSERT INTO reviews (record_id, label_key, model_version, decision, reviewer,"
        " decided_at) SELECT id, 'a', 'm@1', 'accept', 'c', '2026-12-06' FROM records"
        " WHERE id LIKE '/2/%'",
    ):
        connection.execute(
            sa.text(
                statement.format(
                    digest="sha256(CAST(id AS BYTEA))" if postgres else "randomblob(32)",
                    true="true" if postgres else "1",
                    false="false" if postgres else "0",
                )
            )
        )


def _columns(db: Database, table: str) -> dict[str, dict]:
    return {column["name"]: column for column in sa.inspect(db.engine).get_columns(table)}


def _index_names(db: Database, table: str) -> set[str]:
    return {index["name"] for index in sa.inspect(db.engine).get_indexes(table)}


def test_0015_converts_every_row_in_batches_and_restores_them_going_down(
    database_url: str,
) -> None:
    _converts_and_restores(database_url)


def test_0015_on_a_database_whose_own_collation_is_icus(icu_url: str) -> None:
    """Production databases are often created with a linguistic collation: the batches (in
    that collation's order) and the change to bytewise record ids must hold there too."""
    _converts_and_restores(icu_url)


def _converts_and_restores(database_url: str) -> None:
    db = Database(database_url)
    postgres = db.engine.dialect.name == "postgresql"
    db.upgrade("0014")
    with db.engine.begin() as connection:
        _insert_rows(connection, postgres)
        before = dict(connection.execute(sa.text("SELECT id, item_uri FROM records")).all())
        counts = {
            table: connection.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()
            for table, _ in RECORD_ID_COLUMNS
        }
    assert len(before) == MIGRATED
    db.upgrade("0015")
    with db.engine.connect() as connection:
        stored = dict(connection.execute(sa.text("SELECT id, item_uri FROM records")).all())
        read = dict(
            connection.execute(
                sa.select(RecordRow.id, record_item_uri(RecordRow.item_uri, RecordRow.id))
            ).all()
        )
        assert {
            table: connection.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()
            for table, _ in RECORD_ID_COLUMNS
        } == counts
    assert read == before
    assert stored == {
        record: None if uri == ITEM_URI_BASE + record else uri for record, uri in before.items()
    }
    assert sum(uri is not None for uri in stored.values()) == (MIGRATED + 6) // 7
    assert _columns(db, "records")["item_uri"]["nullable"]
    assert "ix_records_dataset_id" not in _index_names(db, "records")
    if postgres:
        for table, column in RECORD_ID_COLUMNS:
            assert _columns(db, table)[column]["type"].collation == "C", table
        db.upgrade()
        # The models agree at head (Alembic's comparison of the schema leaves collations out).
        for table in Base.metadata.sorted_tables:
            reflected = _columns(db, table.name)
            for column in table.columns:
                wanted = getattr(column.type.dialect_impl(db.engine.dialect), "collation", None)
                found = getattr(reflected[column.name]["type"], "collation", None)
                assert found == wanted, (table.name, column.name)
        assert [row.id for row in _records_of(db, "1")][:2] == ["/1/r1", "/1/r10"]
    db.downgrade("0014")
    with db.engine.connect() as connection:
        assert dict(connection.execute(sa.text("SELECT id, item_uri FROM records")).all()) == before
    assert not _columns(db, "records")["item_uri"]["nullable"]
    assert "ix_records_dataset_id" in _index_names(db, "records")
    if postgres:
        for table, column in RECORD_ID_COLUMNS:
            assert _columns(db, table)[column]["type"].collation is None, table
        with db.engine.connect() as connection:
            definition = connection.execute(
                sa.text(
                    "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_results_image_sha256'"
                )
            ).scalar_one()
        assert "USING btree (image_sha256)" in definition
    db.upgrade()  # and up again from what going down left
    with db.engine.connect() as connection:
        assert dict(connection.execute(sa.text("SELECT id, item_uri FROM records")).all()) == stored
    db.dispose()
