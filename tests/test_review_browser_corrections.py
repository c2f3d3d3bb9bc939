"""A curator correcting decisions in Chromium: what a page of decided items, "u" after a page
turned itself, "select all" after a decision, and the browser's Back button do."""

from __future__ import annotations

import time
from pathlib import Path

from tests.test_report import DevTools, chromium  # noqa: F401 (the fixture)
from tests.test_review_api import build_review_db, serve
from tests.test_review_browser import press, until
from tests.test_review_browser_session import read

STATES = (
    "Array.from(document.querySelectorAll('.tile'))"
    ".map(t => t.dataset.record + ' ' + t.dataset.state)"
)


def test_corrections_stay_on_their_page_and_stay_undoable(
    pg_url: str,
    image_host,
    chromium: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    # The map queue, two items a page: /9001/c and /9002/d (margins .02), then /9002/e, ...
    db = build_review_db(pg_url, image_host)
    server = serve(db, tmp_path)
    browser = DevTools(chromium, tmp_path / "profile")

    def loaded(tab: str, query: str) -> None:
        until(
            browser,
            f"the page {query}",
            lambda: (
                read(browser, tab, "location.search") == query
                and read(browser, tab, "document.readyState") == "complete"
            ),
        )

    try:
        tab, _ = browser.load(f"{server.url}/queue?label=map&limit=2", 1280)
        browser.evaluate(tab, "localStorage.setItem('enrichReviewer', 'ada'), true")
        browser.evaluate(tab, "document.getElementById('reviewer').value = 'ada', true")
        assert read(browser, tab, STATES) == ["/9001/c pending", "/9002/d pending"]

        # Reject the first, then "select all, accept the rest": the reject stands.
        press(browser, tab, "r")
        until(browser, "the reject", lambda: len(server.decisions()) == 1)
        until(browser, "its tile", lambda: read(browser, tab, STATES)[0] == "/9001/c reject")
        press(browser, tab, "*")
        assert read(browser, tab, "document.getElementById('selected-count').innerText") == (
            "1 selected"
        )
        press(browser, tab, "a")
        until(browser, "the accept", lambda: len(server.decisions()) == 2)
        assert server.decisions() == [
            ("/9001/c", "map", "reject", "ada", False),
            ("/9002/d", "map", "accept", "ada", False),
        ]

        # Nothing pending: the next page opens, and "u" there takes back the accept.
        until(
            browser, "the next page", lambda: "after=" in str(read(browser, tab, "location.search"))
        )
        until(browser, "its tiles", lambda: read(browser, tab, "document.readyState") == "complete")
        assert read(browser, tab, STATES) == ["/9002/e pending", "/9001/b pending"]
        assert read(browser, tab, "document.getElementById('undo').disabled") is False
        press(browser, tab, "u")
        until(browser, "the take-back", lambda: len(server.decisions()) == 1)
        assert server.decisions() == [("/9001/c", "map", "reject", "ada", False)]
        assert read(browser, tab, STATES) == ["/9002/e pending", "/9001/b pending"]

        # A page of decided items is for changing them: it stays after each decision.
        browser.evaluate(tab, "location.href = '/queue?label=map&state=reviewed&limit=2'")
        loaded(tab, "?label=map&state=reviewed&limit=2")
        assert read(browser, tab, STATES) == ["/9001/c reject"]
        browser.evaluate(tab, "window.stayed = true")  # gone if the page is loaded again
        press(browser, tab, "a")  # c's map is below its threshold: added
        until(browser, "the change", lambda: server.decisions()[-1][2] == "add")
        until(browser, "the tile", lambda: read(browser, tab, STATES) == ["/9001/c add"])
        time.sleep(1)  # a page turning itself would have begun by now
        assert read(browser, tab, "window.stayed") is True
        press(browser, tab, "u")
        until(browser, "the undo", lambda: server.decisions()[-1][2] == "reject")
        until(browser, "the tile back", lambda: read(browser, tab, STATES) == ["/9001/c reject"])

        # Changed in the record view, then Back: the grid shows what is stored now. (Where
        # the browser keeps the page in its back/forward cache, the page loads itself again;
        # this headless Chromium loads it again anyway.)
        press(browser, tab, "Enter")
        until(
            browser, "the record view", lambda: read(browser, tab, "location.pathname") == "/record"
        )
        until(browser, "its rows", lambda: read(browser, tab, "document.readyState") == "complete")
        press(browser, tab, "3")  # the third class, map: on
        until(browser, "the toggle", lambda: server.decisions()[-1][2] == "add")
        browser.evaluate(tab, "history.back(), true")
        loaded(tab, "?label=map&state=reviewed&limit=2")
        until(browser, "the stored state", lambda: read(browser, tab, STATES) == ["/9001/c add"])
        for event in ("Runtime.exceptionThrown", "Network.loadingFailed"):
            assert browser.seen(event, tab) == []
    finally:
        browser.close()
        server.close()
        db.dispose()
