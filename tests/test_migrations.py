"""The Alembic migrations run up and down on PostgreSQL and SQLite, and match the ORM models."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from enrichment.errors import DatabaseError
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
    "current_results",
    "review_items",
}


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/migrate.sqlite3"
    return request.getfixturevalue("pg_url")


def table_names(db: Database) -> set[str]:
    return set(sa.inspect(db.engine).get_table_names()) - {"alembic_version"}


def test_upgrade_matches_models_and_downgrade_removes_everything(database_url: str) -> None:
    db = Database(database_url)
    db.upgrade()
    assert table_names(db) == TABLES
    with db.engine.connect() as connection:
        differences = compare_metadata(
            MigrationContext.configure(connection, opts={"compare_type": True}), Base.metadata
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


def test_a_models_classes_keep_their_rows_across_the_rename(database_url: str) -> None:
    """0008 renames `models.labels` to `models.classes`, up and down, with rows in it."""
    db = Database(database_url)
    db.upgrade("0007")
    classes = [{"key": "map", "label": "Map", "concept": "http://example.org/map"}]
    insert = sa.text(
        "INSERT INTO models (version, name, architecture, labels, thresholds, top_k_fallback, "
        "registered_at) VALUES ('m@1', 'm', 'resnet18', :classes, '[0.5]', 0, '2026-12-06')"
    )
    with db.engine.begin() as connection:
        connection.execute(insert, {"classes": json.dumps(classes)})
    db.upgrade()
    with db.engine.connect() as connection:
        stored = connection.execute(sa.text("SELECT classes FROM models")).scalar_one()
    assert (json.loads(stored) if isinstance(stored, str) else stored) == classes
    db.downgrade("0007")
    with db.engine.connect() as connection:
        stored = connection.execute(sa.text("SELECT labels FROM models")).scalar_one()
    assert (json.loads(stored) if isinstance(stored, str) else stored) == classes
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
