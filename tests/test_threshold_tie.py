"""The tie: a score equal to its class threshold is a label, on every path that decides one.

The worker decides labels from the model's float32 scores (stored with 6 decimals),
`export --thresholds` re-decides them from the stored scores, the review queue shows
the labels the worker stored, and publish posts what export selects. Before there was
one number type, 0.43 against a threshold of 0.43 was no label for the worker (a
float64 score against a float32 threshold) and a label for the export.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import torch

from enrichment.model.classifier import Classifier
from enrichment.model.spec import ClassSpec, ModelSpec
from enrichment.publish.export import ExportFilter, iter_label_rows
from enrichment.publish.sync import Publisher
from enrichment.runs.pipeline import _Prepared, classify_prepared
from enrichment.sources.records_file import Record
from enrichment.store.batches import BatchRecord
from enrichment.store.database import Database
from enrichment.store.review_queue import QueueFilter, queue_page
from enrichment.store.writes import register_model, save_outcomes, upsert_records
from tests.conftest import VOCABULARY

TIE = 0.43
VERSION = "tie@000000000000"
RECORD = "/1001/tie"
SPEC = ModelSpec(
    name="tie",
    architecture="resnet18",
    input_size=32,
    classes=(
        ClassSpec("photograph", "Photograph", VOCABULARY["photograph"], TIE),
        ClassSpec("map", "Map", VOCABULARY["map"], 0.9),
    ),
)


class TieModel(Classifier):
    """The real thresholding of `Classifier`; a network that scores every image 0.43."""

    def scores(self, inputs: np.ndarray) -> np.ndarray:
        return np.full((len(inputs), len(self.spec.classes)), TIE, dtype=np.float32)


def classified_by_the_worker() -> list:
    """One record through the worker's model stage, as a batch runs it."""
    classifier = TieModel(SPEC, VERSION, torch.nn.Identity(), torch.device("cpu"))
    record = BatchRecord(RECORD, f"https://images.example.org{RECORD}.jpg", None)
    prepared: Future[_Prepared] = Future()
    digest = hashlib.sha256(b"tie").hexdigest()
    prepared.set_result(_Prepared(record, np.zeros((3, 32, 32), np.float32), digest, None))
    return classify_prepared([prepared], classifier, inference_batch=8).outcomes


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/tie.sqlite3"
    else:
        url = request.getfixturevalue("pg_url")
    database = Database(url)
    database.upgrade()
    yield database
    database.dispose()


def test_a_score_equal_to_its_threshold_is_a_label_everywhere(db: Database) -> None:
    (outcome,) = classified_by_the_worker()
    assert outcome.scores == [TIE, TIE]
    assert [label.key for label in outcome.labels] == ["photograph"], "the worker: a label"

    with db.transaction() as session:
        register_model(
            session,
            VERSION,
            SPEC.name,
            SPEC.architecture,
            [{"key": c.key, "label": c.label, "concept": c.concept} for c in SPEC.classes],
            SPEC.thresholds,
        )
        upsert_records(
            session,
            [Record(RECORD, "1001", f"http://data.europeana.eu/item{RECORD}", outcome.image_url)],
        )
        save_outcomes(session, None, VERSION, [outcome])

    def exported(filters: ExportFilter) -> list[tuple[str, float]]:
        return [(row.label_key, row.confidence) for row in iter_label_rows(db, filters)]

    assert exported(ExportFilter()) == [("photograph", TIE)], "export of the stored labels"
    tie = ExportFilter(thresholds={"photograph": TIE, "map": TIE})
    assert exported(tie) == [("map", TIE), ("photograph", TIE)], "export --thresholds"

    page = queue_page(db, QueueFilter(side="above"))
    assert [(item.label_key, item.confidence, item.threshold) for item in page.items] == [
        ("photograph", TIE, TIE)
    ], "the review queue shows the tie as the model's label"

    report = Publisher(db, "http://annotations.example.org/annotation", None).publish(
        ExportFilter()
    )
    assert report.dry_run and report.created == 1, "publish would post the tie's label"
