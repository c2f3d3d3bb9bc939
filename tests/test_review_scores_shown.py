"""The review pages write a score and its class threshold so that the side of the threshold
the score is on can be read from them: the queue's tiles ("score / threshold") and the
record view's rows, rendered by the app (a test client: this is template output). They were
written to 2 decimals on the tiles and 3 on the record, which showed 0.4349 against 0.435
as "0.43 / 0.43" and 0.4453 against 0.4454 as "0.45 / 0.45"."""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from html import unescape
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from enrichment.config import Settings
from enrichment.review.app import create_app
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
from enrichment.thresholds import score_and_threshold
from tests.conftest import VOCABULARY

KEYS = ("photograph", "drawing", "map")
# 0.435 and calibration's 4-decimal 0.4454; the map's 0.5 is written "0.5".
THRESHOLDS = (0.435, 0.4454, 0.5)
VERSION = "pilot@dddddddddddd"
SCORES = {
    "/7001/a": [0.4349, 0.4453, 0.5],  # just below, just below, at
    "/7001/b": [0.43496, 0.44545, 0.49999],  # below, but equal to 4 decimals; above; below
    "/7001/c": [0.435, 0.9, 0.05],  # at; far above; far below
}
# What each class's score and threshold read as, (record, class) -> "score / threshold".
SHOWN = {
    ("/7001/a", "photograph"): "0.4349 / 0.435",
    ("/7001/a", "drawing"): "0.4453 / 0.4454",
    ("/7001/a", "map"): "0.5000 / 0.5",
    ("/7001/b", "photograph"): "0.43496 / 0.435",
    ("/7001/b", "drawing"): "0.4455 / 0.4454",  # above: 0.44545 rounds up, never below
    ("/7001/b", "map"): "0.49999 / 0.5",
    ("/7001/c", "photograph"): "0.4350 / 0.435",
    ("/7001/c", "drawing"): "0.9000 / 0.4454",
    ("/7001/c", "map"): "0.0500 / 0.5",
}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[FlaskClient]:
    db = Database(f"sqlite:///{tmp_path}/shown.sqlite3")
    db.upgrade()
    labels = [{"key": key, "label": key.title(), "concept": VOCABULARY[key]} for key in KEYS]
    with db.transaction() as session:
        register_model(session, VERSION, "pilot", "resnet18", labels, list(THRESHOLDS))
        upsert_records(
            session,
            [
                Record(rid, "7001", f"http://data.europeana.eu/item{rid}", None, "M")
                for rid in SCORES
            ],
        )
    with db.transaction() as session:
        save_outcomes(
            session, None, VERSION, [outcome(rid, scores) for rid, scores in SCORES.items()]
        )
    app = create_app(db, Settings(database_url="unused"), tmp_path / "cache")
    with app.test_client() as test_client:
        yield test_client
    db.dispose()


def outcome(record_id: str, scores: list[float]) -> RecordOutcome:
    """A record's outcome: a label for each class at or above its threshold."""
    labels = [
        LabelScore(key, VOCABULARY[key], score)
        for key, score, threshold in zip(KEYS, scores, THRESHOLDS, strict=True)
        if score >= threshold
    ]
    status = Outcome.LABELLED if labels else Outcome.BELOW_THRESHOLD
    return RecordOutcome(record_id, status, scores=scores, labels=labels, image_url=None)


def tiles(html: str) -> dict[tuple[str, str], str]:
    """(record, class) -> the tile's "score / threshold", as the page reads."""
    found = {}
    for tile in html.split('<li class="tile')[1:]:
        record = re.search(r'data-record="([^"]*)"', tile)
        label = re.search(r'data-label="([^"]*)"', tile)
        score = re.search(r'<span class="score"[^>]*>([^<]*)</span>', tile)
        assert record and label and score, tile
        found[(unescape(record[1]), label[1])] = " ".join(unescape(score[1]).split())
    return found


def rows(html: str) -> dict[str, str]:
    """class -> the record view's "score / threshold" cells."""
    found = {}
    for row in html.split('<tr class="class-row')[1:]:
        label = re.search(r'data-label="([^"]*)"', row)
        cells = re.findall(r'<td class="num">([^<]*)</td>', row)
        assert label and len(cells) == 2, row
        found[label[1]] = " / ".join(cells)
    return found


def on_its_side(shown: str, score: float, threshold: float) -> bool:
    """What a reader concludes from the numbers shown is what the numbers are."""
    score_text, threshold_text = shown.split(" / ")
    written = float(score_text), float(threshold_text)
    return written[0] < written[1] if score < threshold else written[0] >= written[1]


def test_no_score_is_shown_on_the_wrong_side_of_its_threshold(client: FlaskClient) -> None:
    page = client.get("/queue?state=any&limit=100")
    assert page.status_code == 200
    shown = tiles(page.get_data(as_text=True))
    assert shown == SHOWN
    for record_id, scores in SCORES.items():
        record = client.get(f"/record?id={record_id}&model_version={VERSION}")
        assert record.status_code == 200
        assert rows(record.get_data(as_text=True)) == {key: SHOWN[(record_id, key)] for key in KEYS}
        for key, score, threshold in zip(KEYS, scores, THRESHOLDS, strict=True):
            assert on_its_side(shown[(record_id, key)], score, threshold), (record_id, key)


def test_the_rule_holds_for_any_score_beside_its_threshold() -> None:
    """Scores a hair below, at and above thresholds of 2 to 6 decimals, and a score that
    differs from its threshold only in the last bits of a double."""
    rng = random.Random(5)
    for _ in range(20_000):
        threshold = round(rng.random(), rng.randint(2, 6))
        score = threshold + rng.choice((-1, 1)) * 10 ** -rng.randint(3, 9) * rng.random()
        score = min(max(score, 0.0), 1.0)
        shown = score_and_threshold(score, threshold)
        assert on_its_side(f"{shown.score} / {shown.threshold}", score, threshold)
    below = 0.435 - 2**-53
    assert on_its_side(" / ".join(score_and_threshold(below, 0.435)), below, 0.435)
    assert score_and_threshold(None, 0.4454) == ("–", "0.4454")
    assert score_and_threshold(0.4454, 0.4454) == ("0.4454", "0.4454")


def test_the_stats_page_writes_thresholds_as_calibrated(client: FlaskClient) -> None:
    """Calibration's 4-decimal thresholds, as the tiles and the report write them: 0.4454
    was "0.445" on the stats page."""
    decisions = [
        {
            "record_id": "/7001/c",
            "label_key": key,
            "model_version": VERSION,
            "decision": decision,
            "reviewer": "ada",
        }
        for key, decision in (("photograph", "accept"), ("drawing", "accept"), ("map", "reject"))
    ]
    answer = client.post("/api/decisions", json=decisions)
    assert answer.status_code == 201, answer.get_data(as_text=True)
    page = client.get("/stats")
    assert page.status_code == 200
    cells = re.findall(
        r"<tr><td><code>[^<]*</code></td><td>([^<]*)</td><td class=\"num\">([^<]*)</td>",
        page.get_data(as_text=True),
    )
    assert dict(cells) == {"photograph": "0.435", "drawing": "0.4454", "map": "0.5"}


def test_a_label_given_below_its_threshold_says_fallback_not_above(
    client: FlaskClient, tmp_path: Path
) -> None:
    """A model with a top-k fallback labels a record none of whose classes reached its
    threshold; its tile said "above" beside a score below the threshold."""
    db = Database(f"sqlite:///{tmp_path}/shown.sqlite3")
    with db.transaction() as session:
        upsert_records(
            session, [Record("/7001/d", "7001", "http://data.europeana.eu/item/7001/d", None, "M")]
        )
    with db.transaction() as session:
        fallback = RecordOutcome(
            "/7001/d",
            Outcome.LABELLED,
            scores=[0.1, 0.2, 0.3],
            labels=[LabelScore("map", VOCABULARY["map"], 0.3)],
        )
        save_outcomes(session, None, VERSION, [fallback])
    db.dispose()
    html = client.get("/queue?state=any&limit=100").get_data(as_text=True)
    sides = {}
    for tile in html.split('<li class="tile')[1:]:
        record = unescape(re.search(r'data-record="([^"]*)"', tile)[1])
        label = re.search(r'data-label="([^"]*)"', tile)[1]
        sides[(record, label)] = re.search(r'<span class="side"[^>]*>([^<]*)</span>', tile)[1]
    assert sides[("/7001/d", "map")] == "fallback"
    assert sides[("/7001/d", "drawing")] == "below"
    assert sides[("/7001/a", "map")] == "above"  # at its threshold
    assert sides[("/7001/a", "photograph")] == "below"
