"""`enrich export` end to end: real runs of the tiny model into PostgreSQL, then the CLI."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from click.testing import Result as CliResult

from enrichment.cli import cli
from enrichment.config import Settings
from enrichment.model.spec import read_model_json
from enrichment.publish.export import ExportError, ExportFilter, Output, check_output
from enrichment.runs import service
from enrichment.store.database import Database
from enrichment.store.query import run_summary
from tests.conftest import VOCABULARY, empty_database, enrich
from tests.export_support import build_catalogue, export_text, open_database
from tests.scenario import build_scenario, run_in_process


def labels(document: dict) -> dict[tuple[str, str], float]:
    """(record, label key) -> confidence, from a W3C collection."""
    by_concept = {concept: key for key, concept in VOCABULARY.items()}
    return {
        (
            a["target"]["scope"].removeprefix("http://data.europeana.eu/item"),
            by_concept[a["body"]],
        ): a["confidence"]
        for a in document["first"]["items"]
    }


def test_export_filters_reexport_and_profiles_through_the_cli(
    tmp_path: Path, image_host, tiny_model: Path, pg_url: str
) -> None:
    """Runs through the library (`enrich run` has its own end-to-end tests), exports through
    the command, in this process: its options, its output and its files."""
    records, expected = build_scenario(image_host, tmp_path, tiny_model, prefix="/export")
    spec, version, _ = read_model_json(tiny_model)
    settings = Settings(database_url=pg_url, model_dir=tiny_model, fetch_allow=("127.0.0.1",))
    env = {"DATABASE_URL": pg_url}
    Database(pg_url).upgrade()
    lines = records.read_text().splitlines()
    first_half = tmp_path / "first.jsonl"
    first_half.write_text("\n".join(lines[:4]) + "\n")
    first_ids = {json.loads(line)["id"] for line in lines[:4]}
    first_run = run_in_process(settings, service.records_scope(first_half))
    run_in_process(settings, service.records_scope(records))

    def exported(*options: str) -> CliResult:
        done = CliRunner().invoke(cli, ["export", *options], env=env)
        assert done.exit_code == 0, done.output
        return done

    def export(*options: str) -> dict:
        return json.loads(exported(*options).stdout)

    want = {
        (record, key): confidence
        for record, item in expected.items()
        for key, confidence in item.labels.items()
    }
    everything = export()
    assert sorted(labels(everything)) == sorted(want)
    assert {a["generator"]["version"] for a in everything["first"]["items"]} == {version}
    by_run = labels(export("--run", str(first_run)))
    assert sorted(by_run) == sorted(key for key in want if key[0] in first_ids)

    # Re-running the same records with the same model gives the same annotation ids.
    again = run_in_process(settings, service.records_scope(records), full=True)
    assert run_summary(Database(pg_url), again).records_enqueued == len(expected)
    reexported = export()
    ids = [a["id"] for a in everything["first"]["items"]]
    assert [a["id"] for a in reexported["first"]["items"]] == ids
    assert json.dumps(ids) == json.dumps([a["id"] for a in reexported["first"]["items"]])

    stored = labels(reexported)
    assert all(abs(stored[key] - want[key]) < 1e-5 for key in want)
    # Selection behaviours on the real runs' rows, through the library (the options'
    # wiring is what the CLI calls around them check).
    db = Database(pg_url)
    cut = sorted(stored.values())[len(stored) // 2]
    confident = labels(json.loads(export_text(db, ExportFilter(min_confidence=cut))))
    assert sorted(confident) == sorted(k for k, c in stored.items() if c >= cut)
    assert labels(json.loads(export_text(db, ExportFilter(since=datetime(2999, 1, 1))))) == {}
    db.dispose()

    thresholds = tmp_path / "thresholds.json"
    thresholds.write_text(json.dumps({"map": 0.0, "photograph": 0.9}))
    own = {label.key: label.threshold for label in spec.classes}
    applied = np.asarray(
        [{**own, "map": 0.0, "photograph": 0.9}[label.key] for label in spec.classes], np.float32
    )
    rescored = {
        (record, label.key)
        for record, item in expected.items()
        if item.scores is not None
        for label, score in zip(spec.classes, np.float32(item.scores) >= applied, strict=True)
        if score
    }
    assert ("/e2e/white", "map") in rescored
    assert sorted(labels(export("--thresholds", str(thresholds)))) == sorted(rescored)
    assert sorted(labels(export("--since", "2000-01-01T00:00:00Z", "--dataset", "e2e"))) == sorted(
        want
    )

    out = tmp_path / "europeana.jsonld"
    paged = exported("--profile", "europeana", "--split", "2", "--out", str(out))
    pages = sorted(tmp_path.glob("europeana-*.jsonld"))
    assert len(pages) == -(-len(want) // 2)
    assert f"wrote {len(want)} annotations to {len(pages)} files" in paged.stderr
    items = [item for page in pages for item in json.loads(page.read_text())["items"]]
    assert all(item["motivation"] == "tagging" for item in items) and len(items) == len(want)


def test_export_options_that_cannot_work_are_one_line_errors(tmp_path: Path) -> None:
    env = {"DATABASE_URL": empty_database(tmp_path / "enrich.sqlite3")}
    utf16 = tmp_path / "utf16.json"
    utf16.write_bytes("{}".encode("utf-16"))
    cases = [
        (
            ("--split", "10"),
            "Invalid value for '--split': writes one file per page: it needs an output file",
        ),
        (
            ("--model-version", "nope@123"),
            "Invalid value for '--model-version': unknown model version nope@123 (known: none yet)",
        ),
        (
            ("--label", "portrait"),
            "Invalid value for '--class' / '--label': "
            "names classes no model has: portrait (known: none yet)",
        ),
        (("--since", "last week"), "'last week' is not an ISO 8601 date"),
        (
            ("--dataset", "nosuch", "--out", str(tmp_path / "none.jsonld")),
            "Invalid value for '--dataset': no record belongs to dataset nosuch",
        ),
        (("--run", "7"), "Invalid value for '--run'"),
        (
            ("--thresholds", str(tmp_path / "missing.json")),
            "Invalid value for '--thresholds': cannot read thresholds file",
        ),
        (
            ("--thresholds", str(utf16)),
            f"Invalid value for '--thresholds': thresholds file {utf16} is not UTF-8 text "
            "(byte 0xff at offset 0): save it as UTF-8",
        ),
    ]
    for options, message in cases:
        done = enrich("export", *options, env=env)
        assert done.returncode != 0
        assert message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    assert not (tmp_path / "none.jsonld").exists(), "a refused export writes no file"


def catalogue_database(tmp_path: Path) -> str:
    """The URL of a new SQLite database holding the export tests' catalogue."""
    database = f"sqlite:///{tmp_path}/enrich.sqlite3"
    db = open_database(database)
    build_catalogue(db)
    db.dispose()
    return database


@pytest.mark.parametrize(
    ("base_url", "why"),
    [
        ("notaurl", "is not an absolute http(s) URL with a host"),
        ("javascript:alert(1)", "is not an absolute http(s) URL with a host"),
        ("ftp://host/", "is not an absolute http(s) URL with a host"),
        ("https://", "is not an absolute http(s) URL with a host"),
        ("https://example.org:99999/", "is not a URL: Port out of range"),
        ("https://example.org/a?b=1", "has a query or fragment"),
        ("https://example.org/a b/", "holds a space or a character that IRIs forbid"),
    ],
)
def test_a_base_url_that_cannot_make_ids_is_refused_before_any_file_is_written(
    tmp_path: Path, base_url: str, why: str
) -> None:
    database = catalogue_database(tmp_path)
    out = tmp_path / "exports"
    out.mkdir()

    def export_to(base: str):
        return CliRunner().invoke(
            cli,
            ["export", "--out", str(out / "labels.jsonld"), "--split", "5", "--base-url", base],
            env={"DATABASE_URL": database},
        )

    refused = export_to(base_url)
    assert refused.exit_code == 1
    assert refused.output.startswith(f"Error: Invalid value for '--base-url': {base_url!r} {why}")
    assert len(refused.output.splitlines()) == 1, refused.output
    assert list(out.iterdir()) == [], "a refused export writes no file"

    # The same export with a usable base URL writes ids built on it.
    written = export_to("https://example.org/exports")
    assert written.exit_code == 0, written.output
    collection = json.loads((out / "labels.jsonld").read_text())
    assert collection["id"] == "https://example.org/exports/labels.jsonld"
    assert collection["first"].startswith("https://example.org/exports/labels-")


def test_out_dash_is_standard_output_and_base_url_needs_the_w3c_json_ld(tmp_path: Path) -> None:
    database = catalogue_database(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    done = enrich("export", "--out", "-", env={"DATABASE_URL": database}, cwd=work)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["type"] == "AnnotationCollection"
    assert list(work.iterdir()) == []  # no file named "-"
    for options in (["--format", "jsonl"], ["--profile", "europeana"]):
        output = Output(
            "europeana" if "europeana" in options else "w3c",
            "jsonl" if "jsonl" in options else "jsonld",
            work / "labels",
            None,
            "https://example.org/annotations/",
        )
        with pytest.raises(ExportError, match="only the W3C profile's JSON-LD has"):
            check_output(output)
