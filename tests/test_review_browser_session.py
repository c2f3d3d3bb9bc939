"""A curator's session in a real headless Chromium, as a person works it: the team-mode login
form typed and submitted (and a cross-site form refused), the reviewer's name typed without
losing a keystroke, and a queue of more than a hundred items decided page by page with the
keys, none skipped, the counts moving as it goes."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import pytest
import sqlalchemy as sa

from enrichment.sources.records_file import Record
from enrichment.store.database import Database
from enrichment.store.schema import Outcome, RecordRow, Result
from enrichment.store.writes import (
    LabelScore,
    RecordOutcome,
    register_model,
    save_outcomes,
    upsert_records,
)
from tests.conftest import VOCABULARY, image_bytes
from tests.test_report import DevTools, chromium  # noqa: F401 (the fixture)
from tests.test_review_api import (
    KEYS,
    MODEL_LABELS,
    THRESHOLDS,
    VERSION,
    ReviewServer,
    build_review_db,
    serve,
)
from tests.test_review_browser import press, until

TOKEN = "s3cret-team-token"


def read(browser: DevTools, session: str, expression: str) -> object:
    """The expression's value, or None while the page is between two documents."""
    with contextlib.suppress(AssertionError, KeyError):
        return browser.evaluate(session, expression)
    return None


def press_enter(browser: DevTools, session: str) -> None:
    """Enter as a keyboard sends it (with its "\\r" text, which submits a form)."""
    for kind in ("keyDown", "keyUp"):
        browser.call(
            "Input.dispatchKeyEvent",
            session,
            type=kind,
            key="Enter",
            code="Enter",
            text="\r" if kind == "keyDown" else "",
            windowsVirtualKeyCode=13,
        )


def type_text(browser: DevTools, session: str, text: str) -> None:
    """Type into the focused element, as a keyboard does."""
    browser.call("Input.insertText", session, text=text)


@contextlib.contextmanager
def other_origin(page: str) -> Iterator[str]:
    """A page served from another origin (localhost, not 127.0.0.1, on another port)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = page.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://localhost:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def team_server(pg_url: str, image_host, tmp_path: Path) -> Iterator[ReviewServer]:
    db = build_review_db(pg_url, image_host)
    server = serve(db, tmp_path, token=TOKEN)
    yield server
    server.close()
    db.dispose()


def test_team_login_through_the_form_then_a_decision_and_logout(
    team_server: ReviewServer,
    chromium: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    browser = DevTools(chromium, tmp_path / "profile")
    try:
        tab, _ = browser.load(f"{team_server.url}/queue?label=map", 1280)
        assert read(browser, tab, "location.pathname") == "/login"
        assert "reachable from the network" not in str(
            read(browser, tab, "document.body.innerText")
        )
        browser.evaluate(tab, "document.getElementById('token').focus(), true")
        type_text(browser, tab, TOKEN)
        press_enter(browser, tab)  # submits the form, as a person would
        until(
            browser,
            "the queue after logging in",
            lambda: (
                read(browser, tab, "location.pathname + location.search") == "/queue?label=map"
                and read(browser, tab, "!!document.querySelector('#grid .tile')")
                and read(browser, tab, "document.readyState") == "complete"
            ),
        )
        # `a` with no reviewer asks for the name; Enter confirms it and gives the keys back.
        browser.evaluate(tab, "localStorage.clear(), document.getElementById('reviewer').value=''")
        press(browser, tab, "a")
        until(
            browser,
            "the reviewer box asking for a name",
            lambda: read(browser, tab, "document.activeElement.id") == "reviewer",
        )
        type_text(browser, tab, "Cleo")
        press_enter(browser, tab)
        assert read(browser, tab, "document.activeElement.id") != "reviewer"
        first = read(browser, tab, "document.querySelector('.tile').dataset.record")
        press(browser, tab, "a")
        until(browser, "the decision", lambda: len(team_server.decisions()) == 1)
        record, key, decision, reviewer, _ = team_server.decisions()[0]
        assert (record, key, reviewer) == (first, "map", "Cleo")
        assert decision in ("accept", "add")
        assert read(browser, tab, "localStorage.getItem('enrichReviewer')") == "Cleo"

        browser.evaluate(tab, "document.getElementById('logout').click(), true")
        until(
            browser, "the login page", lambda: read(browser, tab, "location.pathname") == "/login"
        )
        browser.evaluate(tab, "location.href = '/queue'")
        until(
            browser,
            "the login page again",
            lambda: (
                read(browser, tab, "location.pathname") == "/login"
                and read(browser, tab, "document.readyState") == "complete"
            ),
        )

        # A page on another origin posts the token to the login form: refused.
        attack = (
            f'<form method="post" action="{team_server.url}/login">'
            f'<input name="token" value="{TOKEN}"><input name="next" value="/queue"></form>'
            "<script>document.forms[0].submit()</script>"
        )
        with other_origin(attack) as attacker:
            evil, _ = browser.load(attacker, 1280)
            until(
                browser,
                "the refusal",
                lambda: (
                    "cross-site request refused"
                    in str(read(browser, evil, "document.body.innerText"))
                ),
            )
        answers = [
            event["response"]["status"]
            for event in browser.seen("Network.responseReceived", evil)
            if event["response"]["url"] == f"{team_server.url}/login"
        ]
        assert answers == [403]
        assert len(team_server.decisions()) == 1
    finally:
        browser.close()


def test_a_login_ended_under_the_page_stops_the_keys_and_says_so(
    team_server: ReviewServer,
    chromium: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Logged out in another tab, a curator's keys on the first tab were lost one by one while
    focus moved on, with only a passing toast: now the page says the login ended, with a link
    back to it, and takes no more decisions."""
    browser = DevTools(chromium, tmp_path / "profile")
    try:
        tab, _ = browser.load(f"{team_server.url}/login?next=/queue%3Flabel%3Dmap", 1280)
        browser.evaluate(tab, "document.getElementById('token').focus(), true")
        type_text(browser, tab, TOKEN)
        press_enter(browser, tab)
        until(
            browser,
            "the queue",
            lambda: (
                read(browser, tab, "location.pathname") == "/queue"
                and read(browser, tab, "document.readyState") == "complete"
                and read(browser, tab, "!!document.querySelector('#grid .tile')")
            ),
        )
        browser.evaluate(tab, "localStorage.setItem('enrichReviewer', 'ada'), true")
        browser.evaluate(tab, "document.getElementById('reviewer').value = 'ada', true")
        assert read(browser, tab, "document.getElementById('login-lost').hidden") is True

        other, _ = browser.load(f"{team_server.url}/stats", 1280)
        browser.evaluate(other, "document.getElementById('logout').click(), true")
        until(browser, "logged out", lambda: read(browser, other, "location.pathname") == "/login")

        focused = (
            "Array.from(document.querySelectorAll('.tile'))"
            ".findIndex((t) => t.classList.contains('focused'))"
        )
        press(browser, tab, "a")  # sent, refused: the page learns the login is gone
        until(
            browser,
            "the notice",
            lambda: read(browser, tab, "document.getElementById('login-lost').hidden") is False,
        )
        where = read(browser, tab, focused)
        for _ in range(3):
            press(browser, tab, "a")
        assert read(browser, tab, focused) == where  # no more tiles passed over unsaved
        assert read(browser, tab, "document.querySelector('.tile').dataset.state") == "pending"
        assert team_server.decisions() == []
        link = read(browser, tab, "document.getElementById('login-again').getAttribute('href')")
        assert link == "/login?next=" + quote("/queue?label=map", safe="")
        assert browser.seen("Runtime.exceptionThrown", tab) == []
    finally:
        browser.close()


def build_long_queue(url: str, image_host) -> tuple[Database, set[tuple[str, str]]]:
    """45 records of datasets 9101 and 9102 (135 items) and 5 of dataset 9103, all with one
    image; returns the items of the first two datasets."""
    db = Database(url)
    db.upgrade()
    image = image_host.add("/long/one.png", image_bytes((90, 120, 200), "circle"))
    records, outcomes, wanted = [], [], set()
    for number in range(50):
        dataset = ("9101", "9102")[number % 2] if number < 45 else "9103"
        record_id = f"/{dataset}/item_{number:03d}"
        records.append(
            Record(record_id, dataset, "http://data.europeana.eu/item" + record_id, image, "M")
        )
        scores = [((number * 7 + index * 13) % 100) / 100 for index in range(len(KEYS))]
        labels = [
            LabelScore(key, VOCABULARY[key], score)
            for key, score, threshold in zip(KEYS, scores, THRESHOLDS, strict=True)
            if score >= threshold
        ]
        outcome = Outcome.LABELLED if labels else Outcome.BELOW_THRESHOLD
        outcomes.append(RecordOutcome(record_id, outcome, scores=scores, labels=labels))
        if dataset != "9103":
            wanted.update((record_id, key) for key in KEYS)
    with db.transaction() as session:
        register_model(session, VERSION, "pilot", "resnet18", MODEL_LABELS, list(THRESHOLDS))
        upsert_records(session, records)
    with db.transaction() as session:
        save_outcomes(session, None, VERSION, outcomes)
    return db, wanted


def open_long_queue(browser: DevTools, base_url: str) -> str:
    """The long queue's first page, three classes over two datasets, with 'ada' as reviewer."""
    query = "label=photograph&label=drawing&label=map&dataset=9101&dataset=9102"
    tab, _ = browser.load(f"{base_url}/queue?{query}", 1280)
    browser.evaluate(tab, "localStorage.setItem('enrichReviewer', 'ada'), true")
    browser.evaluate(tab, "document.getElementById('reviewer').value = 'ada'")
    return tab


def test_a_long_queue_decided_page_by_page_with_the_keys(
    pg_url: str,
    image_host,
    chromium: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    db, wanted = build_long_queue(pg_url, image_host)
    server = serve(db, tmp_path)
    browser = DevTools(chromium, tmp_path / "profile")
    try:
        tab = open_long_queue(browser, server.url)
        pages, decided, pending_seen = [], 0, []
        while decided < len(wanted):
            until(
                browser,
                f"page {len(pages) + 1}",
                # One read, so that all three hold of one page: read apart, the first could
                # see the page before loaded and the others the next one still loading,
                # before its keys work.
                lambda: read(
                    browser,
                    tab,
                    "(() => { const tiles = document.querySelectorAll('.tile');"
                    " return document.readyState === 'complete' && tiles.length > 0"
                    " && document.querySelectorAll('.tile.state-pending').length"
                    " === tiles.length; })()",
                ),
            )
            search = str(read(browser, tab, "location.search"))
            assert "label=photograph&label=drawing&label=map" in search
            assert "dataset=9101&dataset=9102" in search
            tiles = read(browser, tab, "document.querySelectorAll('.tile').length")
            assert isinstance(tiles, int)
            pages.append(tiles)
            for index in range(tiles):
                press(browser, tab, "ar"[index % 2])
                decided += 1
                until(
                    browser,
                    f"decision {decided}",
                    lambda done=decided: len(server.decisions()) == done,
                )
                if index < tiles - 1:  # the last one moves on to the next page
                    until(
                        browser,
                        "the pending count",
                        lambda done=decided: (
                            read(browser, tab, "document.getElementById('pending').textContent")
                            == str(len(wanted) - done)
                        ),
                    )
                    pending_seen.append(len(wanted) - decided)
        until(
            browser,
            "the end of the queue",
            lambda: "Nothing left" in str(read(browser, tab, "document.body.innerText")),
        )
        assert pages == [48, 48, 39]
        stored = server.decisions()
        assert {(record, key) for record, key, *_ in stored} == wanted  # none skipped
        assert len(stored) == len(wanted)  # none twice
        assert {reviewer for *_, reviewer, _ in stored} == {"ada"}
        assert pending_seen == sorted(pending_seen, reverse=True)
        assert read(browser, tab, "document.getElementById('pending').textContent") == "0"
        for event in ("Runtime.exceptionThrown", "Network.loadingFailed"):
            assert browser.seen(event, tab) == []
    finally:
        browser.close()
        server.close()
        db.dispose()


def test_what_the_keys_do_is_on_screen(
    pg_url: str,
    image_host,
    chromium: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The heading asks about one thing; after `u` the focus is back on the undone tile; the
    record view shows each class on or off and what its key will do; a tile whose image
    cannot be shown says why."""
    db = build_review_db(pg_url, image_host)
    blocked = "http://169.254.169.254/latest/image.png"  # link-local: the fetcher refuses it
    with db.engine.begin() as connection:
        for table in (RecordRow, Result):
            connection.execute(
                sa.update(table)
                .where(
                    table.__table__.c[("id" if table is RecordRow else "record_id")] == "/9002/d"
                )
                .values(image_url=blocked)
            )
    server = serve(db, tmp_path)
    browser = DevTools(chromium, tmp_path / "profile")
    try:
        tab, _ = browser.load(f"{server.url}/queue?label=map", 1280)
        assert read(browser, tab, "document.querySelector('h1').innerText") == "Is this a map?"
        browser.evaluate(tab, "document.getElementById('reviewer').value = 'ada', true")
        until(
            browser,
            "the unavailable image's reason",
            lambda: (
                read(
                    browser,
                    tab,
                    "Array.from(document.querySelectorAll('.unavailable'))"
                    ".map(n => n.innerText).join()",
                )
                == "image unavailable: blocked_address"
            ),
        )
        focused = (
            "Array.from(document.querySelectorAll('.tile'))"
            ".findIndex(t => t.classList.contains('focused'))"
        )
        press(browser, tab, "a")
        until(browser, "the decision", lambda: len(server.decisions()) == 1)
        until(browser, "the focus on", lambda: read(browser, tab, focused) == 1)
        press(browser, tab, "u")
        until(browser, "the undo", lambda: len(server.decisions()) == 0)
        until(browser, "the focus back", lambda: read(browser, tab, focused) == 0)

        # /9001/b: photograph .52 >= .5 is a model label, pending; key 1 turns it off.
        record, _ = browser.load(f"{server.url}/record?id=/9001/b&model_version={VERSION}", 1280)
        browser.evaluate(record, "document.getElementById('reviewer').value = 'ada', true")
        row = "document.querySelectorAll('.class-row')[0]"
        shown = f"[{row}.querySelector('input.on').checked, {row}.querySelector('.does').innerText]"
        assert read(browser, record, shown) == [True, "turn off: reject"]
        press(browser, record, "1")
        until(browser, "the reject", lambda: len(server.decisions()) == 1)
        until(
            browser,
            "the row turned off",
            lambda: read(browser, record, shown) == [False, "turn on: accept"],
        )
        assert server.decisions() == [("/9001/b", "photograph", "reject", "ada", False)]
        press(browser, record, "1")
        until(browser, "the accept", lambda: len(server.decisions()) == 2)
        assert server.decisions()[-1][2] == "accept"
    finally:
        browser.close()
        server.close()
        db.dispose()


def test_a_page_decided_faster_than_its_answers_come_opens_the_next_page_once(
    pg_url: str,
    image_host,
    chromium: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Every key of a page pressed before any decision is back: each answer looks at the page,
    and only the first to find nothing pending sends the browser on."""
    db, _ = build_long_queue(pg_url, image_host)
    server = serve(db, tmp_path)
    browser = DevTools(chromium, tmp_path / "profile")
    try:
        tab = open_long_queue(browser, server.url)
        tiles = read(browser, tab, "document.querySelectorAll('.tile').length")
        assert tiles == 48
        for _ in range(48):
            press(browser, tab, "a")
        until(browser, "48 decisions", lambda: len(server.decisions()) == 48)
        until(
            browser,
            "the next page",
            lambda: (
                (
                    "offset=" in str(read(browser, tab, "location.search"))
                    or "after=" in str(read(browser, tab, "location.search"))
                )
                and read(browser, tab, "document.readyState") == "complete"
            ),
        )
        time.sleep(1)  # any second navigation would have begun by now
        browser.evaluate(tab, "1")  # read the events that came meanwhile
        documents = [
            event["request"]["url"]
            for event in browser.seen("Network.requestWillBeSent", tab)
            if event.get("type") == "Document"
        ]
        assert len(documents) == 2, documents  # the first page, then the next one once
    finally:
        browser.close()
        server.close()
        db.dispose()
