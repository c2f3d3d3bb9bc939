"""A take-back (undo) is a row of its own: who, when, and which decision it reverses; the
audit trail keeps both, the decision before counts again, and a curator sees and undoes their
recent decisions from any page. Migration 0009 carries rows up and down, on SQLite and
PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa

from enrichment.store.database import Database
from enrichment.store.decisions import (
    NewDecision,
    recent_decisions,
    record_decisions,
    standing_decisions,
    take_back_decisions,
)
from enrichment.store.reviews import Review
from tests.test_report import DevTools, chromium  # noqa: F401 (the fixture)
from tests.test_review_api import (  # noqa: F401 (fixtures)
    VERSION,
    ReviewServer,
    app_server,
    build_review_db,
    review_db,
    serve,
)
from tests.test_review_browser import until
from tests.test_review_filters_browser import click


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, image_host, tmp_path: Path) -> Iterator[Database]:
    url = (
        f"sqlite:///{tmp_path}/review.sqlite3"
        if request.param == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    database = build_review_db(url, image_host)
    yield database
    database.dispose()


def test_a_take_back_is_a_row_naming_who_when_and_what(db: Database) -> None:
    first, second = record_decisions(
        db,
        [
            NewDecision("/9001/c", "drawing", VERSION, "accept", "ada"),
            NewDecision("/9001/b", "map", VERSION, "accept", "ada"),
        ],
    )
    (later,) = record_decisions(db, [NewDecision("/9001/c", "drawing", VERSION, "reject", "ada")])
    assert take_back_decisions(db, [later, 10**12], reviewer="cleo") == 1
    assert take_back_decisions(db, [later]) == 0  # already taken back
    with db.engine.connect() as connection:
        rows = connection.execute(
            sa.select(Review.id, Review.decision, Review.reviewer, Review.reverses).order_by(
                Review.id
            )
        ).all()
    assert [tuple(row)[1:] for row in rows] == [
        ("accept", "ada", None),
        ("accept", "ada", None),
        ("reject", "ada", None),  # kept for the audit trail
        ("undo", "cleo", later),
    ]
    assert take_back_decisions(db, [rows[-1].id]) == 0  # a take-back is not taken back
    assert standing_decisions(db)[("/9001/c", "drawing")] == "accept"
    recent = recent_decisions(db, "ada")
    assert [(item.id, item.taken_back) for item in recent] == [
        (later, True),
        (second, False),
        (first, False),
    ]
    assert recent_decisions(db, "nobody") == []


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_migration_0009_keeps_the_standing_decisions_up_and_down(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = (
        f"sqlite:///{tmp_path}/m.sqlite3"
        if backend == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    database = Database(url)
    database.upgrade("0008")
    insert = sa.text(
        "INSERT INTO reviews (record_id, label_key, model_version, decision, reviewer, audit, "
        "decided_at) VALUES (:record, 'map', 'm@1', :decision, 'ada', false, '2026-12-06')"
    )
    with database.engine.begin() as connection:
        for record, decision in (("/1/a", "accept"), ("/1/b", "reject"), ("/1/b", "accept")):
            connection.execute(insert, {"record": record, "decision": decision})
    database.upgrade()
    assert standing_decisions(database) == {("/1/a", "map"): "accept", ("/1/b", "map"): "accept"}
    assert take_back_decisions(database, [3], reviewer="ada") == 1
    assert standing_decisions(database)[("/1/b", "map")] == "reject"
    database.downgrade("0008")
    with database.engine.connect() as connection:
        left = connection.execute(
            sa.text("SELECT record_id, decision FROM reviews ORDER BY id")
        ).all()
    # Down, the old rule: the taken-back decision and its take-back are gone.
    assert [tuple(row) for row in left] == [("/1/a", "accept"), ("/1/b", "reject")]
    database.upgrade()
    assert standing_decisions(database)[("/1/b", "map")] == "reject"
    database.dispose()


def test_recent_decisions_are_listed_and_undone_after_navigating(
    pg_url: str, image_host, tmp_path: Path
) -> None:
    database = build_review_db(pg_url, image_host)
    server = serve(database, tmp_path)
    try:
        (made,) = record_decisions(
            database, [NewDecision("/9001/a", "map", VERSION, "reject", "ada")]
        )
        page = requests.get(f"{server.url}/recent", params={"reviewer": "ada"}, timeout=10)
        assert page.status_code == 200 and f'data-id="{made}"' in page.text
        listed = requests.get(f"{server.url}/api/recent?reviewer=ada", timeout=10).json()
        assert [(item["id"], item["taken_back"]) for item in listed["decisions"]] == [(made, False)]
        undo = requests.post(
            f"{server.url}/api/undo", json={"ids": [made], "reviewer": "ada"}, timeout=10
        )
        assert undo.json() == {"undone": 1}
        listed = requests.get(f"{server.url}/api/recent?reviewer=ada", timeout=10).json()
        assert listed["decisions"][0]["taken_back"] is True
        refused = requests.get(f"{server.url}/api/recent", timeout=10)
        assert refused.status_code == 400 and "reviewer" in refused.json()["error"]
    finally:
        server.close()
        database.dispose()


def test_an_undo_from_another_curators_list_is_recorded_as_the_one_at_the_keys(
    app_server: ReviewServer,  # noqa: F811
    chromium: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Bob, looking at Ada's recent decisions, takes one back: the take-back is Bob's (it was
    recorded as Ada's, so the audit trail named the wrong curator)."""
    (made,) = record_decisions(
        app_server.db, [NewDecision("/9001/a", "map", VERSION, "reject", "ada")]
    )
    browser = DevTools(chromium, tmp_path / "profile")
    try:
        tab, _ = browser.load(f"{app_server.url}/recent?reviewer=ada", 1280)
        browser.evaluate(tab, "localStorage.setItem('enrichReviewer', 'bob'), true")
        browser.evaluate(tab, "document.getElementById('reviewer').value = 'bob', true")
        click(browser, tab, f'tr[data-id="{made}"] .take-back')
        until(browser, "the take-back", lambda: standing_decisions(app_server.db) == {})
        assert browser.seen("Runtime.exceptionThrown", tab) == []
    finally:
        browser.close()
    with app_server.db.engine.connect() as connection:
        taken_back_by = connection.execute(
            sa.select(Review.reviewer).where(Review.reverses == made)
        ).scalar_one()
    assert taken_back_by == "bob"
