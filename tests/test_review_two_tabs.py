"""One queue open in two tabs, or decided by two curators at once: a tab shown again shows the
decisions made meanwhile, and a decision made on a state that no longer stands is refused
with what stands now (409), never stored over it silently. In Chromium for the tabs; over
real HTTP for the API and for two decisions on one item at the same moment."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import event

from enrichment.store.database import Database
from enrichment.store.decisions import (
    DecidedMeanwhile,
    NewDecision,
    record_decisions,
    standing_decisions,
)
from tests.test_report import DevTools, chromium  # noqa: F401 (the fixture)
from tests.test_review_api import (  # noqa: F401 (the fixtures)
    KEYS,
    SCORES,
    VERSION,
    ReviewServer,
    app_server,
    decide,
    review_db,
)
from tests.test_review_browser import press, until
from tests.test_review_browser_corrections import STATES
from tests.test_review_browser_session import read
from tests.test_review_filters_browser import click
from tests.test_review_store import db  # noqa: F401 (the fixture: SQLite and PostgreSQL)

TOAST = "document.getElementById('toast').innerText"
PENDING = "document.getElementById('pending').innerText"


def front(browser: DevTools, tab: str) -> None:
    """Choose the tab, as a curator clicks it: the other one is hidden."""
    browser.call("Page.bringToFront", tab)


def test_a_tab_shown_again_shows_what_was_decided_in_the_other(
    app_server: ReviewServer,  # noqa: F811
    chromium: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    # The map queue: /9001/c and /9002/d (margins .02), /9002/e, /9001/b, /9001/a.
    queue = f"{app_server.url}/queue?label=map&limit=5"
    browser = DevTools(chromium, tmp_path / "profile")
    try:
        first, _ = browser.load(queue, 1280)
        browser.evaluate(first, "localStorage.setItem('enrichReviewer', 'ada'), true")
        browser.evaluate(first, "document.getElementById('reviewer').value = 'ada', true")
        second, _ = browser.load(queue, 1280)
        assert read(browser, second, STATES) == read(browser, first, STATES)
        assert read(browser, second, STATES)[:2] == ["/9001/c pending", "/9002/d pending"]

        # Decided in the first tab: the second, chosen again, shows it, and counts it.
        front(browser, first)
        press(browser, first, "r")
        until(browser, "the reject", lambda: len(app_server.decisions()) == 1)
        front(browser, second)
        until(
            browser,
            "the second tab to show the reject",
            lambda: read(browser, second, STATES)[0] == "/9001/c reject",
            seconds=10,
        )
        until(browser, "its count", lambda: read(browser, second, PENDING) == "4", seconds=10)
        assert "decided elsewhere" in str(read(browser, second, TOAST))

        # Another curator rejects /9002/d while this tab shows it pending: the accept made on
        # it is refused, the tile shows the reject, and nothing of ada's is stored.
        assert decide(app_server, ("/9002/d", "map", "reject", "bob")).status_code == 201
        press(browser, second, "j")
        press(browser, second, "a")
        until(
            browser,
            "the tile to show bob's reject",
            lambda: read(browser, second, STATES)[1] == "/9002/d reject",
            seconds=10,
        )
        assert "bob" in str(read(browser, second, TOAST))
        assert app_server.decisions() == [
            ("/9001/c", "map", "reject", "ada", False),
            ("/9002/d", "map", "reject", "bob", False),
        ]
        # Now that the curator sees it, the same key decides it.
        press(browser, second, "k")
        press(browser, second, "a")
        until(browser, "the accept", lambda: len(app_server.decisions()) == 3)
        assert app_server.decisions()[-1] == ("/9002/d", "map", "accept", "ada", False)

        # A selection cannot overturn what was decided while the tab was away.
        click(browser, second, ".tile:nth-child(3)")
        click(browser, second, ".tile:nth-child(4)")
        front(browser, first)
        press(browser, first, "j")  # from /9002/d, where the reject of c moved the focus
        press(browser, first, "r")  # /9002/e, in the first tab
        until(browser, "the reject of e", lambda: len(app_server.decisions()) == 4)
        front(browser, second)
        until(
            browser,
            "e decided, and out of the selection",
            lambda: (
                read(browser, second, "document.getElementById('selected-count').innerText")
                == "1 selected"
            ),
            seconds=10,
        )
        assert read(browser, second, STATES)[2] == "/9002/e reject"
        browser.evaluate(second, "document.getElementById('accept-selected').click(), true")
        until(browser, "the accept of b", lambda: len(app_server.decisions()) == 5)
        assert app_server.decisions()[-2:] == [
            ("/9002/e", "map", "reject", "ada", False),
            ("/9001/b", "map", "accept", "ada", False),
        ]

        # A curator who changes their mind before the answer comes (r, then a, on the last
        # tile, in one go) decides on their own reject, not on another tab's: no conflict.
        browser.evaluate(
            second,
            "['j', 'j', 'j', 'j', 'j', 'r', 'a'].forEach(key =>"
            " document.dispatchEvent(new KeyboardEvent('keydown', {key: key}))), true",
        )
        until(browser, "the add", lambda: len(app_server.decisions()) == 7)
        assert app_server.decisions()[-2:] == [
            ("/9001/a", "map", "reject", "ada", False),
            ("/9001/a", "map", "add", "ada", False),
        ]
        until(browser, "its tile", lambda: read(browser, second, STATES)[4] == "/9001/a add")

        # The first tab, shown again, has caught up with all of it.
        front(browser, first)
        until(
            browser,
            "the first tab to catch up",
            lambda: (
                read(browser, first, STATES)[:4]
                == ["/9001/c reject", "/9002/d accept", "/9002/e reject", "/9001/b accept"]
            ),
            seconds=10,
        )
        for tab in (first, second):
            assert browser.seen("Runtime.exceptionThrown", tab) == []
    finally:
        browser.close()


def test_a_decision_on_a_state_that_no_longer_stands_is_refused(
    app_server: ReviewServer,  # noqa: F811
) -> None:
    def send(decision: str, seen: str | None) -> requests.Response:
        body = {
            "record_id": "/9001/a",
            "label_key": "photograph",
            "model_version": VERSION,
            "decision": decision,
            "reviewer": "ada",
            **({"seen": seen} if seen is not None else {}),
        }
        return requests.post(f"{app_server.url}/api/decisions", json=body, timeout=10)

    assert send("accept", "pending").status_code == 201
    refused = send("reject", "pending")
    assert refused.status_code == 409
    assert refused.json()["field"] == "seen"
    [now] = refused.json()["conflicts"]
    assert (now["record_id"], now["label_key"], now["decision"], now["reviewer"]) == (
        "/9001/a",
        "photograph",
        "accept",
        "ada",
    )
    assert send("reject", "accept").status_code == 201
    assert send("accept", None).status_code == 201  # a script that says nothing decides
    assert send("reject", "rejected").json()["field"] == "seen"
    stands = requests.get(
        f"{app_server.url}/api/decisions",
        params={"record": ["/9001/a", "/9002/e"]},
        timeout=10,
    ).json()["decisions"]
    assert [(d["record_id"], d["label_key"], d["decision"]) for d in stands] == [
        ("/9001/a", "photograph", "accept")
    ]
    assert app_server.decisions() == [
        ("/9001/a", "photograph", "accept", "ada", False),
        ("/9001/a", "photograph", "reject", "ada", False),
        ("/9001/a", "photograph", "accept", "ada", False),
    ]
    assert requests.get(f"{app_server.url}/api/decisions", timeout=10).status_code == 400


def test_an_audit_decision_is_checked_against_the_audit_and_shown_apart(
    app_server: ReviewServer,  # noqa: F811
) -> None:
    """The audit sample shows each label's audit decision only, so an auditor's `seen` is the
    audit's state: a queue decision on the label is no conflict, another audit decision is."""

    def send(decision: str, seen: str, audit: bool, reviewer: str) -> requests.Response:
        body = {
            "record_id": "/9001/a",
            "label_key": "photograph",
            "model_version": VERSION,
            "decision": decision,
            "reviewer": reviewer,
            "seen": seen,
            "audit": audit,
        }
        return requests.post(f"{app_server.url}/api/decisions", json=body, timeout=10)

    assert send("accept", "pending", False, "carol").status_code == 201  # in the queue
    assert send("reject", "pending", True, "dora").status_code == 201  # the audit: pending
    refused = send("accept", "pending", True, "erin")  # a second auditor, shown it pending
    assert refused.status_code == 409
    [now] = refused.json()["conflicts"]
    assert (now["decision"], now["reviewer"], now["audit"]) == ("reject", "dora", True)
    assert send("accept", "accept", False, "carol").status_code == 409  # the queue sees all

    def shown(path: str, audit: bool) -> dict[str, Any]:
        params = {"record": "/9001/a", "id": "/9001/a", **({"audit": "1"} if audit else {})}
        return requests.get(f"{app_server.url}{path}", params=params, timeout=10).json()

    queue = shown("/api/decisions", False)["decisions"]
    assert [(d["decision"], d["reviewer"]) for d in queue] == [("reject", "dora")]
    assert send("accept", "reject", False, "carol").status_code == 201
    audited = shown("/api/decisions", True)["decisions"]
    assert [(d["decision"], d["reviewer"]) for d in audited] == [("reject", "dora")]
    states = {i["label_key"]: i["state"] for i in shown("/api/record", True)["items"]}
    assert states == {"photograph": "reject", "drawing": "pending", "map": "pending"}
    states = {i["label_key"]: i["state"] for i in shown("/api/record", False)["items"]}
    assert states["photograph"] == "accept"


def at_once(server: ReviewServer, record_id: str, key: str) -> list[int]:
    """ada and bob, both shown the item pending, reject it at the same moment: the codes."""
    start = threading.Barrier(2)
    codes: list[int] = []

    def curator(name: str) -> None:
        body = {
            "record_id": record_id,
            "label_key": key,
            "model_version": VERSION,
            "decision": "reject",
            "reviewer": name,
            "seen": "pending",
        }
        start.wait()
        answer = requests.post(f"{server.url}/api/decisions", json=body, timeout=30)
        codes.append(answer.status_code)

    threads = [threading.Thread(target=curator, args=(name,)) for name in ("ada", "bob")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return codes


def test_two_curators_deciding_one_item_at_once_leave_one_decision(
    app_server: ReviewServer,  # noqa: F811
) -> None:
    """Each item is decided by two curators at once: one decision is stored, the other
    refused with it (without the check and the write in one step, both pass the check
    now and then)."""
    items = [(record_id, key) for record_id in SCORES for key in KEYS]
    for record_id, key in items:
        assert sorted(at_once(app_server, record_id, key)) == [201, 409], (record_id, key)
    assert len(app_server.decisions()) == len(items)


def decide_at_once(database: Database, *items: tuple[str, str]) -> dict[str, str]:
    """ada and bob, each on a connection of their own, both shown their item pending, reject
    it at the same moment; each waits (a second at most) for the other between the check of
    what stands and the write of the decision. What became of each: stored, or whose
    decision the conflict names."""
    start = threading.Barrier(2)
    writing = threading.Barrier(2, timeout=1)
    outcomes: dict[str, str] = {}

    def both_checked(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO REVIEWS"):
            # Both here: both passed the check before either wrote. Broken after a second:
            # the other waits for this one's transaction, as it should.
            with contextlib.suppress(threading.BrokenBarrierError):
                writing.wait()

    def curator(name: str, item: tuple[str, str]) -> None:
        made = NewDecision(*item, VERSION, "reject", name, seen="pending")
        start.wait()
        try:
            record_decisions(database, [made])
            outcomes[name] = "stored"
        except DecidedMeanwhile as conflict:
            (_, _, standing), *_ = conflict.conflicts
            outcomes[name] = f"refused: {standing.reviewer if standing else None}"

    event.listen(database.engine, "before_cursor_execute", both_checked)
    try:
        threads = [
            threading.Thread(target=curator, args=(name, item))
            for name, item in zip(("ada", "bob"), items * 2, strict=False)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        event.remove(database.engine, "before_cursor_execute", both_checked)
    return outcomes


def test_the_check_of_what_stands_and_the_write_are_one_step_on_both_databases(
    db: Database,  # noqa: F811
) -> None:
    """On SQLite as on PostgreSQL: two connections deciding one pending item at once leave one
    decision, the other refused with it. SQLite had no lock: both read it pending before
    either wrote, and both were stored (SQLite makes writers take turns, not check-then-write
    steps). Two items at once are both stored: the lock refuses nothing."""
    outcomes = decide_at_once(db, ("/9001/a", "map"))
    winner = next((name for name, outcome in outcomes.items() if outcome == "stored"), None)
    loser = "bob" if winner == "ada" else "ada"
    assert outcomes == {winner: "stored", loser: f"refused: {winner}"}
    assert standing_decisions(db) == {("/9001/a", "map"): "reject"}
    assert decide_at_once(db, ("/9001/b", "map"), ("/9002/d", "map")) == {
        "ada": "stored",
        "bob": "stored",
    }
    assert len(standing_decisions(db)) == 3
