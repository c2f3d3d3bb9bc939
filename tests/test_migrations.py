"""The Alembic migrations run up and down on PostgreSQL and SQLite, and match the ORM models."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from enrichment.errors import DatabaseError, EnrichError
from enrichment.store.database import Database
from enrichment.store.schema import Base

TABLES = {
    "runs",
    "batches",
    "records",
    "models",
    "results",
    "labels",
    "publications",
    "reviews",
    "workers",
    "review_items",
}


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/migrate.sqlite3"
    return request.getfixturevalue("pg_url")


def table_names(db: Database) -> set[str]:
    return set(sa.inspect(db.engine).get_table_names()) - {"alembic_version"}


def made_on(dialect: str) -> Any:
    """Alembic's filter leaving out what the models make on another dialect only
    (`.ddl_if(dialect=...)`), which the comparison itself does not look at."""

    def include(item: Any, _name: str, _kind: str, _reflected: bool, _compare_to: Any) -> bool:
        condition = getattr(item, "_ddl_if", None)
        return condition is None or condition.dialect in (None, dialect)

    return include


# SQLite cannot reflect the dedupe's expression index, which is made on PostgreSQL only.
@pytest.mark.filterwarnings("ignore:autogenerate skipping metadata-specified expression")
def test_upgrade_matches_models_and_downgrade_removes_everything(database_url: str) -> None:
    db = Database(database_url)
    db.upgrade()
    assert table_names(db) == TABLES
    with db.engine.connect() as connection:
        differences = compare_metadata(
            MigrationContext.configure(
                connection,
                opts={"compare_type": True, "include_object": made_on(connection.dialect.name)},
            ),
            Base.metadata,
        )
    assert differences == []
    db.downgrade("base")
    assert table_names(db) == set()
    db.upgrade()
    assert table_names(db) == TABLES
    db.dispose()


def test_server_database_is_not_migrated_behind_the_users_back(pg_url: str) -> None:
    with pytest.raises(DatabaseError, match="enrich db upgrade"):
        Database(pg_url).ensure_schema()


def test_embedded_sqlite_is_migrated_on_first_use(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/fresh.sqlite3")
    db.ensure_schema()
    assert table_names(db) == TABLES


RUN_OF_M1 = sa.text(
    "INSERT INTO runs (id, kind, scope, model_version, status, queue, records_seen, "
    "records_enqueued, batches_total, created_at) "
    "VALUES (1, 'search', '{}', 'm@1', 'completed', 'q', 0, 0, 0, '2026-12-06')"
)


def test_a_models_classes_keep_their_rows_across_the_rename(database_url: str) -> None:
    """0008 renames `models.labels` to `models.classes`, up and down, with rows in it and a
    run that refers to it (SQLite copies the table to change it: with foreign keys enforced,
    dropping the old copy failed, and left the new one behind to fail every later try)."""
    db = Database(database_url)
    db.upgrade("0007")
    classes = [{"key": "map", "label": "Map", "concept": "http://example.org/map"}]
    insert = sa.text(
        "INSERT INTO models (version, name, architecture, labels, thresholds, top_k_fallback, "
        "registered_at) VALUES ('m@1', 'm', 'resnet18', :classes, '[0.5]', 0, '2026-12-06')"
    )
    with db.engine.begin() as connection:
        connection.execute(insert, {"classes": json.dumps(classes)})
        connection.execute(RUN_OF_M1)
    db.upgrade()
    with db.engine.connect() as connection:
        stored = connection.execute(sa.text("SELECT classes FROM models")).scalar_one()
    assert (json.loads(stored) if isinstance(stored, str) else stored) == classes
    db.downgrade("0007")
    with db.engine.connect() as connection:
        stored = connection.execute(sa.text("SELECT labels FROM models")).scalar_one()
    assert (json.loads(stored) if isinstance(stored, str) else stored) == classes
    db.dispose()


def test_a_failed_sqlite_migration_changes_nothing(tmp_path: Path) -> None:
    """A run that refers to no model (foreign keys were off when it was written): the
    upgrade, made with them off, finds the broken reference at its end and is rolled
    back whole: its revision, and no table half-made."""
    url = f"sqlite:///{tmp_path}/broken.sqlite3"
    db = Database(url)
    db.upgrade("0007")
    db.dispose()
    with closing(sqlite3.connect(tmp_path / "broken.sqlite3")) as raw:
        raw.execute(RUN_OF_M1.text)  # foreign keys are off by default in sqlite3
        raw.commit()
    before = table_names(db)
    with pytest.raises(DatabaseError, match=r"1 rows would refer to rows that do not exist"):
        db.upgrade()
    assert db.current_revision() == "0007" and table_names(db) == before
    db.dispose()


def test_a_half_made_copy_an_older_version_left_is_dropped(tmp_path: Path) -> None:
    """Before migrations were one transaction on SQLite, a step that failed left Alembic's
    copy of the table it was changing, and every later try failed on it."""
    db = Database(f"sqlite:///{tmp_path}/stuck.sqlite3")
    db.upgrade("0007")
    with db.engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE _alembic_tmp_models (version VARCHAR(120))"))
    db.upgrade()
    assert table_names(db) == TABLES
    db.dispose()


def test_an_in_memory_database_keeps_its_schema_and_its_foreign_keys() -> None:
    """Its one connection is the database: the migration's settings are put back on it, not
    the connection thrown away."""
    db = Database("sqlite://")
    db.upgrade()
    assert table_names(db) == TABLES
    with db.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        with pytest.raises(sa.exc.IntegrityError, match="FOREIGN KEY"):
            connection.execute(
                sa.text(
                    "INSERT INTO batches (id, run_id, seq, status, attempts, record_ids, "
                    "updated_at) VALUES (1, 99, 0, 'pending', 0, '[]', '2026-12-07')"
                )
            )  # no run 99
    db.dispose()


def test_an_unknown_revision_is_named_with_this_versions_newest(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/fresh.sqlite3")
    db.upgrade()
    head = db.current_revision()
    for move in (db.upgrade, db.downgrade):
        with pytest.raises(DatabaseError, match=f"'0099'.*newest is {head}"):
            move("0099")
    db.dispose()


def upgrade_after(barrier: Any, url: str) -> str:
    """In a process of its own: wait for the others, then upgrade; the error if any."""
    barrier.wait()
    try:
        Database(url).upgrade()
    except Exception as error:  # whatever it is, the test shows it
        return f"{type(error).__name__}: {error}"
    return ""


def test_several_upgrades_at_once_on_an_empty_server_database_all_succeed(pg_url: str) -> None:
    """They take turns on an advisory lock; the later ones find the schema at head."""
    count = 4
    context = multiprocessing.get_context("spawn")
    barrier = context.Manager().Barrier(count)
    with context.Pool(count) as pool:
        errors = pool.starmap(upgrade_after, [(barrier, pg_url)] * count)
    assert errors == [""] * count
    db = Database(pg_url)
    assert table_names(db) == TABLES
    db.ensure_schema()  # at head
    db.dispose()


CLASSES_0012 = [{"key": "a", "concept": "urn:a"}, {"key": "b", "concept": "urn:b"}]


def test_0012_compacts_results_in_batches_and_restores_them_going_down(database_url: str) -> None:
    """More results than one batch of 0012, with every kind of scores, hash and image URL."""
    from enrichment.store.batches import stored_scores
    from enrichment.store.query import record_results

    db = Database(database_url)
    db.upgrade("0010")
    count = 2600  # two versions each: 5,200 results, more than one batch of 5,000
    records = [
        {"id": f"/9/r{n:05d}", "url": f"http://img/{n}.jpg" if n % 7 else None}
        for n in range(count)
    ]
    results = []
    for n, record in enumerate(records):
        for version in ("m@1", "m@2"):
            own = record["url"] if n % 3 else f"http://other/{n}.png"
            results.append(
                {
                    "id": record["id"],
                    "version": version,
                    "status": "error" if n % 11 == 0 else "labelled",
                    "scores": None
                    if n % 11 == 0
                    else json.dumps([0.000001, round(n / count, 6), 0.5]),
                    "url": None if n % 13 == 0 else own,
                    "sha": None if n % 11 == 0 else f"{n:064x}",
                }
            )
    # Labels of two classes: one with its class's concept (stored "" after 0012), one not.
    labels = [
        {"id": row["id"], "version": row["version"], "key": key, "concept": concept}
        for row in results
        if row["status"] == "labelled"
        for key, concept in (("a", "urn:a"), ("b", "urn:elsewhere"))
    ]
    with db.engine.begin() as connection:
        for version in ("m@1", "m@2"):
            connection.execute(
                sa.text(
                    "INSERT INTO models (version, name, architecture, classes, thresholds,"
                    " top_k_fallback, registered_at) VALUES (:v, 'm', 'resnet18', :classes,"
                    " '[0.5, 0.5]', 0, '2026-12-06')"
                ),
                {"v": version, "classes": json.dumps(CLASSES_0012)},
            )
        connection.execute(
            sa.text(
                "INSERT INTO records (id, dataset, item_uri, image_url, first_seen, last_seen)"
                " VALUES (:id, '9', 'http://item', :url, '2026-12-06', '2026-12-06')"
            ),
            records,
        )
        connection.execute(
            sa.text(
                "INSERT INTO results (record_id, model_version, status, scores, image_url,"
                " image_sha256, classified_at) VALUES (:id, :version, :status, :scores, :url,"
                " :sha, '2026-12-06')"
            ),
            results,
        )
        connection.execute(
            sa.text(
                "INSERT INTO labels (record_id, model_version, label_key, concept, confidence)"
                " VALUES (:id, :version, :key, :concept, 0.5)"
            ),
            labels,
        )
    db.upgrade()
    read = {(row.record_id, row.model_version): row for row in record_results(db)}
    assert len(read) == len(results)
    for row in results:
        assert read[(row["id"], row["version"])].image_url == row["url"]
    assert sorted(
        (record_id, version, label["key"], label["concept"])
        for (record_id, version), row in read.items()
        for label in row.labels
    ) == sorted((row["id"], row["version"], row["key"], row["concept"]) for row in labels)
    with db.engine.connect() as connection:
        derived = connection.execute(
            sa.text("SELECT count(*) FROM labels WHERE concept = ''")
        ).scalar_one()
    assert derived == sum(1 for row in labels if row["key"] == "a")
    with db.engine.connect() as connection:
        stored_urls = connection.execute(
            sa.text("SELECT count(*) FROM results WHERE image_url IS NULL")
        ).scalar_one()
    assert stored_urls == sum(
        1
        for row, record in zip(results, [r for r in records for _ in (1, 2)], strict=True)
        if row["url"] == record["url"]
    )
    digests = [row["sha"] for row in results if row["version"] == "m@2" and row["sha"]]
    expected = {
        row["sha"]: json.loads(row["scores"])
        for row in results
        if row["version"] == "m@2" and row["sha"]
    }
    assert stored_scores(db, "m@2", digests) == expected
    db.downgrade("0010")
    with db.engine.connect() as connection:
        back = {
            (row.record_id, row.model_version): row
            for row in connection.execute(
                sa.text(
                    "SELECT record_id, model_version, scores, image_url, image_sha256 FROM results"
                )
            )
        }
    with db.engine.connect() as connection:
        concepts = connection.execute(
            sa.text("SELECT record_id, model_version, label_key, concept FROM labels")
        ).all()
    assert sorted(tuple(row) for row in concepts) == sorted(
        (row["id"], row["version"], row["key"], row["concept"]) for row in labels
    )
    for row in results:
        again = back[(row["id"], row["version"])]
        scores = again.scores if not isinstance(again.scores, str) else json.loads(again.scores)
        assert scores == (None if row["scores"] is None else json.loads(row["scores"]))
        assert (again.image_url, again.image_sha256) == (row["url"], row["sha"])
    db.dispose()


def test_0017_keeps_a_pending_relabelling_from_being_dropped_going_down(
    database_url: str,
) -> None:
    """0017's cursor, with rows in it: down is refused while a relabelling is pending (the
    code before it would leave the rest undone), and goes once it is finished."""
    from enrichment.store.relabel import finish_relabelling, pending_relabelling
    from enrichment.store.writes import register_model
    from tests.export_support import MODEL_LABELS, OLD, build_catalogue

    db = Database(database_url)
    db.upgrade()
    build_catalogue(db)
    with db.transaction() as session:
        register_model(session, OLD, "pilot", "resnet18", MODEL_LABELS, [0.9, 0.1, 0.5])
    head = db.current_revision()
    with pytest.raises(EnrichError, match="pilot@aaaaaaaaaaaa are still being decided again"):
        db.downgrade("0016")
    assert db.current_revision() == head, "the refused downgrade changed nothing"
    assert pending_relabelling(db) == {OLD: 20}, "the cursor is as it was"
    finish_relabelling(db)
    with db.engine.connect() as connection:
        labels = connection.execute(sa.text("SELECT count(*) FROM labels")).scalar_one()
    db.downgrade("0016")
    with db.engine.connect() as connection:
        columns = {column["name"] for column in sa.inspect(connection).get_columns("models")}
        assert "relabel_after" not in columns
        assert connection.execute(sa.text("SELECT count(*) FROM models")).scalar_one() == 2
        assert connection.execute(sa.text("SELECT count(*) FROM labels")).scalar_one() == labels
    db.upgrade()
    assert pending_relabelling(db) == {}
    db.dispose()
