"""model.json is checked whole at load: each bad value is one line naming its field (15.4)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from enrichment.errors import ModelError, OutputError
from enrichment.model.spec import (
    ClassSpec,
    ModelSpec,
    read_model_json,
    write_model_json,
)
from tests.conftest import enrich

SHA = "ab" * 32


def good_document() -> dict[str, Any]:
    return {
        "format": 1,
        "name": "m",
        "weights_sha256": SHA,
        "architecture": "resnet18",
        "input_size": 32,
        "normalization": {"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]},
        "labels": [
            {"key": "a", "label": "A", "concept": "http://example.org/a", "threshold": 0.5},
            {"key": "b", "label": "B", "concept": "urn:x:b", "threshold": 0.25},
        ],
        "top_k_fallback": 1,
        "thresholds_version": 1,
    }


def write(directory: Path, document: Any, raw: str | None = None) -> Path:
    directory.mkdir(exist_ok=True)
    (directory / "model.json").write_text(raw if raw is not None else json.dumps(document))
    return directory


def test_a_good_document_loads(tmp_path: Path) -> None:
    spec, version, sha = read_model_json(write(tmp_path / "m", good_document()))
    assert version == "m@" + SHA[:12] and sha == SHA
    assert spec.input_size == 32 and spec.std == (0.2, 0.2, 0.2) and spec.top_k_fallback == 1


def test_write_model_json_writes_what_read_accepts(tmp_path: Path) -> None:
    classes = (ClassSpec("a", "A", "http://example.org/a", np.float32(0.3)),)
    spec = ModelSpec("w", "resnet18", 64, classes, top_k_fallback=1)
    version = write_model_json(tmp_path, spec, SHA)
    again, read_version, _ = read_model_json(tmp_path)
    assert read_version == version and again.classes == classes and again.input_size == 64
    # The classes stay under "labels" on disk, each threshold a plain JSON number.
    document = json.loads((tmp_path / "model.json").read_text())
    assert [item["key"] for item in document["labels"]] == ["a"] and "classes" not in document
    assert document["labels"][0]["threshold"] == float(np.float32(0.3))
    # And it refuses to write what it would later refuse to read, leaving no file.
    bad = ModelSpec("w", "resnet18", 5000, classes)
    (tmp_path / "model.json").unlink()
    with pytest.raises(ModelError, match="input_size"):
        write_model_json(tmp_path, bad, SHA)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OutputError, match=r"cannot write /proc/no-such-model/model\.json: "):
        write_model_json(Path("/proc/no-such-model"), spec, SHA)


def change(document: dict[str, Any], where: str, value: Any) -> dict[str, Any]:
    """Set (or with value=DELETE, remove) a dotted path such as labels.0.threshold."""
    *parents, last = where.split(".")
    node: Any = document
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    key: Any = int(last) if last.isdigit() else last
    if value is DELETE:
        del node[key]
    else:
        node[key] = value
    return document


DELETE = object()


@pytest.mark.parametrize(
    ("where", "value", "message"),
    [
        (
            "input_size",
            100000,
            r"input_size: 100000 is greater than the maximum of 1024 \(the side",
        ),
        ("input_size", 0, "input_size: 0 is less than the minimum of 16"),
        ("input_size", "224", "input_size: '224' is not of type 'integer'"),
        ("normalization.std", [0, 0, 0], r"normalization\.std\[\d\]: 0 is less than or equal"),
        ("normalization.mean", [0.5], r"normalization\.mean: \[0\.5\] is too short"),
        ("normalization.std", [1, 1, 1, 1], r"normalization\.std: .* is too long"),
        ("labels.0.threshold", 1.5, r"labels\[0\]\.threshold: 1\.5 is greater than the maximum"),
        ("labels.1.threshold", -0.2, r"labels\[1\]\.threshold: -0\.2 is less than the minimum"),
        ("labels.0.threshold", float("nan"), r"labels\[0\]\.threshold: nan is not a finite"),
        ("normalization.mean", [0.5, float("inf"), 0.5], r"mean\[1\]: inf is not a finite"),
        ("format", 2, "format: is 2, 1 was expected"),
        ("format", DELETE, "the document: 'format' is a required property"),
        ("labels.0.concept", "photograph", r"labels\[0\]\.concept: 'photograph' does not match"),
        ("labels.0.concept", "http://x/a b", r"labels\[0\]\.concept: .* does not match"),
        ("labels.0.key", "a b", r"labels\[0\]\.key: 'a b' does not match"),
        ("labels.1.key", "a", r"labels\[1\]\.key: 'a' is listed twice"),
        ("labels", [], r"labels: \[\] should be non-empty"),
        ("labels.0.treshold", 0.7, r"labels\[0\]: Additional properties are not allowed"),
        ("input-size", 32, r"the document: Additional properties .*'input-size' was unexpected"),
        ("weights_sha256", "xyz", "weights_sha256: 'xyz' does not match"),
        ("top_k_fallback", 3, r"top_k_fallback must be between 0 \(off\) and the number of labels"),
        ("top_k_fallback", -1, "top_k_fallback: -1 is less than the minimum of 0"),
        ("thresholds_version", 0, "thresholds_version: 0 is less than the minimum of 1"),
        ("name", "a@b", "name: 'a@b' does not match"),
    ],
)
def test_each_bad_value_is_refused_naming_its_field(
    tmp_path: Path, where: str, value: Any, message: str
) -> None:
    directory = write(tmp_path / "m", change(good_document(), where, value))
    with pytest.raises(ModelError, match=message) as caught:
        read_model_json(directory)
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith(f"{directory / 'model.json'}: ")


@pytest.mark.parametrize(
    ("raw", "message"),
    [("[1, 2]", "must hold a JSON object, not list"), ("{", "is not valid JSON")],
)
def test_a_file_that_is_not_a_model_object_is_refused(tmp_path: Path, raw: str, message: str):
    with pytest.raises(ModelError, match=message):
        read_model_json(write(tmp_path / "m", None, raw))


def test_the_cli_refuses_a_bad_model_json_in_one_line_before_touching_the_database(
    tmp_path: Path,
) -> None:
    directory = write(tmp_path / "m", change(good_document(), "input_size", 100000))
    records = tmp_path / "records.jsonl"
    records.write_text('{"id": "/d/1", "image_url": "http://example.org/1.jpg"}\n')
    database = tmp_path / "db.sqlite3"
    result = enrich(
        "run",
        "--records",
        str(records),
        "--model-dir",
        str(directory),
        env={"DATABASE_URL": f"sqlite:///{database}"},
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"Error: {directory / 'model.json'}: input_size: 100000 is greater")
    assert not database.exists()
