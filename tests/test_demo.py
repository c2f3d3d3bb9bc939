"""`make demo` and the README's offline commands, run as a newcomer would run them."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from enrichment.media.decode import decode
from enrichment.model.classifier import Classifier
from enrichment.publish.jsonld import expand
from tests.conftest import REPO

DEMO_MODEL = REPO / "demo" / "model"


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh working directory (the repo's demo and .venv linked in) where the demo has run."""
    workdir = tmp_path_factory.mktemp("newcomer")
    for name in ("demo", ".venv"):
        (workdir / name).symlink_to(REPO / name)
    result = subprocess.run(
        [sys.executable, "-m", "demo.run_demo"],
        cwd=workdir,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (workdir / "demo-run.log").write_text(result.stdout)
    return workdir


def test_demo_writes_json_ld_whose_labels_are_the_models(demo_dir: Path) -> None:
    document = json.loads((demo_dir / "demo-output" / "annotations.jsonld").read_text())
    annotations = document["first"]["items"]
    assert document["type"] == "AnnotationCollection" and annotations
    assert document["total"] == len(annotations)
    expanded = expand(document)
    assert expanded, "the collection expands with the bundled contexts"

    classifier = Classifier.load(DEMO_MODEL)
    concept = {label.concept: label.key for label in classifier.spec.classes}
    exported: dict[str, set[str]] = {}
    for annotation in annotations:
        assert annotation["generator"]["version"] == classifier.version
        exported.setdefault(annotation["target"]["source"].rsplit("/", 1)[1], set()).add(
            concept[annotation["body"]]
        )
    collection = sorted((REPO / "demo" / "sample" / "images" / "collection").iterdir())
    for image in collection:
        scores = classifier.scores(
            np.stack([decode(image.read_bytes(), classifier.spec.preprocessing)])
        )
        expected = {label.key for label in classifier.labels_above_threshold(scores[0])}
        assert exported.get(image.name, set()) == expected, image.name

    pages = sorted((demo_dir / "demo-output" / "europeana").glob("*.jsonld"))
    items = [item for page in pages for item in json.loads(page.read_text())["items"]]
    assert len(items) == len(annotations)
    assert all(item["motivation"] == "tagging" for item in items)
    log = (demo_dir / "demo-run.log").read_text()
    assert "agreement with the manifest" in log and "demo-output/report/run-1.html" in log


def test_the_demo_database_stays_reviewable_after_its_image_host_is_gone(demo_dir: Path) -> None:
    """Every record's image is in the review app's cache, and the log says how to use it."""
    log = (demo_dir / "demo-run.log").read_text()
    assert "enrich review --cache-dir demo-output/review-cache" in log
    cached = [
        path for path in (demo_dir / "demo-output" / "review-cache").rglob("*") if path.is_file()
    ]
    assert len(cached) >= len(collection_rows()), "an image per record of the collection"


def collection_rows() -> list[dict[str, str]]:
    with (REPO / "demo" / "sample" / "manifest.csv").open(newline="") as handle:
        return [row for row in csv.DictReader(handle) if row["split"] == "collection"]


def test_readme_offline_commands_work_as_written(demo_dir: Path) -> None:
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- readme-test: offline -->\n```sh\n(.*?)```", readme, re.S)
    assert block, "the README marks its offline commands"
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.group(1)],
        cwd=demo_dir,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "/demo/clipart_carte_de_france_01\tlabelled\t" in result.stdout
    assert "macro F1" in result.stdout
    assert list((demo_dir / "demo-output" / "explanations").glob("*.png"))
    lines = (demo_dir / "demo-output" / "labels.jsonl").read_text().splitlines()
    assert lines and all(json.loads(line)["type"] == "Annotation" for line in lines)
