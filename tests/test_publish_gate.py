"""The publishing gate: `enrich publish --min-precision P` against the local Annotations API.

Twenty records x00-x19. Version A labelled photograph on all of them and
drawing on x00-x15, and was published. Version B then labelled photograph on
all twenty, drawing on x00-x11 and map on x00-x02. Curators reviewed B's
labels: photograph accepted on all 20, drawing accepted on x00-x05 and
rejected on x06-x11; map not at all.

By hand, with a 95 % Wilson interval:
    photograph  20/20 -> lower bound 0.839: published at 0.8 (20 updates to B)
    drawing     6/12  -> lower bound 0.254: refused, and A's 16 annotations stay as they are
                (without the gate, B would update 12 and withdraw x12-x15)
    map         0 reviewed: refused as too few (3 labels held back, nothing created)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from enrichment.cli import cli
from enrichment.errors import InvalidValue
from enrichment.publish.annotations_api import AnnotationsAPI
from enrichment.publish.export import ExportFilter
from enrichment.publish.sync import Publisher, PublishReport
from enrichment.sources.records_file import Record
from enrichment.store.database import Database
from enrichment.store.decisions import NewDecision, record_decisions
from enrichment.store.ledger import Publication
from enrichment.store.schema import Outcome
from enrichment.store.writes import (
    LabelScore,
    RecordOutcome,
    register_model,
    save_outcomes,
    upsert_records,
)
from tests.annotations_api import ITEM_BASE, AnnotationsServer
from tests.conftest import VOCABULARY

A = "pilot@aaaaaaaaaaaa"
B = "pilot@bbbbbbbbbbbb"
KEYS = ("photograph", "drawing", "map")
TOKEN = "good-token"
RECORDS = [f"/7002/x{n:02d}" for n in range(20)]


def classify(db: Database, version: str, labelled: dict[str, range]) -> None:
    """Store `version`'s results: each class labels the records of its range (score 0.9)."""
    outcomes = []
    for n, record_id in enumerate(RECORDS):
        scores = [0.9 if n in labelled.get(key, ()) else 0.1 for key in KEYS]
        labels = [
            LabelScore(key, VOCABULARY[key], 0.9) for key in KEYS if n in labelled.get(key, ())
        ]
        status = Outcome.LABELLED if labels else Outcome.BELOW_THRESHOLD
        outcomes.append(RecordOutcome(record_id, status, scores=scores, labels=labels))
    with db.transaction() as session:
        save_outcomes(session, None, version, outcomes)


@pytest.fixture
def server() -> Iterator[AnnotationsServer]:
    stand_in = AnnotationsServer()
    yield stand_in
    stand_in.close()


@pytest.fixture
def db(tmp_path: Path, server: AnnotationsServer) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path}/gate.sqlite3")
    database.upgrade()
    classes = [{"key": k, "label": k.title(), "concept": VOCABULARY[k]} for k in KEYS]
    with database.transaction() as session:
        for version in (A, B):
            register_model(session, version, "pilot", "resnet18", classes, [0.5, 0.5, 0.5])
        upsert_records(
            session,
            [
                Record(r, "7002", ITEM_BASE + r, f"https://images.example.org{r}.jpg")
                for r in RECORDS
            ],
        )
    classify(database, A, {"photograph": range(20), "drawing": range(16)})
    first = publish(database, server)
    assert (first.created, first.updated, first.withdrawn) == (36, 0, 0)
    classify(database, B, {"photograph": range(20), "drawing": range(12), "map": range(3)})
    record_decisions(
        database,
        [NewDecision(r, "photograph", B, "accept", "curator") for r in RECORDS]
        + [NewDecision(r, "drawing", B, "accept", "curator") for r in RECORDS[:6]]
        + [NewDecision(r, "drawing", B, "reject", "curator") for r in RECORDS[6:12]],
    )
    yield database
    database.dispose()


def publish(
    db: Database, server: AnnotationsServer, min_precision: float | None = None
) -> PublishReport:
    api = AnnotationsAPI(server.url, TOKEN, concurrency=2, backoff=0.01)
    try:
        publisher = Publisher(db, server.url, api, concurrency=2, page_size=8)
        return publisher.publish(ExportFilter(), min_precision=min_precision)
    finally:
        api.close()


def held(server: AnnotationsServer) -> Counter[str]:
    """The server's active annotations, counted by class key."""
    by_concept = {VOCABULARY[key]: key for key in KEYS}
    return Counter(by_concept[annotation["body"]] for annotation in server.active())


def ledger_versions(db: Database) -> Counter[tuple[str, str, str]]:
    """(class, model version, state) of the ledger's rows, counted."""
    by_concept = {VOCABULARY[key]: key for key in KEYS}
    with db.transaction() as session:
        rows = session.execute(
            sa.select(Publication.concept, Publication.model_version, Publication.state)
        ).all()
    return Counter((by_concept[concept], version, state) for concept, version, state in rows)


def test_the_gate_publishes_the_precise_class_and_leaves_the_refused_ones(
    db: Database, server: AnnotationsServer
) -> None:
    report = publish(db, server, min_precision=0.8)
    assert (report.created, report.updated, report.withdrawn) == (0, 20, 0)
    assert report.held_back == 12 + 3
    refused = {item["key"]: item for item in report.refused_classes}
    assert set(refused) == {"drawing", "map"}
    assert refused["drawing"]["model_version"] == B
    assert refused["drawing"]["reviewed"] == 12
    assert refused["drawing"]["low"] == pytest.approx(0.2538, abs=1e-4)
    assert (refused["map"]["reviewed"], refused["map"]["low"]) == (0, None)
    # photograph is B's now; drawing is A's, all sixteen, as before; no map.
    assert held(server) == Counter({"photograph": 20, "drawing": 16})
    assert ledger_versions(db) == Counter(
        {("photograph", B, "published"): 20, ("drawing", A, "published"): 16}
    )
    # Once the gate admits drawing too (a lower bar), it follows B: 6 rejected and the
    # four B no longer gives are withdrawn (the CLI's default leaves out rejected labels;
    # the library's ExportFilter takes every label, so 12 are updated here).
    second = publish(db, server, min_precision=0.2)
    assert {item["key"] for item in second.refused_classes} == {"map"}
    assert (second.created, second.updated, second.withdrawn) == (0, 12, 4)
    assert held(server) == Counter({"photograph": 20, "drawing": 12})


def test_a_dry_run_shows_the_same_and_lists_the_refused_classes(
    db: Database, server: AnnotationsServer
) -> None:
    env = {"DATABASE_URL": db.url, "EUROPEANA_ANNOTATION_API_URL": server.url}
    before = len(server.requests)
    dry = CliRunner().invoke(
        cli, ["publish", "--dry-run", "--min-precision", "0.8", "--reviewed", "any"], env=env
    )
    assert dry.exit_code == 0, dry.output
    lines = dry.output.splitlines()
    assert sum(line.startswith("would update\t") for line in lines) == 20
    assert all("\tphotograph\t" in line for line in lines if line.startswith("would "))
    assert "would create 0, update 20, withdraw 0" in dry.output
    assert "refused by --min-precision 0.8 (15 labels held back;" in dry.output
    assert f"  drawing\t{B}\t12\t0.254" in lines
    assert f"  map\t{B}\t0\ttoo few reviews" in lines
    assert len(server.requests) == before  # a dry run sends nothing

    as_json = CliRunner().invoke(
        cli, ["publish", "--dry-run", "--min-precision", "0.8", "--json"], env=env
    )
    assert as_json.exit_code == 0, as_json.output
    # The CLI's default --reviewed not-rejected leaves the six rejected drawings out first.
    assert '"held_back": 9' in as_json.output


def test_the_gate_is_refused_with_withdraw_and_out_of_range(
    db: Database, server: AnnotationsServer
) -> None:
    api = AnnotationsAPI(server.url, TOKEN, concurrency=2, backoff=0.01)
    try:
        with pytest.raises(InvalidValue, match="gates publishing, not withdrawing"):
            Publisher(db, server.url, api).publish(
                ExportFilter(), withdraw_all=True, min_precision=0.9
            )
    finally:
        api.close()
    env = {"DATABASE_URL": db.url, "EUROPEANA_ANNOTATION_API_URL": server.url}
    wrong = CliRunner().invoke(cli, ["publish", "--dry-run", "--min-precision", "1.5"], env=env)
    assert wrong.exit_code != 0 and "--min-precision" in wrong.output
