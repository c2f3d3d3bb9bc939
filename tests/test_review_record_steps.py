"""The record view's "n" and "p" in Chromium: the next and previous records of the queue the
curator came from, whatever characters a provider's record id holds."""

from __future__ import annotations

import json
from pathlib import Path

from enrichment.sources.records_file import Record
from enrichment.store.writes import save_outcomes, upsert_records
from tests.conftest import image_bytes
from tests.test_report import DevTools, chromium  # noqa: F401 (the fixture)
from tests.test_review_api import (  # noqa: F401 (fixtures)
    VERSION,
    ReviewServer,
    app_server,
    review_db,
    scored_outcome,
)
from tests.test_review_browser import press
from tests.test_review_browser_session import read
from tests.test_review_filters_browser import mark_page, new_page

ODD_ID = "/9001/o'brien&co (1)"  # an apostrophe, an ampersand, a space, parentheses


def test_next_and_previous_record_from_a_record_whose_id_has_an_apostrophe(
    app_server: ReviewServer,  # noqa: F811
    chromium: str,  # noqa: F811
    image_host,
    tmp_path: Path,
) -> None:
    image = image_host.add("/review/odd.png", image_bytes((90, 90, 90), "circle"))
    with app_server.db.transaction() as session:
        upsert_records(session, [Record(ODD_ID, "9001", "", image, "Museum", title="Odd")])
    with app_server.db.transaction() as session:
        save_outcomes(session, None, VERSION, [scored_outcome(ODD_ID, [0.55, 0.41, 0.1], image)])
    browser = DevTools(chromium, tmp_path / "profile")
    try:
        tab, _ = browser.load(f"{app_server.url}/queue?dataset=9001&state=any", 1280)
        records = browser.evaluate(tab, "JSON.parse(sessionStorage.getItem('enrichReviewRecords'))")
        odd = browser.evaluate(
            tab,
            "Array.from(document.querySelectorAll('.tile'))"
            f".find((t) => t.dataset.record === {ODD_ID!r}).dataset.recordUrl",
        )
        position = records.index(odd)
        assert 0 < position < len(records) - 1, records  # it has a record on both sides
        for key, wanted in (("n", records[position + 1]), ("p", records[position - 1])):
            mark_page(browser, tab)
            browser.evaluate(tab, f"location.href = {odd!r}, true")
            new_page(browser, tab, "the odd record")
            mark_page(browser, tab)
            press(browser, tab, key)
            new_page(browser, tab, f"the record after {key!r}")
            shown = read(browser, tab, "location.href")
            assert shown == read(browser, tab, f"new URL({json.dumps(wanted)}, location.href).href")
        assert browser.seen("Runtime.exceptionThrown", tab) == []
    finally:
        browser.close()
