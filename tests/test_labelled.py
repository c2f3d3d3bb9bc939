"""Reading labelled sets: the pilot's own CSV, JSON Lines, and one-line errors that name the row."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from enrichment.config import Settings
from enrichment.errors import EnrichError
from enrichment.media.decode import Preprocessing
from enrichment.media.fetch import Fetcher
from enrichment.model.labelled import load_images, read_labelled, read_vocabulary

# The first rows of the pilot's multilabel evaluation list, as published.
PILOT_CSV = """category,skos_concept,URI,ID,URL,Unnamed: 5
building drawing,http://data.europeana.eu/concept/base/29 http://data.europeana.eu/concept/base/35,https://www.europeana.eu/en/item/92070/BibliographicResource_1000126223712,/92070/BibliographicResource_1000126223712,http://www.bildarchivaustria.at/Preview/12850454.jpg,
building furniture photograph,http://data.europeana.eu/concept/base/29 http://data.europeana.eu/concept/base/37 http://data.europeana.eu/concept/base/48,http://data.europeana.eu/item/916121/S_OLM_photo_OLM_2004_80_1100,/916121/S_OLM_photo_OLM_2004_80_1100,https://mm.dimu.org/image/022wYzhhfgj8?dimension=1200x1200,
"""  # noqa: E501


def test_the_shipped_vocabulary_has_the_pilots_twenty_classes() -> None:
    vocabulary = read_vocabulary()
    assert len(vocabulary) == 20
    assert vocabulary["photograph"] == "http://data.europeana.eu/concept/base/48"
    assert vocabulary["inscription"] == "http://vocab.getty.edu/aat/300028702"


def test_the_pilots_evaluation_csv_reads_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "eval_multilabel_with_URL.csv"
    path.write_text(PILOT_CSV)
    data = read_labelled(path, read_vocabulary())
    assert data.group_field == "id"
    first, second = data.images
    assert first.image == "http://www.bildarchivaustria.at/Preview/12850454.jpg"
    assert first.labels == {"building", "drawing"} and first.line == 2
    assert first.group == "/92070/BibliographicResource_1000126223712"
    assert second.labels == {"building", "furniture", "photograph"}
    assert data.targets(["photograph", "building"]).tolist() == [[0.0, 1.0], [1.0, 1.0]]


def test_json_lines_with_lists_strings_and_no_labels(tmp_path: Path) -> None:
    path = tmp_path / "set.jsonl"
    rows = [
        {"image_url": "https://example.org/a.jpg", "labels": ["map", "drawing"], "record_id": "r1"},
        {"path": "b.png", "label": "map|photograph"},
        {"image": "c.png", "labels": []},
    ]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    data = read_labelled(path, read_vocabulary())
    assert [image.labels for image in data.images] == [
        {"map", "drawing"},
        {"map", "photograph"},
        set(),
    ]
    assert [image.group for image in data.images] == ["r1", "line 2", "line 3"]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("set.txt", "x", "a labelled set is a .csv or .jsonl file, not '.txt'"),
        ("set.csv", "labels\nmap\n", "set.csv:2: no image (a column named image or "),
        ("set.csv", "image\na.png\n", "set.csv:2: no labels (a column named labels or "),
        ("set.jsonl", '{"image": "a.png", "labels": []}\n{oops\n', "set.jsonl:2: not valid JSON"),
        ("set.jsonl", '{"image": "a.png", "labels": 3}\n', "set.jsonl:1: labels must be a list"),
        ("set.csv", "image,labels\na.png,mapp\n", "set.csv:2: unknown label 'mapp' (known: "),
        ("set.csv", "image,labels\n", "has no rows"),
    ],
)
def test_problems_are_one_line_errors_naming_the_row(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(EnrichError) as raised:
        read_labelled(path, read_vocabulary())
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_a_bad_vocabulary_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "vocabulary.json"
    path.write_text(json.dumps({"map": "not a uri"}))
    with pytest.raises(EnrichError, match="'map' must map to a concept URI"):
        read_vocabulary(path)
    path.write_text("[]")
    with pytest.raises(EnrichError, match=r"must be a non-empty \{key: concept URI\} object"):
        read_vocabulary(path)


def test_local_images_are_read_relative_to_the_set(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    buffer = io.BytesIO()
    Image.new("RGB", (20, 10), (200, 0, 0)).save(buffer, format="PNG")
    (tmp_path / "images" / "red.png").write_bytes(buffer.getvalue())
    (tmp_path / "images" / "text.png").write_text("not an image")
    path = tmp_path / "set.csv"
    path.write_text("image,labels\nimages/red.png,map\nimages/gone.png,map\nimages/text.png,\n")
    fetcher = Fetcher(Settings())
    try:
        loaded = list(
            load_images(read_labelled(path, {"map": "http://example.org/map"}),
                        Preprocessing(16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), fetcher, ahead=2)
        )  # fmt: skip
    finally:
        fetcher.close()
    assert [item.index for item in loaded] == [0, 1, 2]
    assert loaded[0].inputs is not None and loaded[0].inputs.shape == (3, 16, 16)
    assert loaded[0].inputs[0].mean() == pytest.approx(200 / 255, abs=1e-3)
    assert [item.error.reason for item in loaded[1:] if item.error] == [
        "missing_file",
        "not_an_image",
    ]
