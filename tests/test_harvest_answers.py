"""A harvest against a Search API that answers badly, and a harvest directory that was
tampered with: one line or a skipped item, never a traceback, and nothing kept that
makes the next run fail (issue 23, item 7)."""

from __future__ import annotations

import base64
import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from enrichment.cli import cli
from enrichment.sources.harvest import CANDIDATES_PER_CAP, EXAMINED_PER_CANDIDATE
from tests.harvest_fixture import VOCABULARY, fill
from tests.search_api import KEY, RewritingSearchAPI, generated_item
from tests.services import ImageHost

COUNT = 12


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[RewritingSearchAPI, ImageHost, Path]]:
    api, host = RewritingSearchAPI(), ImageHost()
    fill(api, host.add, COUNT)
    vocabulary = tmp_path / "vocabulary.json"
    vocabulary.write_text(json.dumps(VOCABULARY))
    yield api, host, vocabulary
    api.close()
    host.close()


def harvest(api: RewritingSearchAPI, vocabulary: Path, out: Path) -> Result:
    return CliRunner().invoke(
        cli,
        ["harvest", "--vocabulary", str(vocabulary), "--out", str(out), "--no-progress"],
        env={
            "EUROPEANA_API_KEY": KEY,
            "EUROPEANA_API_URL": api.url,
            "ENRICH_FETCH_ALLOW": "127.0.0.1",
        },
    )


def labelled_ids(out: Path) -> list[str]:
    with (out / "labels.csv").open(newline="") as handle:
        return [row["europeana_id"] for row in csv.DictReader(handle)]


@pytest.mark.parametrize("total", [[1, 2], {"count": 5}, "12", -1, True, 1.5])
def test_a_total_that_is_not_a_count_is_ignored_and_never_kept(
    world, tmp_path: Path, total: Any
) -> None:
    api, _, vocabulary = world

    def bad_total(document: dict[str, Any]) -> None:
        document["totalResults"] = total

    api.rewrite = bad_total
    out = tmp_path / "set"
    first = harvest(api, vocabulary, out)
    assert first.exit_code == 0, first.output
    assert len(labelled_ids(out)) == COUNT
    selection = json.loads((out / ".harvest" / "selection.json").read_text())
    assert all(type(found) is int for found in selection["found"].values())
    summary = json.loads((out / "summary.json").read_text())
    assert all(type(counts["found"]) is int for counts in summary["classes"].values())

    api.rewrite = None  # a correct server afterwards: the stored selection still serves
    again = harvest(api, vocabulary, out)
    assert again.exit_code == 0, again.output
    assert len(labelled_ids(out)) == COUNT


def test_edm_concept_holding_objects_or_numbers_keeps_the_record_with_its_query_label(
    world, tmp_path: Path
) -> None:
    api, host, vocabulary = world
    api.items.clear()
    fill(api, host.add, 3, prefix="o")

    def concepts_as_objects(document: dict[str, Any]) -> None:
        for item in document["items"]:
            item["edmConcept"] = [{"def": item["edmConcept"]}, 7, *item["edmConcept"]]
        if document["items"]:
            document["items"][0]["edmConcept"] = {"uri": VOCABULARY["map"]}

    api.rewrite = concepts_as_objects
    out = tmp_path / "set"
    result = harvest(api, vocabulary, out)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert len(labelled_ids(out)) == 3


def test_ids_with_dot_segments_are_left_out_of_a_harvest(world, tmp_path: Path) -> None:
    api, host, vocabulary = world
    url = host.add("/dots.png", b"unused")
    for index, record_id in enumerate(["/900/../901/x", "/900/./y", "/%2E%2E/z"]):
        item = generated_item("900", 500 + index, url, concepts=(VOCABULARY["map"],))
        api.items.append({**item, "id": record_id})
    out = tmp_path / "set"
    result = harvest(api, vocabulary, out)
    assert result.exit_code == 0, result.output
    ids = labelled_ids(out)
    assert len(ids) == COUNT and not any("." in record_id for record_id in ids)
    left_out = json.loads((out / "summary.json").read_text())["records"]["left_out"]
    assert left_out.get("no_usable_id") == 3


@pytest.mark.parametrize(
    "damage",
    [
        b"{not json",
        b"[]",
        b'{"format": 1}',
        b"\xff\xfe",
        b"[" * 100_000,
    ],
)
def test_a_damaged_selection_is_one_line_naming_the_way_out(
    world, tmp_path: Path, damage: bytes
) -> None:
    api, _, vocabulary = world
    out = tmp_path / "set"
    assert harvest(api, vocabulary, out).exit_code == 0
    selection = out / ".harvest" / "selection.json"
    selection.write_bytes(damage)
    result = harvest(api, vocabulary, out)
    assert result.exit_code == 1 and "Traceback" not in result.output
    message = result.output.strip()
    assert "\n" not in message
    assert f"{selection} is damaged" in message and "remove it" in message
    selection.unlink()
    assert harvest(api, vocabulary, out).exit_code == 0


def test_a_selection_holding_a_wrong_count_is_refused_not_kept(world, tmp_path: Path) -> None:
    api, _, vocabulary = world
    out = tmp_path / "set"
    assert harvest(api, vocabulary, out).exit_code == 0
    selection = out / ".harvest" / "selection.json"
    stored = json.loads(selection.read_text())
    stored["found"]["map"] = [1, 2]  # as an older version kept a list-valued totalResults
    selection.write_text(json.dumps(stored))
    result = harvest(api, vocabulary, out)
    assert result.exit_code == 1
    assert "found is not a count per key" in result.output


def test_a_journal_line_pointing_outside_the_directory_is_not_taken(world, tmp_path: Path) -> None:
    api, host, vocabulary = world
    out = tmp_path / "set"
    assert harvest(api, vocabulary, out).exit_code == 0
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not yours")
    journal = out / ".harvest" / "downloads.jsonl"
    lines = [json.loads(line) for line in journal.read_text().splitlines()]
    victim = lines[0]["record_id"]
    forged = [
        {"record_id": victim, "image": "../secret.png", "sha256": "0" * 64},
        {"record_id": victim, "image": str(secret), "sha256": "0" * 64},
        {"record_id": victim, "image": f"images/{'0' * 64}.png/../../../secret.png"},
    ]
    with journal.open("a") as handle:
        handle.writelines(json.dumps(line) + "\n" for line in forged)
    requests_before = len(host.requests)
    result = harvest(api, vocabulary, out)
    assert result.exit_code == 0, result.output
    with (out / "labels.csv").open(newline="") as handle:
        images = [row["image"] for row in csv.DictReader(handle)]
    assert all(image.startswith("images/") and ".." not in image for image in images)
    assert str(secret) not in (out / "labels.csv").read_text()
    assert len(host.requests) == requests_before  # its own earlier line still stands


def test_a_query_whose_results_are_all_unusable_stops_paging_with_a_warning(
    world: tuple[RewritingSearchAPI, ImageHost, Path], tmp_path: Path
) -> None:
    """Every page new items without an image, and always a next cursor: the harvest paged
    for ever (20,000 requests a minute). It stops after EXAMINED_PER_CANDIDATE results per
    candidate it wants, says so, and still writes the set."""
    api, _, vocabulary = world
    served = iter(range(10**9))

    def unusable(document: dict[str, Any]) -> None:
        page = next(served)
        items = [generated_item("7", page * 100 + n, "") for n in range(100)]
        for item in items:
            del item["edmPreview"], item["edmIsShownBy"]
        document["items"] = items
        document["nextCursor"] = base64.urlsafe_b64encode(str(page + 1).encode()).decode()

    api.rewrite = unusable
    result = CliRunner().invoke(
        cli,
        ["harvest", "--vocabulary", str(vocabulary), "--out", str(tmp_path / "set"),
         "--per-class", "2", "--no-progress"],
        env={"EUROPEANA_API_KEY": KEY, "EUROPEANA_API_URL": api.url},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    pages = -(-CANDIDATES_PER_CAP * 2 * EXAMINED_PER_CANDIDATE // 100)  # whole pages of 100
    assert len(api.requests) == len(VOCABULARY) * pages
    for key in VOCABULARY:
        warning = f"warning: {key}: stopped paging after {pages * 100} results, only 0"
        assert warning in result.output
    summary = json.loads((tmp_path / "set" / "summary.json").read_text())
    assert summary["records"]["left_out"]["no_image"] == len(api.requests) * 100
