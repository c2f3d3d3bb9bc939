"""Batch writes: COPY + merge on PostgreSQL and multi-row upserts on SQLite leave the same rows."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from enrichment.sources.records_file import Record
from enrichment.store.database import Database
from enrichment.store.writes import (
    LabelScore,
    RecordOutcome,
    register_model,
    save_outcomes,
    upsert_records,
)
from tests.conftest import upgraded_database

VERSION = "tiny@000000000000"
TRICKY = "tab\there, newline\nthere, back\\slash, \\N, quote ' \" and ünïcødé"


def outcomes(confidence: float) -> list[RecordOutcome]:
    return [
        RecordOutcome(
            "/w/a",
            "labelled",
            scores=[confidence, 0.1],
            labels=[LabelScore("photograph", "http://c/photo", confidence)],
            image_url="http://img/a.jpg",
            image_sha256="ab" * 32,
            source_timestamp=datetime(2024, 5, 6, 7, 8, 9, 123456),
        ),
        RecordOutcome("/w/b", "below_threshold", scores=[0.2, 0.1], image_url="http://img/b"),
        RecordOutcome.failed("/w/c", "http_404", TRICKY, image_url="http://img/c\tx"),
        RecordOutcome.failed("/w/d", "decode_error", ""),
    ]


def rows(db: Database) -> tuple[list[tuple], list[tuple]]:
    with db.engine.connect() as connection:
        results = connection.execute(
            sa.text(
                "SELECT record_id, run_id, status, error_reason, error_message, scores,"
                " image_url, image_sha256, source_timestamp FROM results ORDER BY record_id"
            )
        ).all()
        labels = connection.execute(sa.text("SELECT * FROM labels ORDER BY record_id")).all()
    normalised = [
        (
            *row[:5],
            row[5] if not isinstance(row[5], str) else json.loads(row[5]),
            *row[6:8],
            str(row[8]) if row[8] is not None else None,
        )
        for row in results
    ]
    return normalised, [tuple(row) for row in labels]


def write(db: Database, batch: list[RecordOutcome]) -> None:
    with db.transaction() as session:
        save_outcomes(session, None, VERSION, batch)


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path: Path) -> Database:
    database = upgraded_database(request, tmp_path)
    with database.transaction() as session:
        register_model(session, VERSION, "tiny", "resnet18", [], [])
        upsert_records(
            session,
            [Record(f"/w/{name}", "w", f"http://item/w/{name}", None) for name in "abcd"],
        )
    return database


def test_a_batch_is_written_whole_and_rewritten_idempotently(db: Database) -> None:
    write(db, outcomes(0.9))
    first = rows(db)
    assert [row[0] for row in first[0]] == ["/w/a", "/w/b", "/w/c", "/w/d"]
    assert first[0][2][4] == TRICKY and first[0][2][6] == "http://img/c\tx"
    assert first[0][3][4] == "", "an empty message stays empty, not NULL"
    assert first[0][0][8].startswith("2024-05-06 07:08:09.123456")
    assert first[1] == [("/w/a", VERSION, "photograph", "http://c/photo", 0.9)]
    write(db, outcomes(0.9))
    assert rows(db) == first
    write(db, outcomes(0.7))  # a later model decision replaces scores and labels
    assert rows(db)[1] == [("/w/a", VERSION, "photograph", "http://c/photo", 0.7)]


def test_a_record_twice_in_one_batch_is_written_once_with_its_last_outcome(db: Database) -> None:
    batch = outcomes(0.9)
    write(db, [*batch, RecordOutcome.failed("/w/a", "timeout", "late"), batch[1]])
    results, labels = rows(db)
    assert len(results) == 4
    assert results[0][2:4] == ("error", "timeout") and labels == []


def test_the_same_session_writes_batch_after_batch(db: Database) -> None:
    """The staging tables are per session and emptied at commit: nothing leaks across."""
    batch = outcomes(0.9)
    write(db, batch[:2])
    write(db, batch[2:])
    assert len(rows(db)[0]) == 4
