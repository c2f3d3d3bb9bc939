"""`enrich review label-studio import` of plausible but malformed exports: a task that cannot be
read is skipped with a reason naming it, a file that is not an export is one error for its path,
and a record annotated in several tasks is decided once."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from enrichment.cli import cli
from enrichment.errors import InvalidValue
from enrichment.review.exchange import ImportReport, import_label_studio
from enrichment.store.database import Database
from tests.test_review_api import VERSION, build_review_db
from tests.test_review_label_studio import decisions

# /9001/a: the model labelled photograph and drawing, not map.
DATA = {"image": "http://images.test/a.png", "record_id": "/9001/a", "model_version": VERSION}


def task(
    choices: tuple[str, ...] = ("photograph",), updated_at: str = "2026-12-01T10:00:00Z"
) -> dict:
    """A well-formed annotated task, as Label Studio's JSON export writes it."""
    return {
        "id": 1,
        "data": dict(DATA),
        "annotations": [
            {
                "id": 101,
                "completed_by": {"id": 1, "email": "ada@example.org"},
                "result": [
                    {
                        "id": f"r{choice}",
                        "type": "choices",
                        "from_name": "labels",
                        "to_name": "image",
                        "value": {"choices": [choice]},
                    }
                    for choice in choices
                ],
                "was_cancelled": False,
                "created_at": updated_at,
                "updated_at": updated_at,
            }
        ],
        "predictions": [7],
    }


def changed(change: Callable[[dict], Any]) -> dict:
    broken = copy.deepcopy(task())
    change(broken)
    return broken


def annotation(broken: dict) -> dict:
    return broken["annotations"][0]


def without_data_version(broken: dict) -> dict:
    del broken["data"]["model_version"]
    return broken


MALFORMED = {
    "annotations a number": (
        changed(lambda t: t.update(annotations=7)),
        "its annotations are a number, not a list",
    ),
    "an annotation a number": (
        changed(lambda t: t.update(annotations=[7])),
        "its annotation 1 is a number, not an object",
    ),
    "completions a string": (
        changed(lambda t: t.update(completions="done", annotations=None)),
        "its completions are a string, not a list",
    ),
    "predictions a number": (
        changed(lambda t: without_data_version(t).update(predictions=5)),
        "its predictions are a number, not a list",
    ),
    "result a string": (
        changed(lambda t: annotation(t).update(result="abc")),
        "its annotation's result is a string, not a list",
    ),
    "result items strings": (
        changed(lambda t: annotation(t).update(result=["x"])),
        "result 1 of its annotation is a string, not an object",
    ),
    "value a list": (
        changed(lambda t: annotation(t)["result"][0].update(value=["map"])),
        "result 1 of its annotation has a value that is a list, not an object",
    ),
    "choices holding objects": (
        changed(lambda t: annotation(t)["result"][0].update(value={"choices": [{}]})),
        "result 1 of its annotation has a choice that is an object, not a class key",
    ),
    "choices a string": (
        changed(lambda t: annotation(t)["result"][0].update(value={"choices": "map"})),
        "result 1 of its annotation has choices that are a string, not a list",
    ),
    "model_version a list": (
        changed(lambda t: t["data"].update(model_version=[VERSION])),
        "its data's model_version is a list, not a string",
    ),
    "model_version an object": (
        changed(lambda t: t["data"].update(model_version={"v": VERSION})),
        "its data's model_version is an object, not a string",
    ),
    "a prediction's model_version a list": (
        changed(lambda t: without_data_version(t).update(predictions=[{"model_version": [1]}])),
        "its prediction's model_version is a list, not a string",
    ),
    "no model version anywhere": (
        changed(without_data_version),
        "unknown model version none",
    ),
    "record_id a list": (
        changed(lambda t: t["data"].update(record_id=["/9001/a"])),
        "no record_id in its data (a list)",
    ),
    "data a list": (changed(lambda t: t.update(data=[DATA])), "its data is a list, not an object"),
    "an unknown class": (
        changed(lambda t: annotation(t)["result"][0].update(value={"choices": ["unicorn"]})),
        "unknown classes unicorn",
    ),
}


@pytest.fixture(scope="module")
def review_db(tmp_path_factory: pytest.TempPathFactory, image_host) -> Iterator[Database]:
    """One database for the imports that must record nothing."""
    db = build_review_db(f"sqlite:///{tmp_path_factory.mktemp('ls')}/ls.sqlite3", image_host)
    yield db
    db.dispose()


def imported(db: Database, tmp_path: Path, export: Any) -> ImportReport:
    path = tmp_path / "export.json"
    path.write_text(json.dumps(export))
    return import_label_studio(db, path, "label-studio")


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_task_is_skipped_with_its_reason(
    case: str, review_db: Database, tmp_path: Path
) -> None:
    broken, reason = MALFORMED[case]
    report = imported(review_db, tmp_path, [broken])
    assert report == ImportReport(1, 0, 0, [f"task 1 (id 1): {reason}"])


def test_a_task_that_is_not_an_object_is_named_by_its_place(
    review_db: Database, tmp_path: Path
) -> None:
    report = imported(review_db, tmp_path, ["abc", None, {"data": DATA, "id": [1]}])
    assert report.skipped == [
        "task 1 is a string, not an object",
        "task 2 is null, not an object",
        "task 3: no annotation that was not cancelled",
    ]


def test_values_from_the_file_are_shown_short_and_without_escapes(
    review_db: Database, tmp_path: Path
) -> None:
    hostile = "\x1b[2J\x1b[31mred" + "x" * 500
    export = [
        changed(lambda t: t["data"].update(model_version=hostile)),
        changed(lambda t: annotation(t)["result"][0].update(value={"choices": [hostile]})),
        changed(lambda t: t.update(id=hostile)),
    ]
    export[2]["data"]["record_id"] = "/9003/gone"
    report = imported(review_db, tmp_path, export)
    assert len(report.skipped) == 3
    for message in report.skipped:
        assert "\x1b" not in message and "\\x1b[2J" in message and len(message) < 250
    assert report.skipped[2].endswith("record /9003/gone has no result of model " + VERSION)


def test_a_file_that_is_not_an_export_is_one_error_for_its_path(
    review_db: Database, tmp_path: Path
) -> None:
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes(json.dumps([task()]).replace("ada", "Ad\u00e9la").encode("latin-1"))
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    number = tmp_path / "number.json"
    number.write_text("5")
    for path, message in [
        (latin1, r"latin1.json is not UTF-8 text \(byte 0xe9 at offset \d+\)"),
        (nested, "nested.json is nested too deeply to be a Label Studio export"),
        (number, "number.json: a Label Studio JSON export is a list of tasks, not a number"),
    ]:
        with pytest.raises(InvalidValue, match=message) as refused:
            import_label_studio(review_db, path, "label-studio")
        assert refused.value.field == "path"


def test_the_same_task_twice_is_decided_once_by_its_latest_annotation(
    image_host, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path}/ls.sqlite3"
    db = build_review_db(url, image_host)
    try:
        twice = imported(db, tmp_path, [task(), task()])
        assert twice == ImportReport(
            2,
            2,
            0,
            ["task 1 (id 1): the same record as task 2 (id 1), whose annotation counts"],
        )
        ada = "ada@example.org"
        kept = [("/9001/a", "photograph", "accept", ada), ("/9001/a", "drawing", "reject", ada)]
        assert decisions(url) == kept
        # The later annotation counts wherever it stands in the file.
        later, earlier = task(("map",), "2026-12-02T09:00:00Z"), task(("drawing",))
        report = imported(db, tmp_path, [later, earlier, task()])
        assert (report.decisions, report.unchanged) == (2, 1)  # drawing: rejected already
        assert decisions(url) == [
            *kept,
            ("/9001/a", "photograph", "reject", ada),
            ("/9001/a", "map", "add", ada),
        ]
    finally:
        db.dispose()


def test_a_later_annotation_takes_back_an_added_class_and_counts_across_versions(
    image_host, tmp_path: Path
) -> None:
    """An annotation leaving out a class added before rejects it (the add stood for ever, in
    every labelled set exported after); a record's tasks of two model versions count by the
    latest annotation, not by their place in the file; and times are compared as times
    (`10:00:00Z` sorted after `10:00:00.500000Z` as text)."""
    url = f"sqlite:///{tmp_path}/ls.sqlite3"
    db = build_review_db(url, image_host)
    other = "pilot@dddddddddddd"
    build_review_db(url, image_host, version=other).dispose()  # /9001/a classified by both
    ada = "ada@example.org"
    try:
        imported(db, tmp_path, [task(("photograph", "drawing", "map"))])
        assert ("/9001/a", "map", "add", ada) in decisions(url)
        imported(db, tmp_path, [task(("photograph", "drawing"), "2026-12-02T10:00:00Z")])
        assert decisions(url)[-1] == ("/9001/a", "map", "reject", ada)

        newer = task(("map",), "2026-12-03T10:00:00.500000Z")
        older = changed(lambda t: t["data"].update(model_version=other))
        older["annotations"][0].update(
            updated_at="2026-12-03T10:00:00Z",
            result=[dict(older["annotations"][0]["result"][0], value={"choices": ["drawing"]})],
        )
        report = imported(db, tmp_path, [newer, older])
        assert report.skipped == [
            "task 2 (id 1): the same record as task 1 (id 1), whose annotation counts"
        ]
        standing = {key: decision for _, key, decision, _ in decisions(url)}
        assert standing == {"photograph": "reject", "drawing": "reject", "map": "add"}
    finally:
        db.dispose()


def test_import_from_the_command_line(image_host, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/ls.sqlite3"
    build_review_db(url, image_host).dispose()
    export = tmp_path / "export.json"
    export.write_text(json.dumps([MALFORMED["choices a string"][0], task()]))
    runner = CliRunner()
    done = runner.invoke(
        cli, ["review", "label-studio", "import", str(export)], env={"DATABASE_URL": url}
    )
    assert done.exit_code == 0, done.output
    assert done.output.splitlines() == [
        "2 tasks: 2 decisions recorded, 0 already standing, 1 tasks skipped",
        "  task 1 (id 1): result 1 of its annotation has choices that are a string, not a list",
    ]
    export.write_text(json.dumps([MALFORMED["choices a string"][0]] * 12))
    many = runner.invoke(
        cli, ["review", "label-studio", "import", str(export)], env={"DATABASE_URL": url}
    )
    # Not one task imported: an error, after the reasons (a script must not go on).
    assert many.exit_code == 1 and many.output.splitlines()[-2] == "  … and 2 more"
    assert (
        many.output.splitlines()[-1]
        == f"Error: no task of {export} could be imported (reasons above)"
    )
    assert len(many.output.splitlines()) == 1 + 10 + 1 + 1
    export.write_bytes('[{"data": "\u00e9"}]'.encode("latin-1"))
    refused = runner.invoke(
        cli, ["review", "label-studio", "import", str(export)], env={"DATABASE_URL": url}
    )
    assert refused.exit_code == 1
    assert refused.output == (
        f"Error: Invalid value for 'PATH': {export} is not UTF-8 text (byte 0xe9 at offset 11): "
        "export the project from Label Studio as JSON\n"
    )
