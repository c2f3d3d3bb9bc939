"""The store's shapes for scale give exactly the answers the old shapes gave, on both databases.

`results --dataset` pages by (dataset, record id) instead of by a condition on
`results`; the review rule reads each label's last decision by index instead of
every last decision; result rows are stored compactly (`store.columns`, the
image URL only where it is not the record's). Each is checked against what was
written, or against the old query kept here as the reference, on small
databases where both can be computed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy import event

from enrichment.sources.records_file import Record
from enrichment.store import query
from enrichment.store.batches import stored_scores
from enrichment.store.database import Database
from enrichment.store.publications import known_account
from enrichment.store.query import RecordResult, record_results
from enrichment.store.reporting import reading_run
from enrichment.store.reviews import REVIEWED, TAKE_BACK, Decision, Review, latest_decisions
from enrichment.store.schema import Label, Outcome, Result, Run
from enrichment.store.selection import (
    Selection,
    _labels_query,
    count_left_out_by_reviews,
    stored_labels,
)
from enrichment.store.writes import (
    LabelScore,
    RecordOutcome,
    register_model,
    save_outcomes,
    upsert_records,
)
from tests.conftest import upgraded_database

OLD, NEW = "m@000000000001", "m@000000000002"
KEYS = ("photograph", "drawing", "map")
CLASSES = [{"key": key, "label": key.title(), "concept": f"urn:{key}"} for key in KEYS]
THRESHOLDS = [0.5, 0.4, 0.6]
# Uneven datasets, one name a prefix of another.
DATASETS = {"7": 23, "70": 9, "700": 14}


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    database = upgraded_database(request, tmp_path)
    yield database
    database.dispose()


def image(record_id: str) -> str:
    return f"https://images.example.org{record_id}.jpg"


def scores_of(number: int, version: str) -> list[float]:
    """6-decimal scores, as the pipeline stores them."""
    rng = np.random.default_rng(number * 7 + (version == NEW))
    return [float(score) for score in np.round(rng.random(len(KEYS)), 6)]


def outcome(record_id: str, number: int, version: str) -> RecordOutcome:
    if number % 5 == 4:
        return RecordOutcome.failed(record_id, "http_404", "gone", image_url=image(record_id))
    scores = scores_of(number, version)
    labels = [
        LabelScore(key, f"urn:{key}", score)
        for key, score, threshold in zip(KEYS, scores, THRESHOLDS, strict=True)
        if score >= threshold
    ]
    # Some results were classified from another URL than the record's today.
    url = image(record_id) if number % 3 else f"https://elsewhere.example.org{record_id}.png"
    return RecordOutcome(
        record_id,
        Outcome.LABELLED if labels else Outcome.BELOW_THRESHOLD,
        scores=scores,
        labels=labels,
        image_url=url,
        image_sha256=f"{number:064x}",
    )


def fill(db: Database) -> dict[tuple[str, str], RecordOutcome]:
    """Records in uneven datasets; OLD over all of them (run 1), NEW over every other (run 2)."""
    written: dict[tuple[str, str], RecordOutcome] = {}
    with db.transaction() as session:
        for version in (OLD, NEW):
            register_model(session, version, "m", "resnet18", CLASSES, THRESHOLDS)
        for number, version in ((1, OLD), (2, NEW)):
            session.add(
                Run(
                    id=number,
                    kind="full",
                    scope={"source": "records_file"},
                    model_version=version,
                    status="completed",
                    queue="enrich",
                )
            )
        upsert_records(
            session,
            [
                Record(
                    f"/{dataset}/r{n:03d}",
                    dataset,
                    f"http://item/{dataset}/{n}",
                    image(f"/{dataset}/r{n:03d}"),
                )
                for dataset, size in DATASETS.items()
                for n in range(size)
            ],
        )
    number = 0
    for dataset, size in DATASETS.items():
        for version, run_id in ((OLD, 1), (NEW, 2)):
            batch = []
            for n in range(size):
                if version == NEW and n % 2:
                    continue
                record_id = f"/{dataset}/r{n:03d}"
                made = outcome(record_id, number + n, version)
                written[(record_id, version)] = (made, run_id)
                batch.append(made)
            with db.transaction() as session:
                save_outcomes(session, run_id, version, batch)
        number += size
    return written


def expected(written, dataset: str | None = None, run_id: int | None = None) -> list[RecordResult]:
    """What `results` must list, from what was written (labels most confident first)."""
    rows = []
    for (record_id, version), (made, run) in sorted(written.items()):
        if dataset is not None and record_id.split("/")[1] != dataset:
            continue
        if run_id is not None and run != run_id:
            continue
        labels = sorted(made.labels, key=lambda label: -label.confidence)
        rows.append(
            RecordResult(
                record_id,
                version,
                run,
                made.status,
                made.error_reason,
                made.error_message,
                made.image_url,
                [{"key": x.key, "concept": x.concept, "confidence": x.confidence} for x in labels],
            )
        )
    return rows


def test_results_of_a_dataset_page_by_its_records_and_list_what_was_written(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    written = fill(db)
    monkeypatch.setattr(query, "PAGE", 4)  # many pages, some of them ending mid-dataset
    for dataset in DATASETS:
        assert list(record_results(db, datasets=[dataset])) == expected(written, dataset)
        assert list(record_results(db, 2, [dataset])) == expected(written, dataset, 2)
    # Several datasets: one after another, each in record id order.
    both = list(record_results(db, datasets=["700", "7"]))
    assert both == expected(written, "7") + expected(written, "700")
    # Every result, and some records by id, keyed on (record, version) as before.
    assert list(record_results(db)) == expected(written)
    assert list(record_results(db, 1)) == expected(written, run_id=1)
    some = ["/70/r002", "/7/r010", "/nowhere/r1"]
    assert [r.record_id for r in record_results(db, record_ids=some)] == [
        "/7/r010",
        "/7/r010",
        "/70/r002",
        "/70/r002",
    ]
    assert list(record_results(db, datasets=["70"], record_ids=some)) == [
        r for r in expected(written, "70") if r.record_id == "/70/r002"
    ]
    assert list(record_results(db, datasets=["nowhere"])) == []


def test_compact_rows_read_back_as_written(db: Database) -> None:
    written = fill(db)
    with db.engine.connect() as connection:
        stored = {
            (row.record_id, row.model_version): row
            for row in connection.execute(
                sa.text("SELECT record_id, model_version, image_url, image_sha256 FROM results")
            )
        }
    for key, (made, _) in written.items():
        raw = stored[key]
        # The record's own URL is not stored again; another one is.
        assert raw.image_url == (None if made.image_url == image(key[0]) else made.image_url)
        if made.image_sha256 is not None:
            assert bytes(raw.image_sha256) == bytes.fromhex(made.image_sha256)
    # The dedupe of identical images reads the digests and scores back as written.
    classified = {
        made.image_sha256: made.scores
        for (_, version), (made, _) in written.items()
        if version == OLD and made.scores is not None
    }
    assert stored_scores(db, OLD, sorted(classified)) == classified


def test_a_result_keeps_its_image_url_when_its_records_changes(db: Database) -> None:
    record = Record("/5/a", "5", "http://item/5/a", "http://img/old.jpg")
    raw_float32 = float(np.float32(0.4691314697265625))  # a model's output, not rounded
    with db.transaction() as session:
        register_model(session, OLD, "m", "resnet18", CLASSES, THRESHOLDS)
        upsert_records(session, [record, Record("/5/b", "5", "http://item/5/b", "http://img/b")])
    with db.transaction() as session:
        save_outcomes(
            session,
            None,
            OLD,
            [
                RecordOutcome(
                    "/5/a",
                    Outcome.BELOW_THRESHOLD,
                    [0.000001, 0.999999, raw_float32],
                    image_url="http://img/old.jpg",
                ),
                # No image although the record has one (an error before any fetch).
                RecordOutcome.failed("/5/b", "no_image", "none"),
            ],
        )
    with db.transaction() as session:
        upsert_records(session, [replace(record, image_url="http://img/new.jpg")])
    first, second = record_results(db, datasets=["5"])
    assert (first.image_url, second.image_url) == ("http://img/old.jpg", None)
    (scored,) = [row for row in query_scores(db) if row[0] == "/5/a"]
    assert scored[1] == [0.000001, 0.999999, raw_float32]


def query_scores(db: Database) -> list[tuple[str, list[float]]]:

    with db.transaction() as session:
        return [tuple(row) for row in session.execute(sa.select(Result.record_id, Result.scores))]


def old_reviewed_condition(reviewed: str) -> sa.ColumnElement[bool]:
    """The rule as it was: the label's pair among every (record, class)'s last decision."""
    decisions = latest_decisions()
    decided = sa.select(decisions.c.id).where(
        decisions.c.record_id == Label.record_id, decisions.c.label_key == Label.label_key
    )
    if reviewed == "accepted":
        return decided.where(decisions.c.decision.in_(Decision.POSITIVE)).exists()
    return ~decided.where(decisions.c.decision == Decision.REJECT).exists()


def test_the_review_rule_by_index_keeps_the_labels_the_old_rule_kept(db: Database) -> None:
    fill(db)
    labels = [(row.record_id, row.label_key) for row in stored_labels(db, Selection())]
    assert len(labels) > 12
    histories = [
        [Decision.ACCEPT],
        [Decision.REJECT],
        [Decision.REJECT, Decision.ACCEPT],
        [Decision.ACCEPT, Decision.REJECT],
        [Decision.ADD],
        [Decision.REJECT, TAKE_BACK],  # the rejection taken back: no decision stands
        [Decision.ACCEPT, Decision.REJECT, TAKE_BACK],  # back to the acceptance
        [Decision.REJECT, Decision.REJECT, TAKE_BACK],  # the first rejection stands
    ]
    with db.transaction() as session:
        for (record_id, key), history in zip(labels[::2], histories, strict=False):
            ids = []
            for decision in history:
                row = Review(
                    record_id=record_id,
                    label_key=key,
                    model_version=OLD,
                    decision=decision,
                    reviewer="curator",
                    reverses=ids[-1] if decision == TAKE_BACK else None,
                )
                session.add(row)
                session.flush()
                ids.append(row.id)
    for reviewed in REVIEWED:
        for selection in (
            Selection(reviewed=reviewed),
            Selection(reviewed=reviewed, datasets=["7"]),
        ):
            new = [(row.record_id, row.label_key) for row in stored_labels(db, selection)]
            reference = _labels_query(replace(selection, reviewed="any"))
            if reviewed != "any":
                reference = reference.where(old_reviewed_condition(reviewed))
            with db.transaction() as session:
                old = sorted((row.record_id, row.label_key) for row in session.execute(reference))
            assert sorted(new) == old
            left_out = count_left_out_by_reviews(db, selection)
            everything = len(list(stored_labels(db, replace(selection, reviewed="any"))))
            assert left_out == everything - len(old)
    rejected = [(row.record_id, row.label_key) for row in stored_labels(db, Selection())]
    kept = [
        (row.record_id, row.label_key)
        for row in stored_labels(db, Selection(reviewed="not-rejected"))
    ]
    assert len(rejected) - len(kept) == 3  # rejected; accepted then rejected; rejected twice


def test_the_report_galleries_read_the_runs_labels_by_confidence(db: Database) -> None:
    written = fill(db)
    with reading_run(db, 1) as reading:
        for key in KEYS:
            ranking = sorted(
                (
                    (-label.confidence, record_id)
                    for (record_id, version), (made, run) in written.items()
                    if run == 1
                    for label in made.labels
                    if label.key == key
                ),
            )
            top = [record_id for _, record_id in ranking[:5]]
            assert [shown.record_id for shown in reading.most_confident(key, 5)] == top
            bottom = [record_id for _, record_id in reversed(ranking)][:5]
            assert [shown.record_id for shown in reading.least_confident(key, 5)] == bottom


def plans_of(
    db: Database, read: Callable[[], object], ruled_out: tuple[str, ...] = ("seqscan",)
) -> list[str]:
    """The PostgreSQL plans of the SELECTs `read` runs, with sequential scans (and any other
    plan node in `ruled_out`) ruled out: what the indexes can serve, and the plan a large
    table gets (a small table's cheapest plan would be a scan anyway)."""
    statements: list[tuple[str, Any]] = []

    def grab(conn, cursor, statement, parameters, context, executemany) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            statements.append((statement, parameters))

    event.listen(db.engine, "before_cursor_execute", grab)
    try:
        read()
    finally:
        event.remove(db.engine, "before_cursor_execute", grab)
    raw = db.engine.raw_connection()
    try:
        cursor = raw.cursor()
        for node in ruled_out:
            cursor.execute(f"SET enable_{node} = off")
        plans = []
        for statement, parameters in statements:
            cursor.execute("EXPLAIN " + statement, parameters)
            plans.append("\n".join(row[0] for row in cursor.fetchall()))
        return plans
    finally:
        raw.close()


def test_the_indexes_serve_the_lookups_that_must_not_grow(pg_url: str) -> None:
    db = Database(pg_url)
    db.upgrade()
    written = fill(db)
    digest = next(made.image_sha256 for made, _ in written.values() if made.scores)

    def gallery() -> None:
        with reading_run(db, 1) as reading:
            reading.most_confident("map", 3)

    checks = {
        "ix_results_image_version": lambda: stored_scores(db, OLD, [digest]),
        # A dataset's records: a range of the primary key (tests/test_record_bytes.py).
        "records_pkey": lambda: list(record_results(db, datasets=["70"])),
        "ix_labels_class_confidence": gallery,
        "ix_publications_account": lambda: known_account(db, "http://annotations"),
    }
    for index, read in checks.items():
        assert any(index in plan for plan in plans_of(db, read)), index
    db.dispose()


def test_every_page_of_a_runs_results_starts_the_records_at_its_cursor(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`results --run N` and `results` page through every result; a page whose join read the
    records' index from its start (no bound on that side) made the whole listing quadratic."""
    db = Database(pg_url)
    db.upgrade()
    written = fill(db)
    monkeypatch.setattr(query, "PAGE", 5)
    for run_id in (1, None):
        listed = [(r.record_id, r.model_version) for r in record_results(db, run_id=run_id)]
        assert listed == sorted(k for k, (_, run) in written.items() if run_id in (None, run))
        # The plan of a large collection: the pages' merge join of both primary keys.
        plans = plans_of(
            db,
            lambda run_id=run_id: list(record_results(db, run_id=run_id)),
            ruled_out=("seqscan", "nestloop", "hashjoin", "bitmapscan", "sort"),
        )
        pages = [plan for plan in plans if "Merge Join" in plan]
        assert len(pages) > 3
        for plan in pages[1:]:  # every page after the first has a cursor
            lines = plan.splitlines()
            scans = [n for n, line in enumerate(lines) if "using records_pkey" in line]
            assert scans, plan
            for n in scans:
                assert "Index Cond" in lines[n + 1], plan
    db.dispose()


def test_labels_store_their_classes_concept_once_and_read_it_back(db: Database) -> None:
    written = fill(db)
    odd = RecordOutcome(
        "/70/r001",
        Outcome.LABELLED,
        [0.9, 0.1, 0.1],
        [LabelScore("photograph", "urn:not-the-class", 0.9)],
        image_url=image("/70/r001"),
    )
    with db.transaction() as session:
        save_outcomes(session, 1, OLD, [odd])
    written[("/70/r001", OLD)] = (odd, 1)
    with db.engine.connect() as connection:
        stored = connection.execute(
            sa.text("SELECT concept, count(*) FROM labels GROUP BY concept")
        ).all()
    assert dict(stored)["urn:not-the-class"] == 1
    assert dict(stored)[""] == sum(len(made.labels) for made, _ in written.values()) - 1
    exported = {
        (row.record_id, row.model_version, row.label_key): row.concept
        for row in stored_labels(db, Selection(model_version=OLD))
    }
    assert exported == {
        (record_id, version, label.key): label.concept
        for (record_id, version), (made, _) in written.items()
        if version == OLD and made.scores is not None
        for label in made.labels
    }
    assert list(record_results(db)) == expected(written)
    # A class given another concept keeps the old one on the labels it gave before.
    renamed = [
        {**entry, "concept": "urn:new"} if entry["key"] == "map" else entry for entry in CLASSES
    ]
    with db.transaction() as session:
        register_model(session, OLD, "m", "resnet18", renamed, THRESHOLDS)
    assert list(record_results(db)) == expected(written)
