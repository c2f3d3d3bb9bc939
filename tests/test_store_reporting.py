"""store/reporting.py: what the run report and explanations read, on SQLite and PostgreSQL.

A small run is written with the store's own writes (records, a model, one
batch of outcomes, labels of another model version and of another run beside
it), and each read is checked against what was written: labels per class,
score pages, the most and least confident labels with their ties, an example
per error reason, and a record's image URL.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from enrichment.errors import EnrichError
from enrichment.store.database import Database
from enrichment.store.reporting import (
    ErrorExample,
    LabelledRecord,
    RecordImage,
    RunTimes,
    reading_run,
    record_image,
)
from enrichment.store.schema import RecordRow, Run
from enrichment.store.writes import LabelScore, RecordOutcome, register_model, save_outcomes
from tests.conftest import upgraded_database

VERSION = "tiny@000000000000"
OTHER = "tiny@111111111111"
CLASSES = [
    {"key": "photograph", "label": "Photograph", "concept": "http://c/photo"},
    {"key": "map", "concept": "http://c/map"},  # no human name: the key stands in
]
CREATED = datetime(2026, 1, 2, 3, 4, 5)
STARTED = datetime(2026, 1, 2, 3, 4, 6)


def labelled(record_id: str, photo: float, map_: float | None = None) -> RecordOutcome:
    labels = [LabelScore("photograph", "http://c/photo", photo)]
    if map_ is not None:
        labels.append(LabelScore("map", "http://c/map", map_))
    return RecordOutcome(
        record_id,
        "labelled",
        scores=[photo, map_ if map_ is not None else 0.1],
        labels=labels,
        image_url=f"http://img{record_id}.png" if record_id != "/r/c" else None,
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path: Path) -> Database:
    database = upgraded_database(request, tmp_path)
    with database.transaction() as session:
        register_model(session, VERSION, "tiny", "resnet18", CLASSES, [0.5, 0.25])
        register_model(session, OTHER, "tiny", "resnet18", CLASSES, [0.5, 0.5])
        session.add_all(
            RecordRow(
                id=f"/r/{name}",
                dataset="r",
                item_uri=f"http://item/r/{name}",
                image_url=f"http://record-img/r/{name}" if name != "e" else None,
                provider="Museum" if name == "a" else None,
            )
            for name in "abcdefgh"
        )
        for number in (1, 2):
            session.add(
                Run(
                    id=number,
                    kind="full",
                    scope={"source": "records_file"},
                    model_version=VERSION,
                    status="completed" if number == 1 else "running",
                    queue="enrich",
                    created_at=CREATED,
                    started_at=STARTED if number == 1 else None,
                    finished_at=datetime(2026, 1, 2, 3, 5, 6) if number == 1 else None,
                )
            )
    with database.transaction() as session:
        save_outcomes(
            session,
            1,
            VERSION,
            [
                labelled("/r/a", 0.9, 0.3),
                labelled("/r/b", 0.7),
                labelled("/r/c", 0.7),  # a tie with /r/b; no image of its own in the result
                labelled("/r/d", 0.6, 0.8),
                RecordOutcome("/r/e", "below_threshold", scores=[0.2, 0.05]),
                RecordOutcome.failed("/r/g", "http_404", "gone"),
                RecordOutcome.failed("/r/f", "http_404", "also gone"),
                RecordOutcome.failed("/r/h", "timeout", None),
            ],
        )
    # Neither of these belongs to run 1: another model version, another run. (One batch a
    # transaction, as workers write them: PostgreSQL's staging tables empty at commit.)
    with database.transaction() as session:
        save_outcomes(session, 1, OTHER, [labelled("/r/e", 0.99, 0.99)])
    with database.transaction() as session:
        save_outcomes(session, 2, VERSION, [labelled("/r/h", 0.95)])
    return database


def test_a_runs_times_and_its_models_classes(db: Database) -> None:
    with reading_run(db, 1) as reading:
        assert reading.run == RunTimes(1, VERSION, CREATED, STARTED, datetime(2026, 1, 2, 3, 5, 6))
        assert reading.classes.keys == ("photograph", "map")
        assert reading.classes.names == ("Photograph", "map")
        assert reading.classes.thresholds == (0.5, 0.25)
    with reading_run(db, 2) as reading:
        assert (reading.run.started_at, reading.run.finished_at) == (None, None)


def test_labels_per_class_and_score_pages_are_the_runs_own(db: Database) -> None:
    with reading_run(db, 1) as reading:
        assert reading.label_counts() == {"photograph": 4, "map": 2}
        pages = list(reading.score_pages(3))
    # The classified results of run 1 and its version only (not errors), three a page.
    assert [len(page) for page in pages] == [3, 2]
    assert sorted(tuple(scores) for page in pages for scores in page) == sorted(
        [(0.9, 0.3), (0.7, 0.1), (0.7, 0.1), (0.6, 0.8), (0.2, 0.05)]
    )
    with reading_run(db, 2) as reading:
        assert reading.label_counts() == {"photograph": 1}


def test_the_gallery_reads_both_ends_of_the_ranking_with_ties_by_record_id(db: Database) -> None:
    with reading_run(db, 1) as reading:
        highest = reading.most_confident("photograph", 2)
        lowest = reading.least_confident("photograph", 2, [shown.record_id for shown in highest])
        everything = reading.least_confident("photograph", 10)
        maps = reading.most_confident("map", 5)
        assert reading.most_confident("nothing", 5) == []
    assert highest == [
        LabelledRecord("/r/a", "http://item/r/a", "Museum", "http://img/r/a.png", 0.9),
        LabelledRecord("/r/b", "http://item/r/b", None, "http://img/r/b.png", 0.7),
    ]
    # The other end, ties reversed; the record's own image where the result has none.
    assert lowest == [
        LabelledRecord("/r/d", "http://item/r/d", None, "http://img/r/d.png", 0.6),
        LabelledRecord("/r/c", "http://item/r/c", None, "http://record-img/r/c", 0.7),
    ]
    assert [shown.record_id for shown in everything] == ["/r/d", "/r/c", "/r/b", "/r/a"]
    assert [(shown.record_id, shown.confidence) for shown in maps] == [
        ("/r/d", 0.8),
        ("/r/a", 0.3),
    ]


def test_an_example_per_error_reason_is_its_first_record(db: Database) -> None:
    with reading_run(db, 1) as reading:
        assert reading.error_example("http_404") == ErrorExample("/r/f", "also gone")
        # Run 2 classified /r/h again since, taking its result over: no example is left.
        assert reading.error_example("timeout") is None
        assert reading.error_example("not_an_image") is None


def test_a_missing_run_is_one_clear_error(db: Database) -> None:
    with pytest.raises(EnrichError, match="run 9 is gone"), reading_run(db, 9):
        pass


def test_a_records_image_url(db: Database) -> None:
    assert record_image(db, "/r/a") == RecordImage("/r/a", "http://record-img/r/a")
    assert record_image(db, "/r/e") == RecordImage("/r/e", None)
    assert record_image(db, "/r/zz") is None
