"""The run report writes thresholds and confidences to the same decimals, so no label is
shown below its own threshold. Thresholds were written to 2 decimals and confidences to 3:
a trained model's 0.48619 read "threshold 0.49" beside its label "0.486", and the demo
model's 0.4454 read 0.45."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from enrichment.report.report import gather, render
from enrichment.store.database import Database
from enrichment.store.schema import RecordRow, Run
from enrichment.store.writes import LabelScore, RecordOutcome, register_model, save_outcomes
from tests.test_report import Node, parse, rows

VERSION = "trained@000000000000"
CLASSES = [
    {"key": "photograph", "label": "Photograph", "concept": "http://c/photo"},
    {"key": "map", "label": "Map", "concept": "http://c/map"},
    {"key": "drawing", "label": "Drawing", "concept": "http://c/drawing"},
]
THRESHOLDS = [0.48619, 0.4454, 0.5]
# Each class's labels at its threshold and a hair above it, where 2 or 3 decimals round
# them under the threshold's 2 decimals.
SCORES = {
    "a": [0.48619, 0.4454, 0.5],
    "b": [0.4862, 0.44541, 0.50001],
    "c": [0.9, 0.446, 0.1],
}


def reported(tmp_path: Path) -> Node:
    db = Database(f"sqlite:///{tmp_path}/test.sqlite3")
    db.upgrade()
    with db.transaction() as session:
        register_model(session, VERSION, "trained", "resnet18", CLASSES, THRESHOLDS)
        session.add_all(RecordRow(id=f"/t/{name}", dataset="t") for name in SCORES)
        moment = datetime(2026, 12, 7, 1)
        session.add(
            Run(
                id=1,
                kind="full",
                scope={"source": "records_file"},
                model_version=VERSION,
                status="running",
                queue="enrich",
                created_at=moment,
                started_at=moment,
            )
        )
    outcomes = [
        RecordOutcome(
            f"/t/{name}",
            "labelled",
            scores=scores,
            labels=[
                LabelScore(item["key"], item["concept"], score)
                for item, score, threshold in zip(CLASSES, scores, THRESHOLDS, strict=True)
                if score >= threshold
            ],
        )
        for name, scores in SCORES.items()
    ]
    with db.transaction() as session:
        save_outcomes(session, 1, VERSION, outcomes)
    return parse(render(gather(db, 1, 3), {}))


def test_no_label_is_shown_below_its_threshold(tmp_path: Path) -> None:
    page = reported(tmp_path)
    table = rows(page.one("section", id="labels").one("table"))
    assert [(row[1], row[2]) for row in table] == [
        ("photograph", "0.4862"),
        ("map", "0.4454"),
        ("drawing", "0.5"),
    ]
    captions = [
        figure.one("figcaption").text()
        for figure in page.one("section", id="confidence").all("figure")
    ]
    assert [caption.rsplit("threshold ", 1)[1] for caption in captions] == [
        "0.4862",
        "0.4454",
        "0.5",
    ]
    for block in page.one("section", id="gallery").by("section", class_="class"):
        shown = float(block.one("h3").one("small").text().split()[1].rstrip(","))
        confidences = [float(figure.one("strong").text()) for figure in block.all("figure")]
        assert len(confidences) >= 2 and min(confidences) >= shown, (shown, confidences)
    gallery = page.one("section", id="gallery")
    photograph = gallery.one("section", data_class="photograph")
    assert photograph.one("h3").one("small").text() == "threshold 0.4862, 3 labelled"
    assert sorted(f.one("strong").text() for f in photograph.by("figure", data_kind="highest")) == [
        "0.4862",
        "0.4862",
        "0.9000",
    ]
