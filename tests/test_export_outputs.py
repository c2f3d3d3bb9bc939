"""Outputs: `enrich export --out` writes through what is not a regular file, an output
that cannot be created is one line, every file is replaced whole or not at all, and
re-thresholding keeps the classifier's top-k fallback."""

from __future__ import annotations

import json
import os
import shutil
import stat
import threading
from pathlib import Path

import numpy as np
import pytest

from enrichment.errors import OutputError
from enrichment.files import write_atomically
from enrichment.model.classifier import Classifier
from enrichment.model.spec import read_model_json
from enrichment.publish.export import ExportFilter, Output, export
from enrichment.publish.pages import AtomicFiles
from enrichment.sources.records_file import Record
from enrichment.store.schema import Outcome
from enrichment.store.writes import (
    LabelScore,
    RecordOutcome,
    register_model,
    save_outcomes,
    upsert_records,
)
from tests.conftest import enrich
from tests.export_support import annotations_in, build_catalogue, export_text, open_database


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('outputs')}/export.sqlite3"
    db = open_database(url)
    build_catalogue(db)
    db.dispose()
    return url


def one_line(result) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_out_dev_stdout_writes_the_document_to_stdout(database: str) -> None:
    result = enrich("export", "--out", "/dev/stdout", env={"DATABASE_URL": database})
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["type"] == "AnnotationCollection" and document["total"] > 0
    assert "wrote" in result.stderr


def test_a_fifo_is_written_through_and_stays_a_fifo(database: str, tmp_path: Path) -> None:
    fifo = tmp_path / "labels.jsonld"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    db = open_database(database)
    report = export(db, ExportFilter(), Output(path=fifo))
    reader.join(timeout=30)
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert json.loads(received[0])["total"] == report.written > 0
    assert received[0].decode() == export_text(db)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["labels.jsonld"]


def test_a_symlink_keeps_pointing_at_its_target_which_gets_the_export(
    database: str, tmp_path: Path
) -> None:
    db = open_database(database)
    target = tmp_path / "published" / "labels.jsonld"
    target.parent.mkdir()
    target.write_text("old export\n")
    link = tmp_path / "latest.jsonld"
    link.symlink_to(target)
    export(db, ExportFilter(), Output(path=link))
    assert link.is_symlink() and link.readlink() == target
    assert target.read_text() == export_text(db)
    # Split pages go beside the file the link points to, and so do their stale ones' removal.
    export(db, ExportFilter(), Output(path=link, split=7))
    assert link.is_symlink() and json.loads(target.read_text())["type"] == "AnnotationCollection"
    assert sorted(path.name for path in target.parent.glob("labels-*.jsonld"))[:1] == [
        "labels-00001.jsonld"
    ]
    # A dangling link: its target is created.
    dangling = tmp_path / "next.jsonld"
    dangling.symlink_to(tmp_path / "published" / "next.jsonld")
    export(db, ExportFilter(), Output(path=dangling))
    assert dangling.is_symlink() and (tmp_path / "published" / "next.jsonld").is_file()


def character_device(path: Path, minor: int) -> Path:
    """A private copy of /dev/null (minor 3) or /dev/full (minor 7), so a bug damages nothing."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, minor))
    except PermissionError:
        pytest.skip("creating a character device needs CAP_MKNOD")
    return path


def test_a_character_device_is_written_through_not_replaced(database: str, tmp_path: Path):
    db = open_database(database)
    null = character_device(tmp_path / "null", 3)
    export(db, ExportFilter(), Output(path=null))
    assert stat.S_ISCHR(null.stat().st_mode)
    full = character_device(tmp_path / "full", 7)
    with pytest.raises(OutputError, match=f"cannot write {full}: No space left on device"):
        export(db, ExportFilter(), Output(path=full))
    assert stat.S_ISCHR(full.stat().st_mode)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["full", "null"]


def test_split_into_a_stream_is_refused(database: str, tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match="split export writes page files beside"):
        export(open_database(database), ExportFilter(), Output(path=fifo, split=3))


def test_an_export_into_a_path_that_cannot_be_created_is_one_line(
    database: str, tmp_path: Path
) -> None:
    for out in ("/proc/no-such-dir/labels.jsonld", "/proc/version/labels.jsonld"):
        line = one_line(enrich("export", "--out", out, env={"DATABASE_URL": database}))
        assert line.startswith(f"Error: cannot write {out}: ")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker / "labels.jsonld"
    with pytest.raises(OutputError, match=f"cannot write {out}: Not a directory"):
        export(open_database(database), ExportFilter(), Output(path=out))
    assert blocker.read_text() == "x" and sorted(tmp_path.iterdir()) == [blocker]


def test_a_failed_write_removes_its_partial_files(tmp_path: Path) -> None:
    full = character_device(tmp_path / "full", 7)
    page = tmp_path / "page.jsonld"
    with pytest.raises(OutputError), AtomicFiles() as files:
        with files.create(page) as out:
            out.write("[]\n")
        with files.create(full) as out:
            out.write("x" * 100_000)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["full"]


def test_one_file_is_replaced_whole_or_not_at_all(tmp_path: Path) -> None:
    """model.json, harvest files, reports and the review cache all write through this."""
    target = tmp_path / "model.json"
    target.write_text("old")
    write_atomically(target, "new é")
    assert target.read_bytes() == "new é".encode()
    blocked = tmp_path / "gone" / "report.html"
    with pytest.raises(OutputError, match=r"cannot write .*gone/report\.html"):
        write_atomically(blocked, b"<html>")
    occupied = tmp_path / "images"
    (occupied / "inside").mkdir(parents=True)  # the rename fails once the bytes are written
    with pytest.raises(OutputError, match="images"):
        write_atomically(occupied, b"jpeg")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["images", "model.json"], (
        "the temporary file is gone"
    )


def test_rethresholded_export_keeps_the_classifiers_top_k_fallback(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Re-thresholding decides as `Classifier.decide` does, fallback labels included."""
    model_dir = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    document = json.loads((model_dir / "model.json").read_text())
    document["top_k_fallback"] = 1
    (model_dir / "model.json").write_text(json.dumps(document))
    classifier = Classifier.load(model_dir)
    spec, version, _ = read_model_json(model_dir)
    db = open_database(f"sqlite:///{tmp_path}/topk.sqlite3")
    keys = spec.keys
    scores = np.random.default_rng(7).uniform(0.05, 0.95, size=(40, len(keys))).astype(np.float32)
    ids = [f"/topk/item_{n:02d}" for n in range(len(scores))]
    with db.transaction() as session:
        register_model(
            session,
            version,
            spec.name,
            spec.architecture,
            [
                {"key": label.key, "label": label.label, "concept": label.concept}
                for label in spec.classes
            ],
            [label.threshold for label in spec.classes],
            spec.top_k_fallback,
        )
        upsert_records(
            session,
            [
                Record(i, "topk", f"http://data.europeana.eu/item{i}", f"http://img{i}.jpg")
                for i in ids
            ],
        )
        outcomes = []
        for record_id, row in zip(ids, scores, strict=True):
            labels = classifier.labels_above_threshold(row)
            outcomes.append(
                RecordOutcome(
                    record_id,
                    Outcome.LABELLED if labels else Outcome.BELOW_THRESHOLD,
                    scores=[float(value) for value in row],
                    labels=labels,
                    image_url=f"http://img{record_id}.jpg",
                )
            )
        save_outcomes(session, None, version, outcomes)
    new = {"photograph": 0.97, "drawing": 0.96}  # so high that most rows fall back
    classifier.thresholds = np.asarray(
        [new.get(key, label.threshold) for key, label in zip(keys, spec.classes, strict=True)],
        dtype=np.float32,
    )
    expected = {
        (record_id, label.key)
        for record_id, row in zip(ids, scores, strict=True)
        for label in classifier.labels_above_threshold(row)
    }
    fallback_rows = int((~(scores >= classifier.thresholds).any(axis=1)).sum())
    assert fallback_rows >= 10, "the test must exercise the fallback"
    concept_key = {label.concept: label.key for label in spec.classes}
    exported = {
        (
            annotation["target"]["scope"].removeprefix("http://data.europeana.eu/item"),
            concept_key[annotation["body"]],
        )
        for annotation in annotations_in(export_text(db, ExportFilter(thresholds=new)))
    }
    assert exported == expected
    # Every record has at least its one fallback label.
    assert {record_id for record_id, _ in exported} == set(ids)
    assert isinstance(classifier.labels_above_threshold(scores[0])[0], LabelScore)
