"""`enrich model compare A B` against counts made by hand on a small catalogue with reviews.

Version A has three classes, B four (it adds `painting`). Records r1-r4 show
every kind of change; r5 is an error for B and r6 was never classified by A,
so neither counts. p00-p11 carry the reviews of `photograph`.

    record  A labels (scores p, d, m)         B labels (scores p, d, m, painting)
    r1      photograph      (.9 .2 .1)        photograph drawing painting (.8 .6 .1 .7)
    r2      photograph drawing (.7 .6 .0)     drawing              (.3 .7 .2 .1)
    r3      map             (.1 .1 .8)        map                  (.2 .1 .9 .0)
    r4      photograph      (.6 .1 .1)        photograph           (.9 .1 .1 .0)
    r5      all three       (.9 .9 .9)        error
    r6      -                                 photograph           (.9 .0 .0 .0)
    p00-p09 photograph      (.8 0 0)          photograph           (.9 0 0 0)
    p10-p11 photograph      (.8 0 0)          none                 (.2 0 0 0)

Reviews: photograph accepted on p00-p08, rejected on p09-p11; drawing accepted
on r2 and added on r1 (A missed it, B has it); map rejected on r5 (not a
common record: it counts for no comparison).

By hand, on the 16 common records (r1-r4, p00-p11):
    photograph  kept 2 + 10, removed 1 (r2) + 2 (p10, p11), added 0
                shift ((-.1 -.4 +.1 +.3) + 10 * .1 + 2 * -.6) / 16 = -.3 / 16
                A: 12 reviewed, 9 right; B: 10 reviewed (p00-p09), 9 right
    drawing     kept 1 (r2), added 1 (r1), removed 0; shift (.4 + .1) / 16
                A: 1 reviewed (r2); B: 2 (r1 added, r2 accepted), both right
    map         kept 1 (r3); shift (.2 + .1) / 16; no reviews on common records
    painting    added 1 (r1), B only: no shift
Wilson 95 % intervals from a table: 9/12 -> [0.468, 0.911], 9/10 -> [0.596, 0.982].
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from werkzeug.datastructures import MultiDict

from enrichment.cli import cli
from enrichment.errors import InvalidValue
from enrichment.model.compare import compare, wilson
from enrichment.review.params import queue_filter
from enrichment.sources.records_file import Record
from enrichment.store.comparison import Disagreement, disagree_condition, disagreements
from enrichment.store.database import Database
from enrichment.store.decisions import NewDecision, record_decisions
from enrichment.store.retire import RetiredVersion
from enrichment.store.review_queue import MAX_LIMIT, QueueFilter, queue_page
from enrichment.store.schema import Label, Outcome
from enrichment.store.writes import (
    LabelScore,
    RecordOutcome,
    register_model,
    save_outcomes,
    upsert_records,
)
from tests.conftest import VOCABULARY

A = "pilot@aaaaaaaaaaaa"
B = "pilot@bbbbbbbbbbbb"
KEYS_A = ("photograph", "drawing", "map")
KEYS_B = ("photograph", "drawing", "map", "painting")

SCORES_A = {
    "r1": [0.9, 0.2, 0.1],
    "r2": [0.7, 0.6, 0.0],
    "r3": [0.1, 0.1, 0.8],
    "r4": [0.6, 0.1, 0.1],
    "r5": [0.9, 0.9, 0.9],
    **{f"p{n:02d}": [0.8, 0.0, 0.0] for n in range(12)},
}
SCORES_B = {
    "r1": [0.8, 0.6, 0.1, 0.7],
    "r2": [0.3, 0.7, 0.2, 0.1],
    "r3": [0.2, 0.1, 0.9, 0.0],
    "r4": [0.9, 0.1, 0.1, 0.0],
    "r6": [0.9, 0.0, 0.0, 0.0],
    **{f"p{n:02d}": [0.9, 0.0, 0.0, 0.0] for n in range(10)},
    **{f"p{n:02d}": [0.2, 0.0, 0.0, 0.0] for n in (10, 11)},
}


def record_id(name: str) -> str:
    return f"/7001/{name}"


def classify(db: Database, version: str, keys: tuple[str, ...], scores: dict) -> None:
    outcomes = []
    for name, vector in scores.items():
        labels = [
            LabelScore(key, VOCABULARY[key], score)
            for key, score in zip(keys, vector, strict=True)
            if score >= 0.5
        ]
        status = Outcome.LABELLED if labels else Outcome.BELOW_THRESHOLD
        outcomes.append(RecordOutcome(record_id(name), status, scores=vector, labels=labels))
    with db.transaction() as session:
        save_outcomes(session, None, version, outcomes)


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        database = Database(f"sqlite:///{tmp_path}/compare.sqlite3")
    else:
        database = Database(request.getfixturevalue("pg_url"))
    database.upgrade()
    names = sorted({*SCORES_A, *SCORES_B})
    with database.transaction() as session:
        for version, keys in ((A, KEYS_A), (B, KEYS_B)):
            classes = [{"key": k, "label": k.title(), "concept": VOCABULARY[k]} for k in keys]
            register_model(session, version, "pilot", "resnet18", classes, [0.5] * len(keys))
        upsert_records(
            session,
            [
                Record(record_id(n), "7001", "http://data.europeana.eu/item" + record_id(n), None)
                for n in names
            ],
        )
    classify(database, A, KEYS_A, SCORES_A)
    classify(database, B, KEYS_B, SCORES_B)
    with database.transaction() as session:
        save_outcomes(session, None, B, [RecordOutcome.failed(record_id("r5"), "http_404", "gone")])

    def decide(name: str, key: str, decision: str, version: str = A) -> NewDecision:
        return NewDecision(record_id(name), key, version, decision, "curator")

    record_decisions(
        database,
        [decide(f"p{n:02d}", "photograph", "accept") for n in range(9)]
        + [decide(f"p{n:02d}", "photograph", "reject") for n in (9, 10, 11)]
        + [
            decide("r2", "drawing", "accept"),
            decide("r1", "drawing", "add"),
            decide("r5", "map", "reject"),
        ],
    )
    yield database
    database.dispose()


def test_the_comparison_matches_the_hand_counts(db: Database) -> None:
    comparison = compare(db, A, B)
    assert comparison.records == 16
    by_key = {item.key: item for item in comparison.classes}
    assert list(by_key) == ["photograph", "drawing", "map", "painting"]
    counts = {key: (c.added, c.removed, c.kept) for key, c in by_key.items()}
    assert counts == {
        "photograph": (0, 3, 12),
        "drawing": (1, 0, 1),
        "map": (0, 0, 1),
        "painting": (1, 0, 0),
    }
    assert by_key["photograph"].score_shift == pytest.approx(-0.3 / 16, abs=1e-6)
    assert by_key["drawing"].score_shift == pytest.approx(0.5 / 16, abs=1e-6)
    assert by_key["map"].score_shift == pytest.approx(0.3 / 16, abs=1e-6)
    assert by_key["painting"].score_shift is None
    assert (by_key["painting"].in_a, by_key["painting"].in_b) == (False, True)

    photograph = by_key["photograph"]
    assert (photograph.precision_a.reviewed, photograph.precision_a.correct) == (12, 9)
    assert (photograph.precision_b.reviewed, photograph.precision_b.correct) == (10, 9)
    interval_a, interval_b = photograph.precision_a.interval, photograph.precision_b.interval
    assert interval_a is not None and interval_b is not None
    assert (interval_a.estimate, round(interval_a.low, 3), round(interval_a.high, 3)) == (
        0.75,
        0.468,
        0.911,
    )
    assert (interval_b.estimate, round(interval_b.low, 3), round(interval_b.high, 3)) == (
        0.9,
        0.596,
        0.982,
    )
    drawing = by_key["drawing"]
    assert (drawing.precision_a.reviewed, drawing.precision_a.correct) == (1, 1)
    assert (drawing.precision_b.reviewed, drawing.precision_b.correct) == (2, 2)
    assert drawing.precision_b.too_few_reviews and drawing.precision_b.interval is None
    # r5's rejected map is not on a common record.
    assert by_key["map"].precision_a.reviewed == 0


def test_the_disagreements_are_the_labels_one_version_gives(db: Database) -> None:
    found = list(disagreements(db, A, B))
    expected = [
        Disagreement(record_id("p10"), "photograph", A),
        Disagreement(record_id("p11"), "photograph", A),
        Disagreement(record_id("r1"), "drawing", B),
        Disagreement(record_id("r1"), "painting", B),
        Disagreement(record_id("r2"), "photograph", A),
    ]
    assert found == expected
    # The same rule as an SQL condition, as a review queue filter would use it.
    condition = disagree_condition(Label.record_id, Label.label_key, A, B)
    with db.transaction() as session:
        pairs = set(
            session.execute(
                sa.select(Label.record_id, Label.label_key).distinct().where(condition)
            ).all()
        )
    assert pairs == {(item.record_id, item.label_key) for item in expected}


def test_the_command_prints_the_table_json_and_html(db: Database, tmp_path: Path) -> None:
    env = {"DATABASE_URL": db.url}
    page = tmp_path / "compare.html"
    table = CliRunner().invoke(cli, ["model", "compare", A, B, "--html", str(page)], env=env)
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0] == f"{B} against {A}: 16 records classified by both"
    photograph = next(line for line in lines if line.strip().startswith("photograph"))
    assert photograph.split()[:5] == ["photograph", "0", "3", "12", "-0.019"]
    assert "0.75 [0.47, 0.91] n=12" in photograph and "0.90 [0.60, 0.98] n=10" in photograph
    drawing = next(line for line in lines if line.strip().startswith("drawing"))
    assert "too few reviews (n=1)" in drawing and "too few reviews (n=2)" in drawing

    html = page.read_text(encoding="utf-8")
    assert '<tr data-class="photograph">' in html
    assert "0.750 [0.468, 0.911]" in html and "9/12" in html
    assert "too few reviews (n=2, needs 10)" in html
    assert "default-src 'none'" in html

    as_json = CliRunner().invoke(cli, ["model", "compare", A, B, "--json"], env=env)
    assert as_json.exit_code == 0, as_json.output
    document = json.loads(as_json.output)
    classes = {item["key"]: item for item in document["classes"]}
    assert document["records"] == 16
    assert classes["painting"]["added"] == 1 and classes["painting"]["score_shift"] is None
    assert classes["photograph"]["precision_b"]["precision"]["estimate"] == 0.9
    assert classes["map"]["precision_b"] == {
        "reviewed": 0,
        "correct": 0,
        "too_few_reviews": True,
        "precision": None,
    }

    listed = CliRunner().invoke(cli, ["model", "compare", A, B, "--disagreements"], env=env)
    assert listed.exit_code == 0, listed.output
    assert listed.output.splitlines()[2] == f"{record_id('r1')}\tdrawing\t{B}"
    assert len(listed.output.splitlines()) == 5


def test_unknown_and_equal_versions_are_refused(db: Database) -> None:
    env = {"DATABASE_URL": db.url}
    unknown = CliRunner().invoke(cli, ["model", "compare", A, "pilot@cccccccccccc"], env=env)
    assert unknown.exit_code != 0
    assert "unknown model version pilot@cccccccccccc" in unknown.output
    same = CliRunner().invoke(cli, ["model", "compare", A, A], env=env)
    assert same.exit_code != 0 and "not with itself" in same.output


def test_the_table_marks_a_class_only_one_version_has(db: Database) -> None:
    env = {"DATABASE_URL": db.url}
    for first, second, mark in ((A, B, "painting (B only)"), (B, A, "painting (A only)")):
        table = CliRunner().invoke(cli, ["model", "compare", first, second], env=env)
        assert table.exit_code == 0, table.output
        rows = [line.strip() for line in table.output.splitlines()[2:]]
        marked = [row for row in rows if "only)" in row]
        assert len(marked) == 1 and marked[0].startswith(mark), table.output
        assert marked[0].split()[3:7] == (
            ["1", "0", "0", "-"] if first == A else ["0", "1", "0", "-"]
        )


def test_a_retired_version_is_refused_rather_than_compared_as_empty(db: Database) -> None:
    env = {"DATABASE_URL": db.url}
    retired = CliRunner().invoke(cli, ["model", "retire", B, "--yes"], env=env)
    assert retired.exit_code == 0, retired.output
    for args in ([A, B], [B, A], [A, B, "--json"], [A, B, "--disagreements"]):
        result = CliRunner().invoke(cli, ["model", "compare", *args], env=env)
        assert result.exit_code == 1, result.output
        assert result.output.startswith(f"Error: cannot compare {args[0]} with {args[1]}: ")
        assert f"model version {B} was retired on " in result.output
        assert "its results and labels were removed" in result.output
        assert len(result.output.splitlines()) == 1
    with pytest.raises(RetiredVersion, match=f"model version {B} was retired"):
        compare(db, A, B)


def test_wilson_matches_a_published_table() -> None:
    # Newcombe (1998), table I: 81/263 -> 0.2553 to 0.3662.
    interval = wilson(81, 263)
    assert interval is not None
    assert (round(interval.low, 4), round(interval.high, 4)) == (0.2553, 0.3662)


def test_the_review_queue_shows_the_disagreements(db: Database) -> None:
    """The review app's `disagree=A,B` filter: the same (record, class) pairs as
    `disagreements`, pending ones without a decision, unknown versions refused."""
    everything = queue_page(db, QueueFilter(disagree=(A, B), state="any", limit=MAX_LIMIT))
    assert {(item.record_id, item.label_key) for item in everything.items} == {
        (record_id("p10"), "photograph"),
        (record_id("p11"), "photograph"),
        (record_id("r1"), "drawing"),
        (record_id("r1"), "painting"),
        (record_id("r2"), "photograph"),
    }
    margins = [abs(item.confidence - item.threshold) for item in everything.items]
    assert margins == sorted(margins)
    pending = queue_page(db, QueueFilter(disagree=(A, B), limit=MAX_LIMIT))
    assert {(item.record_id, item.label_key) for item in pending.items} == {
        (record_id("r1"), "painting"),
        (record_id("r2"), "photograph"),
    }
    with pytest.raises(InvalidValue, match="unknown model version pilot@nothing"):
        queue_page(db, QueueFilter(disagree=(A, "pilot@nothing")))
    with pytest.raises(InvalidValue, match="two different model versions"):
        queue_page(db, QueueFilter(disagree=(A, A)))
    args = MultiDict({"disagree": f"{A},{B}", "state": "any"})
    assert queue_filter(args, 50).disagree == (A, B)
    with pytest.raises(InvalidValue, match="A,B"):
        queue_filter(MultiDict({"disagree": A}), 50)
