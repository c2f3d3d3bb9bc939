"""`enrich review label-studio export|import`: tasks and config in Label Studio's documented
formats (labelstud.io/guide/tasks, /guide/predictions, /guide/export), and its JSON export read
back as decisions."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from enrichment.cli import cli
from enrichment.errors import InvalidValue
from enrichment.review.exchange import ImportReport, import_label_studio
from enrichment.store.reviews import Review
from tests.test_review_api import KEYS, SCORES, THRESHOLDS, VERSION, build_review_db

# Label Studio's import format for tasks with predictions, as its guide documents it.
RESULT = {
    "type": "object",
    "required": ["from_name", "to_name", "type", "value"],
    "properties": {
        "id": {"type": "string"},
        "from_name": {"type": "string"},
        "to_name": {"type": "string"},
        "type": {"const": "choices"},
        "value": {
            "type": "object",
            "required": ["choices"],
            "properties": {"choices": {"type": "array", "items": {"type": "string"}}},
        },
        "score": {"type": "number", "minimum": 0, "maximum": 1},
    },
}
TASKS = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["data", "predictions"],
        "properties": {
            "data": {
                "type": "object",
                "required": ["image"],
                "properties": {"image": {"type": "string", "format": "uri"}},
            },
            "predictions": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["model_version", "score", "result"],
                    "properties": {
                        "model_version": {"type": "string"},
                        "score": {"type": "number"},
                        "result": {"type": "array", "items": RESULT},
                    },
                },
            },
        },
    },
}


def run(*args: str, url: str):
    done = CliRunner().invoke(cli, list(args), env={"DATABASE_URL": url})
    assert done.exit_code == 0, done.output
    return done


def annotated(task: dict, number: int, choices: list[str], **extra) -> dict:
    """The task as Label Studio's JSON export writes it once annotated."""
    result = [
        {
            "id": f"r{number}{choice}",
            "type": "choices",
            "value": {"choices": [choice]},
            "origin": "manual",
            "to_name": "image",
            "from_name": "labels",
        }
        for choice in choices
    ]
    return {
        "id": number,
        "data": task["data"],
        "annotations": [
            {
                "id": 100 + number,
                "completed_by": {"id": 1, "email": "ada@example.org", "first_name": "Ada"},
                "result": result,
                "was_cancelled": False,
                "ground_truth": False,
                "created_at": "2026-12-01T10:00:00.000000Z",
                "updated_at": "2026-12-01T10:00:00.000000Z",
                "lead_time": 3.5,
                "task": number,
                "project": 1,
                **extra,
            }
        ],
        "predictions": [7],  # the export lists predictions by id
        "meta": {},
        "project": 1,
    }


def test_label_studio_round_trip(image_host, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/ls.sqlite3"
    build_review_db(url, image_host).dispose()
    tasks_path = tmp_path / "tasks.json"
    run("review", "label-studio", "export", "--out", str(tasks_path), url=url)
    tasks = json.loads(tasks_path.read_text())
    jsonschema.validate(tasks, TASKS, format_checker=jsonschema.FormatChecker())
    config = ET.fromstring(tasks_path.with_suffix(".xml").read_text())
    image = config.find("Image")
    choices = config.find("Choices")
    assert image.get("value") == "$image"
    assert choices.get("toName") == image.get("name") and choices.get("choice") == "multiple"
    assert [c.get("value") for c in choices.findall("Choice")] == list(KEYS)
    by_record = {task["data"]["record_id"]: task for task in tasks}
    assert set(by_record) == set(SCORES)
    for record_id, scores in SCORES.items():
        prediction = by_record[record_id]["predictions"][0]
        assert prediction["model_version"] == VERSION
        above = {k: s for k, s, t in zip(KEYS, scores, THRESHOLDS, strict=True) if s >= t}
        got = {r["value"]["choices"][0]: r["score"] for r in prediction["result"]}
        assert got.keys() == above.keys()
        assert all(abs(got[k] - above[k]) < 1e-6 for k in above)
        assert prediction["score"] == min(got.values(), default=0.0)
        for result in prediction["result"]:
            assert result["from_name"] == choices.get("name")
            assert result["to_name"] == image.get("name")

    # a: photograph kept, map chosen (the model missed it); b: photograph dropped, map kept;
    # c: a cancelled annotation only; d: two annotations, the later one counts; e: nothing.
    export = [
        annotated(by_record["/9001/a"], 1, ["photograph", "map"]),
        annotated(by_record["/9001/b"], 2, ["map"]),
        annotated(by_record["/9001/c"], 3, ["photograph"], was_cancelled=True),
        annotated(by_record["/9002/d"], 4, ["photograph", "drawing", "map"]),
        annotated(by_record["/9002/e"], 5, []),
        # a task for a record this database never classified: skipped, the rest imported
        annotated({"data": {**by_record["/9002/e"]["data"], "record_id": "/9003/gone"}}, 6, []),
    ]
    later = annotated(by_record["/9002/d"], 4, ["drawing"])["annotations"][0]
    later.update(updated_at="2026-12-01T11:00:00.000000Z", completed_by=7)
    export[3]["annotations"].insert(0, later)
    export_path = tmp_path / "export.json"
    export_path.write_text(json.dumps(export))
    done = run("review", "label-studio", "import", str(export_path), url=url)
    assert "6 tasks: 8 decisions recorded, 0 already standing, 2 tasks skipped" in done.output
    assert "task 6 (id 6): record /9003/gone has no result of model" in done.output
    ada, seven = "ada@example.org", "label-studio:7"
    want = [
        ("/9001/a", "photograph", "accept", ada),  # the model's labels: photograph, drawing
        ("/9001/a", "drawing", "reject", ada),
        ("/9001/a", "map", "add", ada),
        ("/9001/b", "photograph", "reject", ada),  # photograph, map
        ("/9001/b", "map", "accept", ada),
        ("/9002/d", "photograph", "reject", seven),  # all three; the later annotation
        ("/9002/d", "drawing", "accept", seven),
        ("/9002/d", "map", "reject", seven),
    ]
    assert decisions(url) == want
    again = run("review", "label-studio", "import", str(export_path), url=url)
    assert "0 decisions recorded, 8 already standing" in again.output
    assert decisions(url) == want


def decisions(url: str) -> list[tuple]:
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        rows = connection.execute(
            sa.select(
                Review.record_id, Review.label_key, Review.decision, Review.reviewer
            ).order_by(Review.id)
        ).all()
    engine.dispose()
    return [tuple(row) for row in rows]


def test_an_import_that_is_not_a_label_studio_export_is_refused_by_its_path(
    image_host, tmp_path: Path
) -> None:
    db = build_review_db(f"sqlite:///{tmp_path}/ls.sqlite3", image_host)
    try:
        for name, text, message in [
            ("broken.json", "{", "is not valid JSON"),
            ("object.json", "{}", "is a list of tasks"),
        ]:
            path = tmp_path / name
            path.write_text(text)
            with pytest.raises(InvalidValue, match=message) as refused:
                import_label_studio(db, path, "ada")
            assert refused.value.field == "path"
        with pytest.raises(InvalidValue, match="cannot read"):
            import_label_studio(db, tmp_path / "missing.json", "ada")
        empty = tmp_path / "empty.json"
        empty.write_text("[]")
        assert import_label_studio(db, empty, "ada") == ImportReport(0, 0, 0, [])
    finally:
        db.dispose()
