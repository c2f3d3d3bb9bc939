"""The review pages in a real headless Chromium (Debian's package, over the DevTools protocol,
as the report test drives it): the queue renders with its images, keyboard accept/reject and
undo change the stored decisions, the grid's bulk accept works, and the page requests nothing
outside the app's own origin."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image

from enrichment.store.database import Database
from tests.test_report import DevTools, chromium  # noqa: F401 (the fixture)
from tests.test_review_api import SCORES, ReviewServer, build_review_db, margin_order, serve


@pytest.fixture
def app_server(pg_url: str, image_host, tmp_path: Path) -> Iterator[ReviewServer]:
    db: Database = build_review_db(pg_url, image_host)
    server = serve(db, tmp_path)
    yield server
    server.close()
    db.dispose()


def press(browser: DevTools, session: str, key: str) -> None:
    code = {"Enter": "Enter"}.get(key, f"Key{key.upper()}" if key.isalpha() else f"Digit{key}")
    for kind in ("keyDown", "keyUp"):
        browser.call(
            "Input.dispatchKeyEvent",
            session,
            type=kind,
            key=key,
            code=code,
            text=key if kind == "keyDown" and len(key) == 1 else "",
            windowsVirtualKeyCode=ord(key.upper()) if len(key) == 1 else 13,
        )


def until(browser: DevTools, what: str, condition: Callable[[], bool], seconds: float = 60) -> None:
    """Wait for `condition`, reading the browser's events meanwhile."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        with contextlib.suppress(AssertionError):  # no event within the slice: look again
            browser.receive(min(deadline, time.monotonic() + 0.2))


def test_review_in_headless_chromium(
    app_server: ReviewServer,
    chromium: str,  # noqa: F811
    image_host,
    tmp_path: Path,
) -> None:
    order = margin_order(SCORES)
    fetched_before = len(image_host.requests)
    browser = DevTools(chromium, tmp_path / "profile")
    try:
        session, _ = browser.load(f"{app_server.url}/queue", 1280)
        browser.evaluate(
            session,
            "(() => { const i = document.getElementById('reviewer'); i.value = 'ada';"
            " i.dispatchEvent(new Event('change')); window.scrollTo(0, 1e6); return true; })()",
        )
        until(
            browser,
            "every thumbnail",
            lambda: browser.evaluate(
                session,
                "Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)",
            ),
        )
        assert browser.evaluate(session, "document.images.length") == len(order)
        tiles = browser.evaluate(
            session,
            "Array.from(document.querySelectorAll('.tile'))"
            ".map(t => [t.dataset.record, t.dataset.label])",
        )
        assert [tuple(tile) for tile in tiles] == order
        assert len(image_host.requests) == fetched_before + len(SCORES)  # once per image

        # Keyboard: accept the first (labelled) tile, reject the next, undo the reject.
        press(browser, session, "a")
        until(browser, "the accept", lambda: len(app_server.decisions()) == 1)
        press(browser, session, "r")
        until(browser, "the reject", lambda: len(app_server.decisions()) == 2)
        assert app_server.decisions() == [
            (*order[0], "accept", "ada", False),
            (*order[1], "reject", "ada", False),
        ]
        press(browser, session, "u")
        until(browser, "the undo", lambda: len(app_server.decisions()) == 1)
        until(
            browser,
            "the tiles' states",
            lambda: (
                browser.evaluate(
                    session,
                    "Array.from(document.querySelectorAll('.tile')).slice(0, 2)"
                    ".map(t => t.dataset.state).join()",
                )
                == "accept,pending"
            ),
        )

        # The grid: select two tiles with the mouse, accept them with the bulk button.
        browser.evaluate(
            session,
            "(() => { const t = document.querySelectorAll('.tile'); t[2].click(); t[3].click();"
            " document.getElementById('accept-selected').click(); return true; })()",
        )
        until(browser, "the bulk accept", lambda: len(app_server.decisions()) == 3)
        assert app_server.decisions()[1:] == [
            (*order[2], "accept", "ada", False),  # /9001/b photograph: the model's label
            (*order[3], "add", "ada", False),  # /9001/c map, below threshold: added
        ]
        reviewed, screenshot = browser.load(f"{app_server.url}/queue?state=any", 1280)

        # The record view: key 1 toggles the first class (photograph, the model's label).
        record, _ = browser.load(
            f"{app_server.url}/record?id=/9001/a&model_version=pilot@cccccccccccc", 1280
        )
        browser.evaluate(record, "document.getElementById('reviewer').value = 'ada'")
        press(browser, record, "1")
        until(browser, "the toggle", lambda: len(app_server.decisions()) == 4)
        assert app_server.decisions()[-1] == ("/9001/a", "photograph", "reject", "ada", False)

        tabs = (session, reviewed, record)
        every = [e for tab in tabs for e in browser.seen("Network.requestWillBeSent", tab)]
        urls = [event["request"]["url"] for event in every]
        assert any("/api/decisions" in url for url in urls)
        assert any("/api/undo" in url for url in urls)
        assert all(url.startswith(app_server.url + "/") for url in urls), urls
        for tab in tabs:
            assert browser.seen("Network.loadingFailed", tab) == []
            assert browser.seen("Runtime.exceptionThrown", tab) == []
            assert [e["entry"]["text"] for e in browser.seen("Log.entryAdded", tab)] == []
    finally:
        browser.close()
    path = tmp_path / "review.png"
    path.write_bytes(screenshot)
    shot = Image.open(path)
    colours = shot.convert("RGB").resize((64, 64)).getcolors(64 * 64)
    assert colours is not None and len(colours) > 20, "a blank page"
    if os.environ.get("REVIEW_SCREENSHOT"):  # a look at the page, on request
        shot.save(os.environ["REVIEW_SCREENSHOT"], optimize=True)
