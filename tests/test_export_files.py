"""Layouts on disk: paged files that link up, JSON Lines, atomic writes, checks before writing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from enrichment.errors import EnrichError
from enrichment.publish.annotations import (
    PROFILES,
    W3C_CONTEXT,
    CheckedAnnotations,
    Profile,
    annotation_id,
    iri_of,
    w3c_annotation,
    w3c_problems,
)
from enrichment.publish.export import ExportFilter
from enrichment.publish.pages import AtomicFiles, Layout, write_document, write_split
from enrichment.store.database import Database
from enrichment.store.selection import LabelRow
from tests.conftest import VOCABULARY
from tests.export_support import (
    NEW,
    OLD,
    Catalogue,
    annotations_in,
    build_catalogue,
    export_text,
    open_database,
    read_pages,
)


@pytest.fixture
def catalogue(tmp_path: Path) -> tuple[Database, Catalogue]:
    db = open_database(f"sqlite:///{tmp_path}/export.sqlite3")
    yield db, build_catalogue(db)
    db.dispose()


def row(record: str, item_uri: str | None = None, concept: str | None = None) -> LabelRow:
    return LabelRow(
        record,
        item_uri or f"http://data.europeana.eu/item{record}",
        f"https://images.example.org{record}.jpg",
        OLD,
        "map",
        concept or VOCABULARY["map"],
        0.75,
        datetime(2024, 5, 1, 12, 0, 0),
    )


def test_split_pages_link_up_and_hold_what_one_document_holds(catalogue, tmp_path) -> None:
    db, stored = catalogue
    whole = annotations_in(export_text(db))
    out = tmp_path / "labels.jsonld"
    base = "https://example.org/exports"
    export_text(db, path=out, split=7, base_url=base)
    collection = json.loads(out.read_text())
    assert collection["id"] == base + "/labels.jsonld"
    assert collection["total"] == len(whole) == len(stored.expected())
    by_id = {page["id"]: page for page in read_pages(out)}
    assert set(by_id) == {f"{base}/{path.name}" for path in tmp_path.glob("labels-*.jsonld")}
    followed, page_id, previous = [], collection["first"], None
    while True:
        page = by_id[page_id]
        assert page["partOf"] == collection["id"]
        assert page["startIndex"] == len(followed)
        assert page.get("prev") == previous
        assert 0 < len(page["items"]) <= 7
        followed += page["items"]
        if "next" not in page:
            break
        previous, page_id = page_id, page["next"]
    assert page_id == collection["last"]
    assert followed == whole


def test_json_lines_hold_one_standalone_annotation_per_line(catalogue, tmp_path) -> None:
    db, _ = catalogue
    whole = annotations_in(export_text(db))
    lines = [json.loads(line) for line in export_text(db, format="jsonl").splitlines()]
    assert [{k: v for k, v in a.items() if k != "@context"} for a in lines] == whole
    assert all(a["@context"] == W3C_CONTEXT for a in lines)
    out = tmp_path / "labels.jsonl"
    export_text(db, path=out, format="jsonl", split=10)
    sizes = [len(path.read_text().splitlines()) for path in sorted(tmp_path.glob("labels-*"))]
    assert sum(sizes) == len(whole) and all(size == 10 for size in sizes[:-1])
    assert not out.exists(), "JSON Lines pages need no collection document"


def test_an_empty_export_is_a_valid_empty_collection(catalogue, tmp_path) -> None:
    db, _ = catalogue
    nothing = ExportFilter(since=datetime(2999, 1, 1))  # names known things, selects none
    document = json.loads(export_text(db, nothing))
    assert (document["total"], document["first"]["items"]) == (0, [])
    out = tmp_path / "labels.jsonld"
    export_text(db, nothing, path=out, split=5)
    collection = json.loads(out.read_text())
    assert collection["total"] == 0 and "first" not in collection and "last" not in collection
    assert list(tmp_path.glob("labels-*")) == []


def test_reexporting_gives_the_same_ids_and_the_same_bytes(catalogue, tmp_path) -> None:
    db, stored = catalogue
    first = export_text(db, ExportFilter(datasets=("1001",)))
    stored.classify(db, OLD, [r for r, versions in stored.results.items() if NEW not in versions])
    again = export_text(db, ExportFilter(datasets=("1001",)))
    ids = [a["id"] for a in annotations_in(first)]
    assert ids == [a["id"] for a in annotations_in(again)]
    assert len(set(ids)) == len(ids)
    assert annotation_id("/1/a", VOCABULARY["map"], OLD) != annotation_id(
        "/1/a", VOCABULARY["map"], NEW
    ), "a new model version makes new annotations"
    assert again == export_text(db, ExportFilter(datasets=("1001",))), "same rows, same bytes"


def test_a_failed_export_leaves_the_previous_files_and_no_partial_ones(catalogue, tmp_path):
    db, _ = catalogue
    out = tmp_path / "labels.jsonld"
    export_text(db, path=out, split=5)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    layout = Layout(PROFILES["w3c"], "jsonld", "urn:uuid:x", "test")

    def failing() -> Iterator[dict[str, Any]]:
        yield from annotations_in(export_text(db))[:12]
        raise ConnectionError("database went away")

    with pytest.raises(ConnectionError):
        write_split(failing(), out, 5, layout)
    with pytest.raises(ConnectionError), AtomicFiles() as files, files.create(out) as handle:
        write_document(failing(), handle, layout)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before


def test_a_shorter_export_removes_the_pages_it_no_longer_has(catalogue, tmp_path) -> None:
    db, _ = catalogue
    out = tmp_path / "labels.jsonld"
    export_text(db, path=out, split=3)
    assert len(list(tmp_path.glob("labels-*.jsonld"))) > 2
    export_text(db, ExportFilter(labels=("map",)), path=out, split=1000)
    assert [path.name for path in tmp_path.glob("labels-*")] == ["labels-00001.jsonld"]
    assert json.loads(out.read_text())["last"].endswith("#page-1")


def test_only_the_pages_of_an_earlier_export_are_removed(catalogue, tmp_path) -> None:
    """Files that merely fit the page names (a nightly archive by date, someone's file) are
    not pages of an earlier export: they stay."""
    db, _ = catalogue
    out = tmp_path / "labels.jsonld"
    export_text(db, path=out, split=3)
    pages = sorted(path.name for path in tmp_path.glob("labels-*.jsonld"))
    archive = tmp_path / "labels-20261201.jsonld"
    archive.write_text('{"@context": "an archived export of 1 December"}')
    after_a_gap = tmp_path / f"labels-{len(pages) + 2:05d}.jsonld"
    after_a_gap.write_text('{"@context": "not numbered on from the export"}')
    notes = tmp_path / "labels-00002.jsonld.notes"
    notes.write_text("mine")
    export_text(db, ExportFilter(labels=("map",)), path=out, split=1000)
    left = sorted(path.name for path in tmp_path.glob("labels-*"))
    assert left == sorted(["labels-00001.jsonld", archive.name, after_a_gap.name, notes.name])
    mine = tmp_path / "labels-00002.jsonld"
    mine.write_text("a spreadsheet's notes, not a page")  # numbered on, but no page
    export_text(db, ExportFilter(labels=("map",)), path=out, split=1000)
    assert mine.read_text() == "a spreadsheet's notes, not a page"


def test_an_empty_split_export_into_a_new_folder(catalogue, tmp_path) -> None:
    db, _ = catalogue
    out = tmp_path / "new" / "labels.jsonl"  # JSON Lines: no collection file to make it
    export_text(db, ExportFilter(since=datetime(2999, 1, 1)), path=out, split=5, format="jsonl")
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_the_database_being_exported_is_never_the_output(catalogue, tmp_path) -> None:
    db, _ = catalogue
    database = tmp_path / "export.sqlite3"
    before = database.read_bytes()
    for out in (database, tmp_path / "export.sqlite3-wal"):
        with pytest.raises(EnrichError, match="is the database being exported from"):
            export_text(db, path=out)
    assert database.read_bytes() == before


def test_a_second_export_to_the_same_file_at_once_is_refused(catalogue, tmp_path) -> None:
    """Both would write into one temporary file (or one rename it away under the other):
    a corrupt file, and one of them saying it succeeded."""
    db, _ = catalogue
    out = tmp_path / "labels.jsonl"
    with AtomicFiles() as first, first.create(out) as handle:
        handle.write("the first export's line\n")
        with pytest.raises(EnrichError, match=f"another export is writing {out} right now"):
            export_text(db, path=out, format="jsonl")
    assert out.read_text() == "the first export's line\n"
    export_text(db, path=out, format="jsonl")  # once the first is done
    assert len(out.read_text().splitlines()) == len(annotations_in(export_text(db)))


def test_an_image_url_with_spaces_is_a_target_source_iri_not_a_skipped_label() -> None:
    """Providers' image URLs hold spaces and worse; percent-encoded they are the same
    resource, and valid IRIs. Bidirectional controls cannot hide in one either."""
    spaced = row("/1/a")._replace(image_url="https://images.example.org/a b.jpg?q=1 2")
    hidden = row("/1/b")._replace(image_url="https://images.example.org/\u202egpj.exe")
    w3c = CheckedAnnotations(PROFILES["w3c"])
    sources = [annotation["target"]["source"] for annotation in w3c.build([spaced, hidden])]
    assert sources == [
        "https://images.example.org/a%20b.jpg?q=1%202",
        "https://images.example.org/%E2%80%AEgpj.exe",
    ]
    assert w3c.skipped == 0
    assert iri_of("https://images.example.org/caf\u00e9.jpg") == (
        "https://images.example.org/caf\u00e9.jpg"
    ), "letters an IRI holds stay as they are"


def test_annotations_a_consumer_would_reject_are_skipped_and_reported() -> None:
    rows = [
        row("/1/a"),
        row("/1/b", item_uri="https://museum.example.org/objects/b"),
        row("/1/c", concept="aat 300028094"),
    ]
    europeana = CheckedAnnotations(PROFILES["europeana"])
    assert [a["target"] for a in europeana.build(rows)] == ["http://data.europeana.eu/item/1/a"]
    assert (europeana.written, europeana.skipped) == (1, 2)
    assert (
        "/1/b (map): target 'https://museum.example.org/objects/b' is not a Europeana item"
        in (europeana.problems[0])
    )
    w3c = CheckedAnnotations(PROFILES["w3c"])
    assert len(list(w3c.build(rows))) == 2, "any absolute IRI is a W3C target"
    assert w3c.problems == ["/1/c (map): body 'aat 300028094' is not an absolute IRI"]


def test_a_key_the_context_does_not_define_stops_the_export() -> None:
    def with_stray_key(label: LabelRow) -> dict[str, Any]:
        return {**w3c_annotation(label), "score": label.confidence}

    checked = CheckedAnnotations(Profile("w3c", with_stray_key, w3c_problems, W3C_CONTEXT))
    with pytest.raises(EnrichError, match="do not survive JSON-LD expansion"):
        list(checked.build([row("/1/a")]))
