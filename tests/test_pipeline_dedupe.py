"""Identical images are classified once per model version, across records, URLs and runs."""

from __future__ import annotations

from pathlib import Path

from enrichment.config import Settings
from enrichment.media.fetch import Fetcher
from enrichment.model.classifier import Classifier
from enrichment.runs import service
from enrichment.runs.pipeline import BatchReport, process_batch
from enrichment.runs.schedule import ModelIdentity, RunKind
from enrichment.store.database import Database
from tests.conftest import image_bytes, write_jsonl
from tests.scenario import stored_rows


class RecordingDispatcher:
    """Runs each batch at once, like the in-process dispatcher, and keeps its report."""

    def __init__(self, settings: Settings, classifier: Classifier) -> None:
        self.classifier = classifier
        self.fetcher = Fetcher(settings)
        self.reports: list[BatchReport] = []

    def dispatch(self, db: Database, queue: str, batch_ids: list[int]) -> None:
        for batch_id in batch_ids:
            self.reports.append(process_batch(db, batch_id, self.classifier, self.fetcher, 3))


def run_file(settings: Settings, classifier: Classifier, records: Path) -> list[BatchReport]:
    db = Database(settings.database_url)
    db.ensure_schema()
    dispatcher = RecordingDispatcher(settings, classifier)
    try:
        service.start(
            db,
            settings,
            service.records_scope(records),
            RunKind.ON_DEMAND,
            ModelIdentity(classifier.version, classifier.spec),
            dispatcher,
            batch_size=10,
        )
    finally:
        dispatcher.fetcher.close()
    return dispatcher.reports


def test_same_image_through_other_records_and_urls_reaches_the_model_once(
    tmp_path: Path, tiny_model: Path, image_host
) -> None:
    same = image_bytes((120, 40, 200), "circle")
    other = image_bytes((20, 160, 20), "bar")
    settings = Settings(database_url=f"sqlite:///{tmp_path}/db.sqlite3", fetch_allow=("127.0.0.1",))
    classifier = Classifier.load(tiny_model)
    first = write_jsonl(
        tmp_path / "first.jsonl",
        [
            {"id": "/dup/a", "image_url": image_host.add("/dup/a.png", same)},
            {"id": "/dup/b", "image_url": image_host.add("/dup/copy-of-a.png", same)},
            {"id": "/dup/c", "image_url": image_host.add("/dup/c.png", other)},
        ],
    )
    (report,) = run_file(settings, classifier, first)
    assert (report.model_inputs, report.reused) == (2, 1)

    second = write_jsonl(
        tmp_path / "second.jsonl",
        [{"id": "/dup/d", "image_url": image_host.add("/dup/elsewhere.png", other)}],
    )
    (later,) = run_file(settings, classifier, second)
    assert (later.model_inputs, later.reused) == (0, 1)

    rows = stored_rows(settings.database_url)
    assert rows["/dup/b"]["scores"] == rows["/dup/a"]["scores"]
    assert rows["/dup/d"]["scores"] == rows["/dup/c"]["scores"]
    assert rows["/dup/d"]["labels"] == rows["/dup/c"]["labels"]
    assert rows["/dup/a"]["scores"] != rows["/dup/c"]["scores"]
