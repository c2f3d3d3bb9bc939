"""The audit sample's progress in Chromium: the page counts the labels still to audit, as its
total does, and today's audit decisions; not the whole queue's pending items, which an
auditor is not working through (and which once sent a finished audit on to an empty page)."""

from __future__ import annotations

from pathlib import Path

import requests

from tests.test_report import DevTools, chromium  # noqa: F401 (the fixture)
from tests.test_review_api import ReviewServer, app_server, review_db  # noqa: F401 (fixtures)
from tests.test_review_browser import press, until
from tests.test_review_browser_session import read
from tests.test_review_filters_browser import mark_page, new_page

PROGRESS = "document.getElementById('progress').innerText"
TOAST = "document.getElementById('toast').innerText"
# The labels above threshold of tests.test_review_api's records: what the audit samples.
LABELLED = 8


def test_the_audit_page_counts_the_sample_it_draws_from(
    app_server: ReviewServer,  # noqa: F811
    chromium: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    browser = DevTools(chromium, tmp_path / "profile")
    try:
        tab, _ = browser.load(f"{app_server.url}/queue?audit=1&limit=4", 1280)
        browser.evaluate(tab, "localStorage.setItem('enrichReviewer', 'ada'), true")
        browser.evaluate(tab, "document.getElementById('reviewer').value = 'ada', true")
        assert read(browser, tab, "document.getElementById('total').innerText") == str(LABELLED)
        assert read(browser, tab, PROGRESS) == f"{LABELLED} to audit · 0 audited today"

        # Half of the sample audited: the counts move by it, and a new draw opens.
        mark_page(browser, tab)
        press(browser, tab, "*")
        press(browser, tab, "a")
        until(browser, "four audit decisions", lambda: len(app_server.decisions()) == 4)
        new_page(browser, tab, "the next draw")
        assert read(browser, tab, PROGRESS) == "4 to audit · 4 audited today"
        assert read(browser, tab, "document.querySelectorAll('.tile').length") == 4

        # The rest: nothing is left to audit, so the page says so and stays, though the
        # queue still has pending items (those below threshold).
        browser.evaluate(tab, "window.stayed = true")
        press(browser, tab, "*")
        press(browser, tab, "a")
        until(browser, "the whole sample audited", lambda: len(app_server.decisions()) == 8)
        until(
            browser,
            "the counts",
            lambda: read(browser, tab, "document.getElementById('pending').innerText") == "0",
        )
        until(browser, "the word", lambda: "Nothing left" in str(read(browser, tab, TOAST)))
        assert read(browser, tab, "window.stayed") is True
        assert read(browser, tab, PROGRESS) == "0 to audit · 8 audited today"
        assert all(audit for *_, audit in app_server.decisions())
        assert browser.seen("Runtime.exceptionThrown", tab) == []
    finally:
        browser.close()

    # The queue's own count is of its pending items, as before; the API's too.
    queue = requests.get(f"{app_server.url}/api/progress", timeout=10).json()
    audit = requests.get(f"{app_server.url}/api/progress", params={"audit": 1}, timeout=10).json()
    assert (queue["pending"], queue["decided_today"]) == (15 - LABELLED, LABELLED)
    assert (audit["pending"], audit["decided_today"]) == (0, LABELLED)


def test_labels_decided_in_the_queue_are_audited_afresh(
    app_server: ReviewServer,  # noqa: F811
    chromium: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Carol accepted every label in the queue; the auditor's draw still shows each as to
    audit (not carol's verdict), and the keys audit them all: the page skipped them and
    turned with half its draw unaudited, and an audit decision on one was refused."""
    for item in requests.get(f"{app_server.url}/api/queue?side=above", timeout=10).json()["items"]:
        body = {
            "record_id": item["record_id"],
            "label_key": item["label_key"],
            "model_version": item["model_version"],
            "decision": "accept",
            "reviewer": "carol",
        }
        assert requests.post(f"{app_server.url}/api/decisions", json=body, timeout=10).ok
    browser = DevTools(chromium, tmp_path / "profile")
    try:
        tab, _ = browser.load(f"{app_server.url}/queue?audit=1&limit={LABELLED}", 1280)
        browser.evaluate(tab, "localStorage.setItem('enrichReviewer', 'dora'), true")
        browser.evaluate(tab, "document.getElementById('reviewer').value = 'dora', true")
        states = "Array.from(document.querySelectorAll('.tile')).map((t) => t.dataset.state)"
        assert read(browser, tab, states) == ["pending"] * LABELLED
        for _ in range(LABELLED):
            press(browser, tab, "r")
        until(
            browser,
            "every label audited",
            lambda: sum(audit for *_, audit in app_server.decisions()) == LABELLED,
        )
        assert "Not saved" not in str(read(browser, tab, TOAST))
        assert browser.seen("Runtime.exceptionThrown", tab) == []
    finally:
        browser.close()
    audited = [row for row in app_server.decisions() if row[4]]
    assert {(decision, reviewer) for _, _, decision, reviewer, _ in audited} == {("reject", "dora")}
