"""A known set of records for the end-to-end tests, and the rows they must produce."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from enrichment.config import Settings
from enrichment.media.decode import decode
from enrichment.model.classifier import Classifier
from tests.conftest import image_bytes, write_jsonl
from tests.services import ImageHost

PICTURES = {
    "/e2e/red_circle": ((200, 30, 30), "circle"),
    "/e2e/green_bar": ((30, 200, 30), "bar"),
    "/e2e/blue": ((30, 30, 200), "none"),
    "/e2e/black_circle": ((10, 10, 10), "circle"),
    "/e2e/white": ((250, 250, 250), "none"),
}


@dataclass(frozen=True)
class Expected:
    status: str
    error_reason: str | None
    labels: dict[str, float]
    scores: list[float] | None


def build_scenario(
    host: ImageHost, tmp: Path, model_dir: Path, prefix: str = ""
) -> tuple[Path, dict[str, Expected]]:
    """Write a records file, serve its images, and compute what each record must become
    by calling the model directly on the same image bytes."""
    classifier = Classifier.load(model_dir)
    rows: list[dict] = []
    expected: dict[str, Expected] = {}
    for record_id, (colour, shape) in PICTURES.items():
        body = image_bytes(colour, shape)
        url = host.add(f"{prefix}{record_id}.png", body)
        rows.append({"id": record_id, "image_url": url, "provider": "Test museum"})
        scores = classifier.scores(np.stack([decode(body, classifier.spec.preprocessing)]))[0]
        labels = {
            label.key: label.confidence for label in classifier.labels_above_threshold(scores)
        }
        expected[record_id] = Expected(
            "labelled" if labels else "below_threshold", None, labels, [float(s) for s in scores]
        )
    rows.append({"id": "/e2e/missing", "image_url": host.url(f"{prefix}/missing.png")})
    expected["/e2e/missing"] = Expected("error", "http_404", {}, None)
    rows.append(
        {
            "id": "/e2e/html",
            "image_url": host.add(f"{prefix}/page.jpg", b"<html>hi</html>", "image/jpeg"),
        }
    )
    expected["/e2e/html"] = Expected("error", "not_an_image", {}, None)
    rows.append({"id": "/e2e/no_image"})
    expected["/e2e/no_image"] = Expected("error", "no_image", {}, None)
    statuses = {item.status for item in expected.values()}
    assert {"labelled", "below_threshold", "error"} <= statuses, "scenario must cover every outcome"
    return write_jsonl(tmp / "records.jsonl", rows), expected


def stored_rows(database_url: str) -> dict[str, dict]:
    """Every result row with its labels, straight from the database."""
    import sqlalchemy as sa

    engine = sa.create_engine(database_url)
    with engine.connect() as connection:
        results = connection.execute(
            sa.text("SELECT record_id, model_version, status, error_reason, scores FROM results")
        ).all()
        labels = connection.execute(
            sa.text("SELECT record_id, label_key, confidence, concept FROM labels")
        ).all()
    engine.dispose()
    rows: dict[str, dict] = {}
    for record_id, version, status, reason, scores in results:
        assert record_id not in rows, f"two results for {record_id}"
        if isinstance(scores, str):  # SQLite hands JSON columns back as text to raw SQL
            scores = json.loads(scores)
        rows[record_id] = {
            "version": version,
            "status": status,
            "reason": reason,
            "scores": scores,
            "labels": {},
        }
    for record_id, key, confidence, _ in labels:
        rows[record_id]["labels"][key] = confidence
    return rows


def assert_rows_match(rows: dict[str, dict], expected: dict[str, Expected], version: str) -> None:
    assert set(rows) == set(expected)
    for record_id, want in expected.items():
        got = rows[record_id]
        assert got["version"] == version, record_id
        assert (got["status"], got["reason"]) == (want.status, want.error_reason), record_id
        assert set(got["labels"]) == set(want.labels), record_id
        for key, confidence in want.labels.items():
            assert abs(got["labels"][key] - confidence) < 1e-5, (record_id, key)
        if want.scores is None:
            assert got["scores"] is None, record_id
        else:
            assert np.allclose(got["scores"], want.scores, atol=1e-5), record_id


def run_in_process(settings: Settings, scope: dict, full: bool = False) -> int:
    """A run over `scope` on the library API, batches in this process, as `enrich run` starts
    it; returns its id once every batch is done."""
    from enrichment import bootstrap
    from enrichment.runs import service
    from enrichment.runs.schedule import RunKind

    assert settings.model_dir is not None
    request = service.RunRequest(
        scope, RunKind.ON_DEMAND, settings.model_dir, settings.batch_size, full
    )
    checked = service.check(request, settings)
    progress = service.enrich(
        bootstrap.open_database(settings, create=True),
        settings,
        checked,
        lambda: bootstrap.dispatcher(settings, settings.model_dir),
    )
    return progress.run_id


def resume_in_process(settings: Settings, run_id: int) -> None:
    """`enrich resume` on the library API, batches in this process."""
    from enrichment import bootstrap
    from enrichment.runs import service

    assert settings.model_dir is not None
    service.resume(
        bootstrap.open_database(settings, create=True),
        settings,
        run_id,
        lambda: bootstrap.dispatcher(settings, settings.model_dir),
        settings.batch_size,
    )
