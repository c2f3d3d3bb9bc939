"""Records files and labelled sets: one reader, one line per problem, nothing half-read.

Issue 15's records-file bullets: encodings, binary files, huge fields, Excel's
byte-order mark, numeric ids, directories and FIFOs, what an id may contain,
duplicate ids and columns, a header without image_url.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import sqlalchemy as sa

from enrichment.errors import EnrichError, RecordsFileError
from enrichment.model.labelled import read_labelled, read_vocabulary
from enrichment.sources.records_file import read_records_file
from enrichment.store.database import Database
from enrichment.store.schema import RecordRow
from enrichment.store.writes import upsert_records
from tests.conftest import enrich

URL = "http://example.org/1.jpg"
JPEG_START = bytes.fromhex("ffd8ffe000104a46494600010100000100010000ffdb0043") + b"\x08" * 64


def records(path: Path) -> list:
    return list(read_records_file(path))


def test_a_bom_csv_from_excel_reads_its_id_column(tmp_path: Path) -> None:
    path = tmp_path / "records.csv"
    path.write_bytes(
        "id,image_url,title\r\n/d/1,http://example.org/1.jpg,Café\r\n".encode("utf-8-sig")
    )
    [record] = records(path)
    assert (record.id, record.image_url, record.title) == ("/d/1", URL, "Café")


def test_a_bom_in_json_lines_is_read_too(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    path.write_bytes(("\ufeff" + json.dumps({"id": "/d/1", "image_url": URL}) + "\n").encode())
    assert [record.id for record in records(path)] == ["/d/1"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "records.csv",
            "id,image_url\n/d/1,http://a/1.jpg\n/d/café,http://a/2.jpg\n".encode("latin-1"),
            r"records\.csv:3: not UTF-8 text \(byte 0xe9 at column 7\): save the file as UTF-8",
        ),
        (
            "records.jsonl",
            b'{"id": "/d/1"}\n{"id": "/d/\xe9t\xe9"}\n',
            r"records\.jsonl:2: not UTF-8 text \(byte 0xe9",
        ),
        ("photo.jpg", JPEG_START, r"photo\.jpg:1: contains a NUL byte: not a text file \(an image"),
        (
            "records.csv",
            JPEG_START[:4],
            r"records\.csv:1: not UTF-8 text \(byte 0xff at column 1\)",
        ),
        (
            "records.jsonl",
            b'{"id": "/d/1"}\n{"id": "/d/2\x00"}\n',
            "records.jsonl:2: contains a NUL",
        ),
        (
            "records.csv",
            b'id,image_url\n/d/1,"' + b"x" * (129 * 1024) + b'"\n',
            r"records\.csv:\d+: not valid CSV: a field is longer than 128 KiB",
        ),
        (
            "records.jsonl",
            b'{"id": 123, "image_url": "u"}\n',
            r"'id' is the number 123: an id is a",
        ),
        (
            "records.jsonl",
            b'{"id": ["/d/1"]}\n',
            "'id' must be a string /DATASET/LOCAL_ID, not list",
        ),
        ("records.csv", b"id,image_url\n123,u\n", r"record id '123' is not of the form /DATASET"),
        (
            "records.csv",
            b"id,url\n/d/1,u\n",
            r"records\.csv:1: the CSV header must name the column 'image_url'",
        ),
        ("records.csv", b"url\nu\n", r"must name the columns 'id', 'image_url' \(it names 'url'\)"),
        ("records.csv", b"id,id,image_url\n/d/1,/d/2,u\n", r"names the column 'id' twice"),
        ("records.csv", b"", r"records\.csv:1: the file is empty"),
        (
            "records.csv",
            b"id,image_url\n/d/1,u,extra\n",
            r"records\.csv:2: more fields than the header",
        ),
        (
            "records.jsonl",
            b'{"id": "/d/1", "image_url": "a"}\n\n{"id": "d/1", "image_url": "b"}\n',
            r"records\.jsonl:3: record /d/1 is already on line 1: give each record once",
        ),
        ("records.jsonl", b"[1]\n", r"records\.jsonl:1: expected a JSON object per line"),
        ("records.jsonl", b"[" * 100000 + b"\n", r"records\.jsonl:1: not valid JSON"),
        (
            "records.jsonl",
            b'{"id": "/d/1", "image_url": "u"}\n{"id": "/d/2", "image_url": \n',
            r"records\.jsonl:2: not valid JSON \(Expecting value at column 29\)$",
        ),
        (
            "records.txt",
            b"id,image_url\n/d/1,u\n",
            r"records\.txt:1: not valid JSON \(Expecting value at column 1\); records\.txt was "
            r"read as JSON Lines because its name ends in neither \.csv nor \.jsonl",
        ),
        (
            "records.csv",
            b'id,image_url,title\n/d/1,u,ok\n/d/2,u,"oops\n/d/3,u,ok\n/d/4,u,ok\n',
            r"records\.csv:3: not valid CSV: a quote opened on this line is never closed",
        ),
        (
            "records.csv",
            b'id,image_url,title\n/d/1,u,"say ""hi"" "now\n',
            r"records\.csv:2: not valid CSV: ',' expected after '\"': a quote inside a quoted",
        ),
        (
            "records.csv",
            b"id,image_url,title\n/d/1,u,t\n/d/2\n",
            r"records\.csv:3: fewer fields than the header names \(no 'image_url', 'title'\)",
        ),
        (
            "records.jsonl",
            b'{"id": "/d/1", "id": "/d/2", "image_url": "u"}\n',
            r"records\.jsonl:1: the key 'id' is given twice",
        ),
        (
            "records.jsonl",
            b'{"id": "/d/1"}\n{"id": "/d/2", "image_url": "a", "image_url": "b"}\n',
            r"records\.jsonl:2: the key 'image_url' is given twice",
        ),
        ("records.jsonl", b"", r"records\.jsonl:1: the file holds no records"),
        ("records.jsonl", b"\n  \n", r"records\.jsonl:1: the file holds no records"),
        ("records.csv", b"id,image_url\n\n", r"records\.csv:2: no records after the CSV header"),
        (
            "records.csv",
            "id,image_url\n/d/1,http://a/é.jpg\n".encode("utf-16"),
            r"records\.csv:1: looks like UTF-16 text: save the file as UTF-8",
        ),
        (
            "records.csv",
            "id,image_url\r\n/d/1,u\r\n".encode("utf-16-be"),
            r"records\.csv:1: looks like UTF-16 text",
        ),
        (
            "records.csv",
            "id,image_url\n/d/1,u\n".encode("utf-16-le"),
            r"records\.csv:1: looks like UTF-16 text",
        ),
        (
            "records.csv",
            b"id,image_url\r/d/1,u\r",
            r"records\.csv:1: not valid CSV: a carriage return \(CR\) ends a line without a line "
            r"feed \(LF\), as old Mac files do: save the file with LF or CRLF line endings",
        ),
    ],
)
def test_a_file_that_cannot_be_read_as_records_names_its_line(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(RecordsFileError, match=message) as caught:
        records(path)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("raw_id", "what"),
    [
        ("/d/a b", "SPACE"),
        ('/d/a"b', "QUOTATION MARK"),
        ("/d/a<b>", "LESS-THAN SIGN"),
        ("/d/a\tb", "U+0009"),
        ("/d/a\nb", "U+000A"),
        ("/d/a\u0000b", "U+0000"),
        ("/d/evil\u202egpj.exe", "RIGHT-TO-LEFT OVERRIDE"),
        ("/d/a\u200bb", "ZERO WIDTH SPACE"),
        ("/d/a\u00a0b", "NO-BREAK SPACE"),
        ("/d/a?b", "QUESTION MARK"),
        ("/d/a#b", "NUMBER SIGN"),
        ("/d/x/", "is not of the form"),
        ("/d//x", "is not of the form"),
        ("/2048128/../2048129/obj", "'.' or '..' segment"),
        ("/../2048129/obj", "'.' or '..' segment"),
        ("/d/./obj", "'.' or '..' segment"),
        ("/d/obj/..", "'.' or '..' segment"),
        ("/d/%2e%2E/obj", "'.' or '..' segment"),
        ("/d/" + "x" * 600, "over 512 characters"),
    ],
)
def test_an_id_the_export_could_not_use_is_refused_when_the_file_is_read(
    tmp_path: Path, raw_id: str, what: str
) -> None:
    path = tmp_path / "records.jsonl"
    path.write_text(
        json.dumps({"id": "/d/ok", "image_url": URL}) + "\n" + json.dumps({"id": raw_id}) + "\n"
    )
    with pytest.raises(RecordsFileError, match=r"records\.jsonl:2: record id") as caught:
        records(path)
    assert what in str(caught.value) and "\n" not in str(caught.value)


def test_a_header_ending_in_an_unnamed_column_needs_no_field_for_it(tmp_path: Path) -> None:
    path = tmp_path / "records.csv"
    path.write_text(f"id,image_url,\n/d/1,{URL}\n")
    assert [(record.id, record.image_url) for record in records(path)] == [("/d/1", URL)]


@pytest.mark.parametrize(
    ("item_uri", "what"),
    [
        ("javascript:alert(1)", "is not an absolute http or https URI with a host"),
        ("not a uri at all", "contains SPACE (U+0020), which a URI may not hold"),
        ("http://example.org/a\u202eb", "contains RIGHT-TO-LEFT OVERRIDE"),
        ("https://example.org/<b>", "contains LESS-THAN SIGN"),
        ("/item/601/c", "is not an absolute http or https URI"),
        ("http:///601/c", "is not an absolute http or https URI with a host"),
        ("ftp://example.org/601/c", "is not an absolute http or https URI"),
        ("http://[::1/601/c", "is not an absolute http or https URI"),
        (
            "http://data.europeana.eu/item/999/someone_else",
            "is not record /601/c's Europeana item URI (http://data.europeana.eu/item/601/c): "
            "give that one, or leave item_uri out",
        ),
        ("https://data.europeana.eu/item/999/x", "is not record /601/c's Europeana item URI"),
        ("https://data.europeana.eu/item/601/c/", "is not record /601/c's Europeana item URI"),
        ("ftp://data.europeana.eu/item/601/c", "is not an absolute http or https URI"),
    ],
)
def test_an_item_uri_the_export_could_not_target_is_refused_naming_its_line(
    tmp_path: Path, item_uri: str, what: str
) -> None:
    path = tmp_path / "records.jsonl"
    rows = [{"id": "/601/a", "image_url": URL}, {"id": "/601/c", "item_uri": item_uri}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(RecordsFileError, match=r"records\.jsonl:2: 'item_uri' ") as caught:
        records(path)
    assert what in str(caught.value) and "\n" not in str(caught.value)


def test_an_item_uri_outside_europeanas_items_or_the_records_own_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "records.csv"
    path.write_text(
        "id,image_url,item_uri\n"
        "/601/a,,https://museum.example/objects/17?lang=en#top\n"
        "/601/b,, http://data.europeana.eu/item/601/b \n"
        "/601/c,,\n"
    )
    assert [record.item_uri for record in records(path)] == [
        "https://museum.example/objects/17?lang=en#top",
        "http://data.europeana.eu/item/601/b",
        "http://data.europeana.eu/item/601/c",
    ]


def test_the_https_form_of_the_records_own_item_uri_is_stored_as_its_item_uri(
    tmp_path: Path,
) -> None:
    """Europeana serves item URIs over https too: the record's own is the same object, kept as
    the http URI its id gives (stored NULL), so annotations target it as any other record."""
    path = tmp_path / "records.jsonl"
    rows = [
        {"id": "/601/a", "image_url": URL, "item_uri": "https://data.europeana.eu/item/601/a"},
        {"id": "/601/b", "image_url": URL},
        {"id": "/601/c", "image_url": URL, "item_uri": "https://museum.example/601/c"},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    read = records(path)
    assert [record.item_uri for record in read] == [
        "http://data.europeana.eu/item/601/a",
        "http://data.europeana.eu/item/601/b",
        "https://museum.example/601/c",
    ]
    db = Database(f"sqlite:///{tmp_path}/db.sqlite3")
    db.upgrade()
    with db.transaction() as session:
        upsert_records(session, read)
    with db.transaction() as session:
        stored = dict(session.execute(sa.select(RecordRow.id, RecordRow.item_uri)).all())
    assert stored == {"/601/a": None, "/601/b": None, "/601/c": "https://museum.example/601/c"}
    db.dispose()


def test_ids_may_hold_what_iris_allow(tmp_path: Path) -> None:
    ids = ["/d/Ærøskøbing_1", "/2048128/object%2F1", "/d/o'neill(1)", "/d/a/b/c", "/日本/写真-1"]
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps({"id": i, "image_url": URL}) + "\n" for i in ids))
    assert [record.id for record in records(path)] == ids


def test_a_directory_or_a_fifo_is_not_taken_for_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RecordsFileError, match=f"records file {tmp_path} is a directory"):
        records(tmp_path)
    fifo = tmp_path / "records.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(RecordsFileError, match=r"is not a regular file \(a pipe or a device\)"):
        records(fifo)
    with pytest.raises(RecordsFileError, match="does not exist"):
        records(tmp_path / "absent.csv")


def test_labelled_sets_share_the_reader(tmp_path: Path) -> None:
    vocabulary = read_vocabulary()
    path = tmp_path / "set.csv"
    path.write_bytes("URL,category\r\na.png,map\r\n".encode("utf-8-sig"))
    [image] = read_labelled(path, vocabulary).images
    assert (image.image, image.labels, image.line) == ("a.png", {"map"}, 2)
    path.write_bytes("URL,category\na.png,map\nb.png,m\xe9p\n".encode("latin-1"))
    with pytest.raises(EnrichError, match=r"set\.csv:3: not UTF-8 text"):
        read_labelled(path, vocabulary)
    path.write_text("URL,URL,category\na.png,b.png,map\n")
    with pytest.raises(EnrichError, match="names the column 'URL' twice"):
        read_labelled(path, vocabulary)
    with pytest.raises(EnrichError, match="is a directory"):
        read_labelled(tmp_path, vocabulary)
    jsonl = tmp_path / "set.jsonl"
    jsonl.write_text('{"image": "a.png", "labels": ["map"]}\n{"image": \n')
    with pytest.raises(EnrichError, match=r"set\.jsonl:2: not valid JSON"):
        read_labelled(jsonl, vocabulary)
    # An unclosed quote would read the rows after it into a.png's object id: b.png lost.
    path.write_text('URL,category,ID\na.png,map,"/d/1\nb.png,photograph,/d/2\n')
    with pytest.raises(EnrichError, match=r"set\.csv:2: not valid CSV: a quote opened on this"):
        read_labelled(path, vocabulary)


def run_count(database: Path) -> int:
    engine = sa.create_engine(f"sqlite:///{database}")
    with engine.connect() as connection:
        count = connection.execute(sa.text("SELECT count(*) FROM runs")).scalar_one()
    engine.dispose()
    return count


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("records.csv", "id,image_url\n/d/1,u\n/d/é,u\n".encode("latin-1"), ":3: not UTF-8 text"),
        ("records.jsonl", b'{"id": "/d/1"}\n{"id": "/d/a b"}\n', ":2: record id '/d/a b' contains"),
        (
            "records.jsonl",
            b'{"id": "/d/1"}\n{"id": "/d/1"}\n',
            ":2: record /d/1 is already on line 1",
        ),
    ],
)
def test_enrich_run_gives_one_line_and_starts_no_run(
    tmp_path: Path, tiny_model: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    database = tmp_path / "db.sqlite3"
    env = {"DATABASE_URL": f"sqlite:///{database}", "ENRICH_MODEL": str(tiny_model)}
    Database(env["DATABASE_URL"]).upgrade()
    result = enrich("run", "--records", str(path), env=env)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"Error: {path}{message}")
    assert run_count(database) == 0
