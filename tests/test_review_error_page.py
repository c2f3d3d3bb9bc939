"""A page asked with a wrong parameter, in Chromium: the 400 page says which parameter was
wrong, and its way back keeps the curator's other filters (class, dataset, state, ...), so a
typo in one does not cost all of them; from a record, it leads back to the queue it came from."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_report import DevTools, chromium  # noqa: F401 (the fixture)
from tests.test_review_api import ReviewServer, app_server, review_db  # noqa: F401 (fixtures)
from tests.test_review_browser import until
from tests.test_review_browser_session import read
from tests.test_review_filters_browser import click, mark_page, new_page

FORM = (
    "[Array.from(document.querySelector('select[name=label]').selectedOptions)"
    ".map(o => o.value), document.querySelector('input[name=dataset]').value,"
    " document.querySelector('select[name=state]').value,"
    " document.querySelector('select[name=side]').value]"
)


@pytest.mark.parametrize(
    ("query", "wrong", "kept"),
    [
        (
            "label=map&dataset=9001&state=any&side=above&run=abc",
            "run",
            "?label=map&dataset=9001&side=above&state=any",
        ),
        (
            "label=map&label=unicorn&dataset=9001&state=any&side=above",
            "label",
            "?label=map&dataset=9001&side=above&state=any",
        ),
        (
            "label=map&dataset=9001&state=maybe&side=above&min_score=2",
            "state",
            "?label=map&dataset=9001&side=above",
        ),
    ],
)
def test_the_error_page_leads_back_with_the_other_filters(
    app_server: ReviewServer,  # noqa: F811
    chromium: str,  # noqa: F811
    tmp_path: Path,
    query: str,
    wrong: str,
    kept: str,
) -> None:
    browser = DevTools(chromium, tmp_path / "profile")
    try:
        tab, _ = browser.load(f"{app_server.url}/queue?{query}", 1280)
        responses = browser.seen("Network.responseReceived", tab)
        assert responses[0]["response"]["status"] == 400
        assert read(browser, tab, "document.getElementById('wrong-field').innerText") == wrong
        mark_page(browser, tab)
        click(browser, tab, "#way-back")
        new_page(browser, tab, "the queue")
        assert read(browser, tab, "location.search") == kept
        expected = ["map"], "9001", "any" if "state=any" in kept else "pending", "above"
        assert read(browser, tab, FORM) == list(expected)
        assert read(browser, tab, "document.querySelectorAll('.tile').length") > 0
        assert browser.seen("Runtime.exceptionThrown", tab) == []
    finally:
        browser.close()


def test_an_error_away_from_the_queue_leads_back_to_the_queue_it_came_from(
    app_server: ReviewServer,  # noqa: F811
    chromium: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    queue = "/queue?label=map&dataset=9002&state=any"
    browser = DevTools(chromium, tmp_path / "profile")
    try:
        tab, _ = browser.load(app_server.url + queue, 1280)
        mark_page(browser, tab)
        browser.evaluate(tab, "location.href = '/record?id=/9002/nothing', true")
        new_page(browser, tab, "the error page")
        assert "no classified result" in str(
            read(browser, tab, "document.getElementById('error-message').innerText")
        )
        until(
            browser,
            "the way back",
            lambda: (
                read(browser, tab, "document.getElementById('way-back').href")
                == app_server.url + queue
            ),
        )
    finally:
        browser.close()
