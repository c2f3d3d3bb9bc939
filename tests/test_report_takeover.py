"""`enrich report` of a run whose results are no longer all its own says so: a later run
took some over, or its model version was retired. The summary's outcomes are what the run
did and the class figures what it still holds; the page used to show both with no word
between them ("8 labelled" above, "0 labelled" and "No record got this label" below)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

from tests.conftest import enrich_here, write_jsonl
from tests.scenario import build_scenario
from tests.test_report import Node, parse, rows


def report(run: int, out: Path, env: dict[str, str]) -> Node:
    made = enrich_here("report", str(run), "--out", str(out), "--per-class", "2", env=env)
    assert made.returncode == 0, made.stderr
    return parse(Path(made.stdout.strip()).read_text(encoding="utf-8"))


def note(page: Node) -> str:
    """The summary's note on the run's results, in one line."""
    found = page.one("section", id="summary").by("div", id="holdings")
    return " ".join(found[0].text().split()) if found else ""


def class_figures(page: Node) -> list[tuple[int, int]]:
    """Each class's (labels, records scored), from the labels table."""
    return [
        (int(row[3]), int(row[4])) for row in rows(page.one("section", id="labels").one("table"))
    ]


def empty_galleries(page: Node) -> list[str]:
    return [
        " ".join(block.one("p").text().split())
        for block in page.one("section", id="gallery").by("section", class_="class")
        if not block.all("figure")
    ]


def test_the_report_says_what_later_runs_and_a_retirement_took_from_a_run(
    image_host, tiny_model: Path, tmp_path: Path
) -> None:
    """The commands in this process (`enrich_here`): each has its own subprocess test."""
    records, expected = build_scenario(image_host, tmp_path, tiny_model, prefix="/takeover")
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path}/enrich.sqlite3",
        "ENRICH_MODEL": str(tiny_model),
        "ENRICH_FETCH_ALLOW": "127.0.0.1",
    }
    first = enrich_here("run", "--records", str(records), "--json", env=env)
    assert first.returncode == 0, first.stderr
    version = json.loads(first.stdout)["model_version"]
    labelled = [record for record, want in expected.items() if want.labels]
    assert 0 < len(labelled) < len(expected)
    before = report(1, tmp_path / "before", env)
    assert note(before) == ""
    assert sum(labels for labels, _ in class_figures(before)) > 0

    # Run 2 failed before it wrote any result (a bad query, say): it replaced nothing.
    engine = sa.create_engine(env["DATABASE_URL"])
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO runs (id, kind, scope, model_version, status, queue, records_seen,"
                " records_enqueued, batches_total, created_at, started_at) VALUES (2, 'on_demand',"
                " '{}', :version, 'failed', 'enrich.on_demand', 0, 0, 0, :now, :now)"
            ),
            {"version": version, "now": datetime.now(UTC).replace(tzinfo=None)},
        )
    engine.dispose()
    # Run 3 classifies the labelled records again: their results, and labels, are its own now.
    again = write_jsonl(
        tmp_path / "again.jsonl",
        [row for row in map(json.loads, records.read_text().splitlines()) if row["id"] in labelled],
    )
    second = enrich_here("run", "--records", str(again), "--full", "--json", env=env)
    assert second.returncode == 0, second.stderr
    page = report(1, tmp_path / "after", env)
    done, kept = len(expected), len(expected) - len(labelled)
    assert note(page) == (
        f"{len(labelled)} of this run's {done} results have since been replaced by other runs "
        f"classifying the same records again (run 3). The outcomes below are what the run did; "
        f"the class figures count the {kept} results of {version} it still holds."
    )
    outcomes = {name: int(count) for name, count in rows(page.one("table", id="outcomes"))}
    assert sum(outcomes.values()) == done and outcomes["labelled"] == len(labelled)
    scored = sum(1 for want in expected.values() if want.scores is not None) - len(labelled)
    assert class_figures(page) == [(0, scored)] * len(class_figures(page))
    assert set(empty_galleries(page)) == {"No result of this run still holds this label."}
    assert note(report(3, tmp_path / "after", env)) == ""

    retired = enrich_here("model", "retire", version, "--yes", env=env)
    assert retired.returncode == 0, retired.stderr
    engine = sa.create_engine(env["DATABASE_URL"])
    with engine.connect() as connection:
        (when,) = connection.execute(sa.text("SELECT retired_at FROM models")).one()
    engine.dispose()
    page = report(1, tmp_path / "retired", env)
    assert note(page) == (
        f"Model version {version} was retired on {str(when)[:19]} UTC: its results and labels "
        f"were removed. The outcomes below are what the run did; the class figures count the "
        f"0 results of {version} it still holds."
    )
    assert class_figures(page) == [(0, 0)] * len(class_figures(page))
    assert set(empty_galleries(page)) == {"No result of this run still holds this label."}
