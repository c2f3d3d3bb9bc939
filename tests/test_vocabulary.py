"""A vocabulary file that harvest or train cannot use is one clear line and a non-zero exit,
from both commands, before anything is written: they read it through the one
`read_vocabulary`, so what harvest accepts, train accepts too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from enrichment.errors import EnrichError
from enrichment.model.labelled import read_vocabulary
from tests.conftest import enrich_here

MAP = "http://data.europeana.eu/concept/base/43"
DRAWING = "http://data.europeana.eu/concept/base/35"


def both_commands(vocabulary: Path, tmp_path: Path) -> list[tuple[int, str]]:
    """Exit status and stderr of `enrich harvest` and `enrich model train` given it (in this
    process: the commands' own tests run them in a subprocess)."""
    data = tmp_path / "labels.csv"
    data.write_text("image,labels\na.png,drawing\n", encoding="utf-8")
    harvest = enrich_here(
        "harvest",
        "--vocabulary",
        str(vocabulary),
        "--out",
        str(tmp_path / "set"),
        "--no-progress",
        env={"EUROPEANA_API_KEY": "unused"},
    )
    train = enrich_here(
        "model",
        "train",
        "--data",
        str(data),
        "--vocabulary",
        str(vocabulary),
        "--out",
        str(tmp_path / "model"),
        env={},
    )
    assert not (tmp_path / "set").exists() and not (tmp_path / "model").exists()
    return [(done.returncode, done.stderr) for done in (harvest, train)]


def test_a_key_with_a_space_is_refused_by_harvest_and_train(tmp_path: Path) -> None:
    """A harvest wrote "old map drawing" into labels.csv, which train then read as the
    labels old, map and drawing, and refused."""
    vocabulary = tmp_path / "vocabulary.json"
    vocabulary.write_text(json.dumps({"old map": MAP, "drawing": DRAWING}), encoding="utf-8")
    expected = f"Error: {refusal(vocabulary, 'old map')}\n"
    for status, stderr in both_commands(vocabulary, tmp_path):
        assert (status, stderr) == (1, expected)


def refusal(vocabulary: Path, key: str) -> str:
    return (
        f"vocabulary {vocabulary}: key {key!r} must be a non-empty word without whitespace, "
        "',', ';' or '|' (labelled sets separate label keys with them)"
    )


@pytest.mark.parametrize("key", ["old\tmap", "map,drawing", "map;x", "a|b", " map", "map\n", ""])
def test_every_key_a_labelled_set_would_split_or_lose_is_refused(tmp_path: Path, key: str) -> None:
    vocabulary = tmp_path / "vocabulary.json"
    vocabulary.write_text(json.dumps({"drawing": DRAWING, key: MAP}), encoding="utf-8")
    with pytest.raises(EnrichError) as raised:
        read_vocabulary(vocabulary)
    assert str(raised.value) == refusal(vocabulary, key)


def test_a_vocabulary_that_is_not_utf8_is_one_line_naming_the_file(tmp_path: Path) -> None:
    """It ended in a UnicodeDecodeError traceback."""
    vocabulary = tmp_path / "latin1.json"
    vocabulary.write_bytes(
        json.dumps({"carte géographique": MAP}, ensure_ascii=False).encode("latin-1")
    )
    expected = f"Error: vocabulary {vocabulary} is not UTF-8 text: byte 0xe9 at offset 9\n"
    for status, stderr in both_commands(vocabulary, tmp_path):
        assert (status, stderr) == (1, expected)


def test_keys_of_one_word_still_read_in_file_order(tmp_path: Path) -> None:
    vocabulary = tmp_path / "vocabulary.json"
    words = {"old_map": MAP, "drawing-ink": DRAWING, "carte_géographique": MAP}
    vocabulary.write_text(json.dumps(words, ensure_ascii=False), encoding="utf-8")
    assert list(read_vocabulary(vocabulary)) == list(words)
