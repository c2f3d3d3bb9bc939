"""`enrich harvest` against the local Search API and a local image host.

The Search API serves a labelled fixture collection (tests/harvest_fixture.py)
to concept queries; the tests check what reaches labels.csv against what the
fixture says, and count requests at the image hosts.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from enrichment.cli import cli
from enrichment.config import Settings
from enrichment.errors import InvalidValue
from enrichment.model.harvest import HarvestDir
from enrichment.sources.europeana import SearchClient
from enrichment.sources.harvest import (
    Candidate,
    HarvestOptions,
    collect,
    concept_query,
    read_exclusions,
    reusability_of,
    select,
)
from tests.conftest import REPO, enrich
from tests.harvest_fixture import VOCABULARY, Fixture, fill
from tests.search_api import KEY, SearchAPI, generated_item
from tests.services import ImageHost

COUNT = 36


class Redirector:
    """An image host that sends every request elsewhere (here: to the canary)."""

    def __init__(self, target: str) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(302)
                self.send_header("Location", target)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_port}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[SearchAPI, ImageHost, Fixture, ImageHost, Path]]:
    """The API, its image host, the fixture, a canary host (not allow-listed), a vocabulary."""
    api, host = SearchAPI(), ImageHost()
    canary = ImageHost(host="127.0.0.2")
    fixture = fill(api, host.add, COUNT)
    vocabulary = tmp_path / "vocabulary.json"
    vocabulary.write_text(json.dumps(VOCABULARY))
    yield api, host, fixture, canary, vocabulary
    api.close()
    host.close()
    canary.close()


def env_for(api: SearchAPI) -> dict[str, str]:
    return {
        "EUROPEANA_API_KEY": KEY,
        "EUROPEANA_API_URL": api.url,
        "ENRICH_FETCH_ALLOW": "127.0.0.1",  # the canary at 127.0.0.2 is not
    }


def rows(directory: Path) -> list[dict[str, str]]:
    with (directory / "labels.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_every_record_once_with_the_union_of_its_concepts(world, tmp_path: Path) -> None:
    api, host, fixture, canary, vocabulary = world
    canary_url = canary.add("/secret.png", b"never served")
    redirector = Redirector(canary_url)
    item = generated_item("950", 1, redirector.url("/art.png"), concepts=(VOCABULARY["map"],))
    api.items.append(item)
    missing = generated_item("950", 2, host.url("/gone.png"), concepts=(VOCABULARY["drawing"],))
    not_image = generated_item("950", 3, host.add("/text.png", b"hello", "text/plain"))
    not_image["edmConcept"] = [VOCABULARY["photograph"]]
    # Two records of one image: kept once, with both records' labels, and flagged.
    twin = generated_item("951", 1, host.add("/twin.png", fixture_image(host, fixture, 1)))
    twin["edmConcept"] = [VOCABULARY["photograph"]]
    # A record with another's very URL: one download for both.
    same_url = generated_item("952", 1, host.url(fixture.paths[fixture_record(fixture, 2)]))
    same_url["edmConcept"] = [VOCABULARY["map"]]
    api.items += [missing, not_image, twin, same_url]
    excluded = sorted(fixture.labels)[:3]
    exclude = tmp_path / "eval.csv"
    exclude.write_text("category,ID,URL\n" + "".join(f"map,{i},http://x/y\n" for i in excluded))

    out = tmp_path / "set"
    result = enrich(
        "harvest", "--vocabulary", str(vocabulary), "--out", str(out),
        "--per-class", "100", "--exclude", str(exclude), "--no-progress",
        env=env_for(api),
    )  # fmt: skip
    redirector.close()
    assert result.returncode == 0, result.stderr
    assert canary.requests == []  # the redirect was refused before any connection to it

    found = rows(out)
    by_record: dict[str, set[str]] = {}
    for row in found:
        assert (out / row["image"]).is_file()
        for record_id in [row["europeana_id"], *row["duplicates"].split()]:
            assert record_id not in by_record, f"{record_id} twice"
            by_record[record_id] = set(row["labels"].split())
        assert row["group"] == row["europeana_id"].split("/")[1]  # the dataset
        assert row["rights"] == fixture.rights.get(row["europeana_id"], row["rights"])
    twin_of = fixture_record(fixture, 1)
    expected = {rid: labels for rid, labels in fixture.labels.items() if rid not in excluded}
    expected[twin_of] = expected[twin_of] | {"photograph"}
    expected[twin["id"]] = expected[twin_of]
    first_of_url = fixture_record(fixture, 2)
    expected[first_of_url] = expected[first_of_url] | {"map"}
    expected[same_url["id"]] = expected[first_of_url]
    assert by_record == expected
    assert not set(excluded) & set(by_record)
    twin_row = next(row for row in found if twin["id"] in row["duplicates"].split())
    assert twin_row["europeana_id"] == twin_of  # the first record in id order keeps the row
    assert len({row["image"] for row in found}) == len(found)

    summary = json.loads((out / "summary.json").read_text())
    failed = {item["record"]: item["reason"] for item in summary["failed"]}
    assert failed == {
        item["id"]: "blocked_address",
        missing["id"]: "http_404",
        not_image["id"]: "not_an_image",
    }
    assert summary["records"]["left_out"] == {"excluded": 3}
    assert summary["images"]["duplicates"] == 2
    assert summary["duplicates"] == [
        {"record": twin["id"], "same_image_as": twin_of},
        {"record": same_url["id"], "same_image_as": first_of_url},
    ]
    for key in VOCABULARY:
        images = sum(key in row["labels"].split() for row in found)
        assert summary["classes"][key]["images"] == images
    pairs = Counter(
        f"{a}+{b}"
        for labels in {row["europeana_id"]: row["labels"].split() for row in found}.values()
        for i, a in enumerate(labels)
        for b in labels[i + 1 :]
    )
    assert summary["co_occurrence"] == dict(pairs)
    assert set(summary["reusability"]) == {"open", "restricted", "permission"}
    assert "photograph" in result.stdout and "failures: " in result.stdout
    assert "blocked_address 1" in result.stdout

    # Each image requested once; each concept paged with the harvest's filters.
    paths = Counter(host.requests)
    assert paths and max(paths.values()) == 1
    concept_filters = {qf for request in api.requests for qf in request["qf"]}
    assert {f'skos_concept:"{uri}"' for uri in VOCABULARY.values()} <= concept_filters
    assert all("TYPE:IMAGE" in r["qf"] and r["media"] == ["true"] for r in api.requests)


def fixture_record(fixture: Fixture, index: int) -> str:
    return sorted(fixture.labels)[index + 3]  # past the three the test excludes


def fixture_image(host: ImageHost, fixture: Fixture, index: int) -> bytes:
    return host.routes[fixture.paths[fixture_record(fixture, index)]].body


def test_per_class_cap_holds_and_the_seeded_selection_is_stable(world) -> None:
    """The selection itself, without downloads: what `enrich harvest` writes is its rows."""
    api, _, fixture, _, _ = world
    client = SearchClient(Settings(europeana_api_key=KEY, europeana_api_url=api.url))

    def harvest(**options: object) -> list[Candidate]:
        chosen = HarvestOptions(**options)  # type: ignore[arg-type]
        collected = collect(client, VOCABULARY, chosen)
        return select(collected.candidates.values(), chosen.per_class, chosen.seed)

    capped = harvest(per_class=4)
    counts = Counter(label for candidate in capped for label in candidate.labels)
    # Every class reaches its cap (there are enough single-label records) and none passes it.
    assert counts == dict.fromkeys(VOCABULARY, 4)
    multilabel = [candidate for candidate in capped if len(candidate.labels) > 1]
    assert multilabel, "multilabel records are kept where the caps allow"
    for candidate in capped:
        assert candidate.labels == fixture.labels[candidate.record.id]
    assert harvest(per_class=4) == capped  # same seed, same set
    assert harvest(per_class=4, seed=7) != capped

    open_only = harvest(per_class=100, reusability=("open",))
    assert open_only and {candidate.rights for candidate in open_only} == {
        "http://creativecommons.org/publicdomain/zero/1.0/"
    }
    assert {candidate.record.id for candidate in open_only} == {
        rid for rid, rights in fixture.rights.items() if "publicdomain" in rights
    }
    assert api.requests[-1]["reusability"] == ["open"]
    assert {reusability_of(candidate.rights) for candidate in open_only} == {"open"}


def test_a_killed_harvest_continues_without_downloading_anything_again(
    world, tmp_path: Path
) -> None:
    api, host, fixture, _, vocabulary = world
    for route in host.routes.values():
        route.delay = 0.15  # a slow provider, so the kill lands mid-download
    args = ["--vocabulary", str(vocabulary), "--per-class", "100", "--no-progress"]
    env = {**os.environ, **env_for(api), "ENRICH_FETCH_PER_HOST": "2"}
    out = tmp_path / "killed"
    journal = out / ".harvest" / "downloads.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "enrichment", "harvest", *args, "--out", str(out)],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while not (journal.exists() and len(journal.read_text().splitlines()) >= 10):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = [json.loads(line)["record_id"] for line in journal.read_text().splitlines()]
    assert 10 <= len(before) < COUNT and not (out / "labels.csv").exists()
    completed = {fixture.paths[record_id] for record_id in before}
    assert Counter(host.requests)[fixture.paths[before[0]]] == 1

    again = subprocess.run(
        [sys.executable, "-m", "enrichment", "harvest", *args, "--out", str(out)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    requests = Counter(host.requests)
    assert all(requests[path] == 1 for path in completed)  # nothing it had was fetched again
    assert set(requests) == set(fixture.paths.values())  # and everything else was
    assert max(requests.values()) <= 2  # at most the downloads the kill cut short, once more

    for route in host.routes.values():
        route.delay = 0.0
    reference = tmp_path / "reference"
    fresh = enrich("harvest", *args, "--out", str(reference), env=env_for(api))
    assert fresh.returncode == 0, fresh.stderr
    assert (out / "labels.csv").read_text() == (reference / "labels.csv").read_text()
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        p.name for p in (reference / "images").iterdir()
    )


def test_a_second_harvest_into_a_directory_being_written_is_refused(world, tmp_path: Path) -> None:
    """Two at once each chose a selection and wrote it over the other's: one set silently
    became the other's (or, with the same options, every image was fetched twice)."""
    api, _, _, _, vocabulary = world
    out = tmp_path / "set"
    with HarvestDir(out).writing():  # as a harvest running in another process holds it
        result = CliRunner().invoke(
            cli, ["harvest", "--vocabulary", str(vocabulary), "--out", str(out)], env=env_for(api)
        )
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"another harvest is writing {out} right now" in result.output
    assert api.requests == [] and not (out / ".harvest" / "selection.json").exists()


def test_ctrl_c_ends_a_harvest_without_waiting_for_the_downloads_under_way(
    world, tmp_path: Path
) -> None:
    """It waited for every download already started (up to 256 at once: with a slow
    provider, minutes); the journal keeps what was done for the next start."""
    api, host, fixture, _, vocabulary = world
    for route in host.routes.values():
        route.delay = 60.0  # a provider far slower than anyone waits for Ctrl-C
    process = subprocess.Popen(
        [sys.executable, "-m", "enrichment", "harvest", "--vocabulary", str(vocabulary),
         "--out", str(tmp_path / "set"), "--no-progress"],
        env={**os.environ, **env_for(api), "ENRICH_FETCH_TIMEOUT": "120",
             "ENRICH_FETCH_READ_TIMEOUT": "120"},  # no deadline ends them first
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not host.requests:
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    try:
        returncode = process.wait(timeout=30)
    finally:
        process.kill()
    assert returncode == 130 and "interrupted" in process.stderr.read()
    # The downloads cut short are fetched on the next start, not kept as failures.
    for route in host.routes.values():
        route.delay = 0.0
    again = enrich("harvest", "--vocabulary", str(vocabulary), "--out", str(tmp_path / "set"),
                   env=env_for(api))  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert set(host.requests) == set(fixture.paths.values())
    assert all(row["image"] for row in rows(tmp_path / "set"))


def test_a_harvest_dir_is_continued_only_with_the_same_options(tmp_path: Path) -> None:
    """The selection stored first is reused for the same options and vocabulary only."""
    directory = HarvestDir(tmp_path / "set")

    def identity(options: HarvestOptions) -> dict:
        return {"options": options.as_json(), "vocabulary": VOCABULARY}

    def selection(record_id: str) -> dict:
        record = {"id": record_id, "dataset": "1", "image_url": "http://x/1.png", "labels": []}
        return {"candidates": 1, "found": {}, "left_out": {}, "records": [record]}

    made = directory.plan(identity(HarvestOptions()), lambda: selection("/1/first"))
    again = directory.plan(identity(HarvestOptions()), lambda: selection("/1/second"))
    assert again == made and made["records"][0]["id"] == "/1/first"
    with pytest.raises(InvalidValue, match="holds a harvest made with other options") as raised:
        directory.plan(identity(HarvestOptions(per_class=3)), lambda: {"records": []})
    assert raised.value.field == "out" and str(tmp_path / "set") in str(raised.value)
    # Stored as a list of groups, as harvests have always stored it.
    assert HarvestOptions(reusability=("open", "permission")).as_json()["reusability"] == [
        "open",
        "permission",
    ]
    assert HarvestOptions().as_json()["reusability"] == []


def test_continuing_a_harvest_with_other_options_is_a_usage_error(world, tmp_path: Path) -> None:
    """Exit 2, as click's own refusals: the command line is wrong, not the set; no request."""
    api, _, _, _, vocabulary = world
    out = tmp_path / "set"
    record = {"id": "/1/first", "dataset": "1", "image_url": "http://x/1.png", "labels": []}
    first = {"candidates": 1, "found": {}, "left_out": {}, "records": [record]}
    identity = {"options": HarvestOptions(per_class=3).as_json(), "vocabulary": VOCABULARY}
    HarvestDir(out).plan(identity, lambda: first)
    result = CliRunner().invoke(
        cli, ["harvest", "--vocabulary", str(vocabulary), "--out", str(out)], env=env_for(api)
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"Invalid value for '--out': {out} holds a harvest made with other options" in (
        result.output
    )
    assert api.requests == []


def test_bad_options_name_their_field(tmp_path: Path) -> None:
    """Library errors name the option's field, never a flag: the CLI's boundary adds that."""
    cases = {
        "reusability": ({"reusability": ("free",)}, "'free': each group must be one of open"),
        "concept_query": ({"concept_query": "what:x"}, "'what:x' must contain {uri}"),
        "per_class": ({"per_class": 0}, "must be at least 1, not 0"),
    }
    for field, (options, message) in cases.items():
        with pytest.raises(InvalidValue, match=re.escape(message)) as raised:
            HarvestOptions(**options)  # type: ignore[arg-type]
        assert raised.value.field == field and "--" not in str(raised.value)
    bad = tmp_path / "ids.txt"
    bad.write_text("/1/ok\nnot-an-id\n")
    with pytest.raises(InvalidValue, match=r"ids.txt:2: record id 'not-an-id'") as raised:
        read_exclusions([bad])
    assert raised.value.field == "exclude_files"
    no_column = tmp_path / "ids.csv"
    no_column.write_text("name\nx\n")
    with pytest.raises(InvalidValue, match="has no record id column") as raised:
        read_exclusions([no_column])
    assert raised.value.field == "exclude_files"


def test_reusability_takes_the_form_a_run_takes(world, tmp_path: Path) -> None:
    """Groups comma-separated, as the Search API takes them, in `run` and `harvest` alike; an
    unknown group is refused by click in one line, before any request."""
    api, _, _, _, vocabulary = world
    result = CliRunner().invoke(
        cli,
        ["harvest", "--vocabulary", str(vocabulary), "--out", str(tmp_path / "x"),
         "--reusability", "open,free"],
        env=env_for(api),
    )  # fmt: skip
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "Invalid value for '--reusability': 'open,free': each group must be" in result.output
    assert api.requests == [] and not (tmp_path / "x").exists()
    run_option = next(p for p in cli.commands["run"].params if p.name == "reusability")
    harvest_option = next(p for p in cli.commands["harvest"].params if p.name == "reusability")
    assert type(harvest_option.type) is type(run_option.type)
    assert harvest_option.type.convert("open, permission,open", None, None) == (
        "open",
        "permission",
    )
    options = HarvestOptions(reusability=("open", "permission"))
    assert concept_query("http://example.org/c", options).reusability == "open,permission"


def test_labels_are_merged_across_the_concept_queries(world, tmp_path: Path) -> None:
    """With --concept-query what:"{uri}" and no edmConcept, a record's labels can only come
    from the queries that returned it: one row, every concept whose query found it."""
    api, _, fixture, _, vocabulary = world
    for item in api.items:
        item["what"], item["edmConcept"] = item["edmConcept"], []
    out = tmp_path / "what"
    result = enrich(
        "harvest", "--vocabulary", str(vocabulary), "--out", str(out), "--per-class", "100",
        "--concept-query", 'what:"{uri}"', "--no-progress", env=env_for(api),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    found = {row["europeana_id"]: set(row["labels"].split()) for row in rows(out)}
    assert found == fixture.labels
    assert {qf for r in api.requests for qf in r["qf"]} >= {
        f'what:"{uri}"' for uri in VOCABULARY.values()
    }
