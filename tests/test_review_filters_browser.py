"""The review queue's filters and the record page as a curator meets them, in a real headless
Chromium: the disagreement filter (`disagree=A,B`, handed out by `enrich model compare
--disagreements`) is said on the page, survives the form's Show button, the Enter key, paging
and the keys, and can be cleared; and at 1280 px nothing is wider than the window, even with
twenty classes of long names."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest
import requests

from enrichment.sources.records_file import Record
from enrichment.store.database import Database
from enrichment.store.schema import Outcome
from enrichment.store.writes import (
    LabelScore,
    RecordOutcome,
    register_model,
    save_outcomes,
    upsert_records,
)
from tests.conftest import image_bytes
from tests.test_report import DevTools, chromium  # noqa: F401 (the fixture)
from tests.test_review_api import (
    KEYS,
    MODEL_LABELS,
    SCORES,
    THRESHOLDS,
    VERSION,
    ReviewServer,
    build_review_db,
    scored_outcome,
    serve,
)
from tests.test_review_browser import press, until
from tests.test_review_browser_session import press_enter, read, type_text

NEWER = "pilot@dddddddddddd"
# The newer version's scores for the same records; against SCORES (same thresholds) it drops
# /9001/a's drawing (.45 -> .30), adds /9001/c's map (.58 -> .65) and drops /9002/d's
# photograph (.75 -> .40), and agrees on the other twelve labels.
NEWER_SCORES = {
    "/9001/a": [0.85, 0.30, 0.10],
    "/9001/b": [0.55, 0.25, 0.90],
    "/9001/c": [0.35, 0.45, 0.65],
    "/9002/d": [0.40, 0.72, 0.70],
    "/9002/e": [0.48, 0.10, 0.20],
}
TILES = (
    "Array.from(document.querySelectorAll('.tile')).map(t => [t.dataset.record, t.dataset.label])"
)


def disagreements() -> set[tuple[str, str]]:
    """By hand from the two score tables: the (record, class) one version labels, not both."""
    return {
        (record, key)
        for record, scores in SCORES.items()
        for key, old, new, threshold in zip(
            KEYS, scores, NEWER_SCORES[record], THRESHOLDS, strict=True
        )
        if (old >= threshold) != (new >= threshold)
    }


def classify_again(db: Database, image_host) -> None:
    """The newer version's results for the five records of `build_review_db`."""
    outcomes = [
        scored_outcome(record_id, scores, image_host.url(f"/review{record_id}.png"))
        for record_id, scores in NEWER_SCORES.items()
    ]
    with db.transaction() as session:
        register_model(session, NEWER, "pilot", "resnet18", MODEL_LABELS, list(THRESHOLDS))
    with db.transaction() as session:
        save_outcomes(session, None, NEWER, outcomes)


@pytest.fixture
def two_versions(pg_url: str, image_host, tmp_path: Path) -> Iterator[ReviewServer]:
    db = build_review_db(pg_url, image_host)
    classify_again(db, image_host)
    server = serve(db, tmp_path)
    yield server
    server.close()
    db.dispose()


def tiles(browser: DevTools, tab: str) -> set[tuple[str, str]]:
    return {(record, key) for record, key in browser.evaluate(tab, TILES)}


def new_page(browser: DevTools, tab: str, what: str) -> None:
    """Wait for the document that replaces the one marked by `mark_page`, fully loaded."""
    until(
        browser,
        what,
        lambda: (
            read(browser, tab, "!window.seenBefore && document.readyState === 'complete'") is True
        ),
    )


def mark_page(browser: DevTools, tab: str) -> None:
    browser.evaluate(tab, "window.seenBefore = true")


def click(browser: DevTools, tab: str, selector: str) -> None:
    """A left click in the middle of the element (of its first line, for a link that wraps),
    as a mouse makes it."""
    box = browser.evaluate(
        tab,
        f"(() => {{ const e = document.querySelector({selector!r}); e.scrollIntoView();"
        " const r = e.getClientRects()[0];"
        " return [r.x + r.width / 2, r.y + r.height / 2]; })()",
    )
    x, y = box
    for kind in ("mousePressed", "mouseReleased"):
        browser.call(
            "Input.dispatchMouseEvent", tab, type=kind, x=x, y=y, button="left", clickCount=1
        )


def query(browser: DevTools, tab: str, name: str) -> list[str]:
    """The values of one parameter in the page's address."""
    return browser.evaluate(tab, f"new URLSearchParams(location.search).getAll({name!r})")


def notice(browser: DevTools, tab: str) -> str | None:
    """The disagreement notice's text where it is shown (on screen, not hidden), else None."""
    return browser.evaluate(
        tab,
        "(() => { const n = document.getElementById('disagree-notice');"
        " if (!n || !n.checkVisibility()) return null;"
        " const r = n.getBoundingClientRect();"
        " return r.top >= 0 && r.bottom <= innerHeight ? n.innerText : 'off screen'; })()",
    )


def test_the_disagreement_filter_is_shown_kept_and_cleared(
    two_versions: ReviewServer,
    chromium: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    server, wanted = two_versions, disagreements()
    assert len(wanted) == 3  # and twelve labels the versions agree on
    everything = {(record, key) for record in SCORES for key in KEYS}
    browser = DevTools(chromium, tmp_path / "profile")
    try:
        # The link `enrich model compare --disagreements` prints: the app's root.
        tab, _ = browser.load(f"{server.url}/?disagree={VERSION},{NEWER}", 1280)
        assert browser.evaluate(tab, "location.pathname") == "/queue"
        shown = notice(browser, tab)
        assert shown is not None and VERSION in shown and NEWER in shown, shown
        assert tiles(browser, tab) == wanted
        assert browser.evaluate(tab, "document.getElementById('total').innerText") == "3"

        # The form's Show button, clicked: the filter stays, the same three items.
        mark_page(browser, tab)
        click(browser, tab, ".filters button[type=submit]")
        new_page(browser, tab, "the queue after Show")
        assert query(browser, tab, "disagree") == [f"{VERSION},{NEWER}"]
        assert VERSION in str(notice(browser, tab))
        assert tiles(browser, tab) == wanted

        # Two datasets typed into the box, then Enter: both datasets, still the disagreements.
        browser.evaluate(tab, "document.querySelector('input[name=dataset]').focus(), true")
        type_text(browser, tab, "9001, 9002")
        mark_page(browser, tab)
        press_enter(browser, tab)
        new_page(browser, tab, "the queue after Enter")
        assert NEWER in str(notice(browser, tab))
        assert tiles(browser, tab) == wanted
        assert browser.evaluate(tab, "document.querySelector('input[name=dataset]').value") == (
            "9001, 9002"
        )

        # Cleared: the whole queue of those datasets, every pending label, and no notice.
        mark_page(browser, tab)
        click(browser, tab, "#clear-disagree")
        new_page(browser, tab, "the whole queue")
        assert query(browser, tab, "disagree") == []
        assert query(browser, tab, "dataset") == ["9001, 9002"]
        assert notice(browser, tab) is None
        assert tiles(browser, tab) == everything

        # Two a page, decided with the keys: the next page opens by itself, still filtered.
        paged, _ = browser.load(f"{server.url}/queue?disagree={VERSION},{NEWER}&limit=2", 1280)
        browser.evaluate(paged, "document.getElementById('reviewer').value = 'ada', true")
        first = tiles(browser, paged)
        assert len(first) == 2 and first < wanted
        mark_page(browser, paged)
        press(browser, paged, "r")
        until(browser, "the reject", lambda: len(server.decisions()) == 1)
        pending = "document.getElementById('pending').innerText"
        until(browser, "the pending count", lambda: read(browser, paged, pending) == "2")
        press(browser, paged, "a")
        until(browser, "the accept", lambda: len(server.decisions()) == 2)
        new_page(browser, paged, "the second page")
        assert query(browser, paged, "disagree") == [f"{VERSION},{NEWER}"]
        assert query(browser, paged, "limit") == ["2"] and query(browser, paged, "after")
        assert tiles(browser, paged) == wanted - first
        assert NEWER in str(notice(browser, paged))
        assert {(record, key) for record, key, *_ in server.decisions()} == first

        for session in (tab, paged):
            for event in ("Runtime.exceptionThrown", "Network.loadingFailed"):
                assert browser.seen(event, session) == []
    finally:
        browser.close()

    # A version nobody registered: the page says which, as before.
    refused = requests.get(
        f"{server.url}/queue", params={"disagree": f"{VERSION},pilot@nothing"}, timeout=10
    )
    assert refused.status_code == 400
    assert "unknown model version pilot@nothing" in refused.text


def test_every_filter_survives_the_show_button(
    two_versions: ReviewServer,
    chromium: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Two classes and two datasets (as a link names them, each repeated), a model, a state,
    a side, a score range and a page size: Show, pressed without a change, shows the same
    queue, not a wider one."""
    start = (
        "/queue?label=photograph&label=map&dataset=9001&dataset=9002"
        f"&model_version={NEWER}&state=any&side=above&min_score=0.05&max_score=0.99&limit=3"
    )
    browser = DevTools(chromium, tmp_path / "profile")
    try:
        tab, _ = browser.load(two_versions.url + start, 1280)
        before = browser.evaluate(tab, TILES)
        total = browser.evaluate(tab, "document.getElementById('total').innerText")
        assert len(before) == 3 and total == "5"  # NEWER's photograph and map labels
        heading = browser.evaluate(tab, "document.querySelector('h1').innerText")
        assert heading == "Photograph, map: most uncertain first"  # not "All classes"
        mark_page(browser, tab)
        click(browser, tab, ".filters button[type=submit]")
        new_page(browser, tab, "the queue after Show")
        assert sorted(query(browser, tab, "label")) == ["map", "photograph"]
        assert query(browser, tab, "dataset") == ["9001, 9002"]  # one box, both datasets
        kept = {"model_version": NEWER, "state": "any", "side": "above", "limit": "3"}
        kept |= {"min_score": "0.05", "max_score": "0.99"}
        assert {name: query(browser, tab, name) for name in kept} == {
            name: [value] for name, value in kept.items()
        }
        assert browser.evaluate(tab, TILES) == before
        assert browser.evaluate(tab, "document.getElementById('total').innerText") == total
    finally:
        browser.close()


# Twenty classes whose names and keys are long: words, and unbroken URIs.
WIDE = "wide@eeeeeeeeeeee"
WIDE_LABELS = [
    {
        "key": f"aat_3000{n:05d}_{'architectural_elevation_drawing' if n % 2 else 'photo'}",
        "label": (
            f"http://vocab.getty.edu/page/aat/3000{n:05d}/architectural-elevation-drawing"
            if n % 3 == 0
            else f"Architectural drawing of a facade, elevation and cross-section, type {n}"
        ),
        "concept": f"http://vocab.getty.edu/aat/3000{n:05d}/architectural-elevation-drawing",
    }
    for n in range(20)
]


@pytest.fixture
def wide_server(pg_url: str, image_host, tmp_path: Path) -> Iterator[tuple[ReviewServer, str]]:
    """Three records of a twenty-class model with long names; yields the server and a record."""
    db = Database(pg_url)
    db.upgrade()
    image = image_host.add("/wide/one.png", image_bytes((200, 120, 40), "circle"))
    records = [
        Record(
            f"/9301/{'a_long_record_identifier_without_any_break_' * 3}{n}",
            "9301",
            f"http://data.europeana.eu/item/9301/item_{n}",
            image,
            "Museum of Long Names " * 6,
            title="A title that goes on " * 12 + f"IMG_{'0123456789' * 10}_{n}",
        )
        for n in range(3)
    ]
    thresholds = [0.5] * len(WIDE_LABELS)
    outcomes = []
    for number, record in enumerate(records):
        scores = [((number * 7 + index * 13) % 100) / 100 for index in range(len(WIDE_LABELS))]
        labels = [
            LabelScore(label["key"], label["concept"], score)
            for label, score in zip(WIDE_LABELS, scores, strict=True)
            if score >= 0.5
        ]
        outcomes.append(
            RecordOutcome(
                record.id, Outcome.LABELLED, scores=scores, labels=labels, image_url=image
            )
        )
    with db.transaction() as session:
        register_model(session, WIDE, "wide", "resnet18", WIDE_LABELS, thresholds)
        upsert_records(session, records)
    with db.transaction() as session:
        save_outcomes(session, None, WIDE, outcomes)
    server = serve(db, tmp_path)
    yield server, records[0].id
    server.close()
    db.dispose()


def test_nothing_is_wider_than_the_window(
    wide_server: tuple[ReviewServer, str],
    chromium: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    """At 1280x800 the record page (twenty classes, long names, a long record id) and the
    queue (long class names in the tiles, the form and the question) fit the window: the
    class table wraps (or, narrower, scrolls inside its own box), never the page."""
    server, record_id = wide_server
    longest = max(WIDE_LABELS, key=lambda label: len(label["key"]))["key"]
    pages = {
        "record": f"/record?{urlencode({'id': record_id, 'model_version': WIDE})}",
        "queue": "/queue",
        "one class": f"/queue?label={longest}",
    }
    measure = (
        "[document.scrollingElement.scrollWidth, innerWidth,"
        " Array.from(document.querySelectorAll('body *')).filter(e => e.checkVisibility())"
        ".filter(e => e.getBoundingClientRect().right > innerWidth + 0.5)"
        ".map(e => e.tagName + '.' + e.className).slice(0, 5)]"
    )
    browser = DevTools(chromium, tmp_path / "profile")
    try:
        for name, path in pages.items():
            tab, _ = browser.load(server.url + path, 1280)
            if name == "record":
                assert browser.evaluate(tab, "document.querySelectorAll('.class-row').length") == 20
            else:
                assert browser.evaluate(tab, "document.querySelectorAll('.tile').length") > 0
            width, window, sticking_out = browser.evaluate(tab, measure)
            assert window == 1280, name
            assert (width, sticking_out) == (window, []), name
            # Nor wider than its own box: a long class name stays in its tile, and at this width
            # the class table needs no scrolling either.
            overflowing = browser.evaluate(
                tab,
                "Array.from(document.querySelectorAll('.tile, .table-box, .class-row td'))"
                ".filter(e => e.scrollWidth > e.clientWidth).length",
            )
            assert overflowing == 0, name
    finally:
        browser.close()
