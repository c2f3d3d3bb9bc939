"""The review index gives exactly the answers the scans of `results` gave, on SQLite and
PostgreSQL: the same queue, page after page (keyset and offset), in every state, for one
class and all, one dataset and all, a run and a model version; the same audit population;
the same stats. The database has two model versions over overlapping classes (the second
over half the records, some of its results errors, some records classified by the first
again after it), scores rounded to ties, fallback labels below threshold, decisions, audit
decisions and take-backs, and a recalibrated model version (the index rebuilt).

The reference is the scan the queue still uses for what the index does not hold
(`review_scan.scanned_rows`, over the whole item set), and the window function that picks a record's
current result (`current.newest_classified`) over every record.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from enrichment.review.stats import _one_class, class_stats
from enrichment.sources.records_file import Record
from enrichment.store import review_index
from enrichment.store.current import newest_classified
from enrichment.store.database import Database
from enrichment.store.decisions import (
    NewDecision,
    record_decisions,
    standing_decisions,
    take_back_decisions,
)
from enrichment.store.models import model_classes
from enrichment.store.relabel import finish_relabelling
from enrichment.store.review_index import ReviewItem
from enrichment.store.review_queue import (
    MAX_LIMIT,
    Item,
    QueueFilter,
    queue_page,
    queue_progress,
)
from enrichment.store.review_scan import scanned_item, scanned_rows
from enrichment.store.reviews import Decision
from enrichment.store.schema import Outcome, Result, Run
from enrichment.store.writes import (
    LABEL_COLUMNS,
    LabelScore,
    RecordOutcome,
    register_model,
    save_outcomes,
    upsert_records,
)

OLD, NEW = "pilot-v1", "pilot-v2"
OLD_KEYS = ("map", "photo", "drawing", "textile", "coin", "poster")
NEW_KEYS = ("map", "photo", "drawing", "textile", "coin", "ceramic")
OLD_THRESHOLDS = [0.5, 0.3, 0.45, 0.6, 0.35, 0.5]
RECALIBRATED = [0.4, 0.3, 0.5, 0.55, 0.35, 0.2]
NEW_THRESHOLDS = [0.55, 0.35, 0.4, 0.5, 0.3, 0.45]
DATASETS = ("100", "200", "300", "400")
RECORDS = 1200


def classes(keys: tuple[str, ...]) -> list[dict[str, str]]:
    return [{"key": k, "label": k.title(), "concept": f"http://vocab.test/{k}"} for k in keys]


def record_id(number: int) -> str:
    """Ids of mixed case, so that collation-dependent order is exercised."""
    dataset = DATASETS[min(number * number // 200_000, 3)]
    return f"/{dataset}/{'Rec' if number % 3 == 0 else 'rec'}{number:05d}"


def outcome(rng: random.Random, rid: str, keys, thresholds, fails: float) -> RecordOutcome:
    if rng.random() < fails:
        return RecordOutcome.failed(rid, "fetch_failed", "the image server said 404")
    scores = [
        round(rng.betavariate(0.4, 6) if rng.random() < 0.7 else rng.random(), 2) for _ in keys
    ]
    labels = [
        LabelScore(k, f"http://vocab.test/{k}", s)
        for k, s, t in zip(keys, scores, thresholds, strict=True)
        if s >= t
    ]
    if not labels and rng.random() < 0.3:  # a top-1 fallback label below its threshold
        best = max(range(len(keys)), key=scores.__getitem__)
        labels = [LabelScore(keys[best], f"http://vocab.test/{keys[best]}", scores[best])]
    status = Outcome.LABELLED if labels else Outcome.BELOW_THRESHOLD
    return RecordOutcome(rid, status, scores=scores, labels=labels, image_url=f"http://i/{rid}")


def save(db: Database, run_id: int, version: str, outcomes: list[RecordOutcome]) -> None:
    for start in range(0, len(outcomes), 300):
        with db.transaction() as session:
            save_outcomes(session, run_id, version, outcomes[start : start + 300])


def new_run(db: Database, version: str) -> int:
    with db.transaction() as session:
        run = Run(kind="enrich", scope={}, model_version=version, status="completed", queue="q")
        session.add(run)
        session.flush()
        return run.id


def reference(db: Database, filters: QueueFilter) -> list[Item]:
    """Every item of `filters` in queue order, read by the scan of `results`."""
    with db.transaction() as session:
        models = model_classes(session)
        rows = scanned_rows(session, filters, models, offset=0, limit=10**9)
        return [scanned_item(row) for row in rows]


def build(url: str) -> Database:
    rng = random.Random(7)
    db = Database(url)
    db.upgrade()
    ids = [record_id(n) for n in range(RECORDS)]
    with db.transaction() as session:
        register_model(session, OLD, "pilot", "resnet18", classes(OLD_KEYS), OLD_THRESHOLDS)
        register_model(session, NEW, "pilot", "resnet18", classes(NEW_KEYS), NEW_THRESHOLDS)
        upsert_records(
            session,
            [
                Record(rid, rid.split("/")[1], f"http://data.europeana.eu/item{rid}", None, "M")
                for rid in ids
            ],
        )
    first, second, third = new_run(db, OLD), new_run(db, NEW), new_run(db, OLD)
    save(db, first, OLD, [outcome(rng, r, OLD_KEYS, OLD_THRESHOLDS, 0.05) for r in ids])
    save(db, second, NEW, [outcome(rng, r, NEW_KEYS, NEW_THRESHOLDS, 0.1) for r in ids[::2]])
    save(db, third, OLD, [outcome(rng, r, OLD_KEYS, OLD_THRESHOLDS, 0.2) for r in ids[::7]])
    # Decisions on the current items: some overridden, some in the audit sample, some undone.
    items = reference(db, QueueFilter(state="any", limit=MAX_LIMIT))
    made = []
    for item in rng.sample(items, 400):
        if item.labelled:
            decision = rng.choice([Decision.ACCEPT, Decision.ACCEPT, Decision.REJECT])
        else:
            decision = rng.choice([Decision.ADD, Decision.REJECT])
        audit = item.labelled and rng.random() < 0.4
        made.append(
            NewDecision(item.record_id, item.label_key, item.model_version, decision, "ada", audit)
        )
    ids_made = record_decisions(db, made)
    record_decisions(db, made[:40])  # decided again
    take_back_decisions(db, rng.sample(ids_made, 60))
    with db.transaction() as session:  # recalibrated: the index is rebuilt for OLD
        register_model(session, OLD, "pilot", "resnet18", classes(OLD_KEYS), RECALIBRATED)
    finish_relabelling(db)
    return db


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Database]:
    """Built once per database kind: the tests only read it (a rebuild writes the same rows)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('scale')}/scale.sqlite3"
    else:
        postgres = request.getfixturevalue("postgres")
        base = postgres if isinstance(postgres, str) else postgres.url
        name = f"t_{uuid.uuid4().hex[:12]}"
        engine = sa.create_engine(base, isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        url = sa.engine.make_url(base).set(database=name).render_as_string(hide_password=False)
    database = build(url)
    yield database
    database.dispose()


def paged(db: Database, filters: QueueFilter) -> list[Item]:
    """Every page of the queue, following `next_after`."""
    items: list[Item] = []
    cursor = None
    while True:
        page = queue_page(db, replace(filters, after=cursor))
        items += page.items
        cursor = page.next_page
        if cursor is None:
            return items


def index_rows(db: Database) -> tuple[list[tuple], list[tuple]]:
    with db.transaction() as session:
        current = session.execute(
            sa.select(Result.record_id, Result.model_version)
            .where(Result.is_current)
            .order_by(Result.record_id)
        ).all()
        items = session.execute(
            sa.select(ReviewItem.__table__).order_by(ReviewItem.record_id, ReviewItem.label_key)
        ).all()
        return [tuple(row) for row in current], [tuple(row) for row in items]


def test_the_stored_current_results_are_the_window_functions(db: Database) -> None:
    with db.transaction() as session:
        ids = list(session.scalars(sa.select(Result.record_id).distinct()))
        computed = sorted(
            tuple(row)
            for start in range(0, len(ids), 500)
            for row in session.execute(newest_classified(ids[start : start + 500], db.dialect))
        )
        versions = {version for _, version in computed}
    current, items = index_rows(db)
    assert current == computed
    assert versions == {OLD, NEW}  # both versions count somewhere
    assert any(margin is not None and margin > review_index.BAND for *_, margin, _, _ in items)
    # What the writes kept is what a rebuild from `results` gives.
    assert review_index.rebuild(db) == len(current)
    assert index_rows(db) == (current, items)


FILTERS = [
    QueueFilter(limit=97),
    QueueFilter(state="any", limit=MAX_LIMIT),
    QueueFilter(classes=("map",), limit=41),
    QueueFilter(classes=("ceramic", "poster"), side="above", limit=60),
    QueueFilter(side="below", state="any", limit=MAX_LIMIT),
    QueueFilter(datasets=("400",), limit=70),
    QueueFilter(datasets=("100", "300"), classes=("photo",), state="any", limit=50),
    QueueFilter(model_version=OLD, limit=MAX_LIMIT),
    QueueFilter(run_id=2, classes=("map", "ceramic"), state="any", limit=80),
    QueueFilter(min_score=0.2, max_score=0.7, limit=90),
]


@pytest.mark.parametrize("filters", FILTERS, ids=lambda f: repr(f)[12:80])
def test_every_page_of_the_queue_is_the_scans(db: Database, filters: QueueFilter) -> None:
    expected = reference(db, filters)
    assert len(expected) > 100
    assert paged(db, filters) == expected
    page = queue_page(db, filters)
    assert (page.total, page.total_capped) == (len(expected), False)
    # Offset paging gives the same pages, across the band's end too.
    for offset in (0, filters.limit, 3 * filters.limit + 5, len(expected) - 3):
        got = queue_page(db, replace(filters, offset=offset)).items
        assert got == expected[offset : offset + filters.limit]
    if filters.state == "pending":
        progress = queue_progress(db, filters)
        assert progress.pending == len(expected)
        # Every decision here was made today: those standing on the filters' items count.
        decided = [i for i in reference(db, replace(filters, state="any")) if i.decision]
        assert progress.decided_today == len(decided) > 0


@pytest.mark.parametrize("state", ["reviewed", "accepted", "rejected", "added", "pending"])
def test_each_state_is_the_scans_items_in_that_state(db: Database, state: str) -> None:
    everything = reference(db, QueueFilter(state="any", limit=MAX_LIMIT))
    wanted = {
        "reviewed": lambda d: d is not None,
        "accepted": lambda d: d == Decision.ACCEPT,
        "rejected": lambda d: d == Decision.REJECT,
        "added": lambda d: d == Decision.ADD,
        "pending": lambda d: d is None,
    }[state]
    expected = [item for item in everything if wanted(item.decision)]
    assert expected
    assert paged(db, QueueFilter(state=state, limit=MAX_LIMIT)) == expected
    one = [item for item in expected if item.label_key == "photo"]
    assert paged(db, QueueFilter(classes=("photo",), state=state, limit=30)) == one


def test_the_audit_sample_draws_from_the_scans_population(db: Database) -> None:
    audited = standing_decisions(db, audit_only=True)
    for keys in (("map",), ("photo", "ceramic"), ("coin",)):
        filters = QueueFilter(classes=keys, audit=True, limit=MAX_LIMIT)
        population = {(i.record_id, i.label_key, i) for i in reference(db, filters)}
        assert 0 < len(population) < MAX_LIMIT
        page = queue_page(db, filters)
        assert {(i.record_id, i.label_key, i) for i in page.items} == population
        assert (page.total, page.next_page) == (len(population), None)
        assert all(i.labelled for i in page.items)
        # Today's audit decisions on the sample's labels of these classes.
        labels = reference(db, replace(filters, audit=False, side="above", state="any"))
        done = [i for i in labels if (i.record_id, i.label_key) in audited]
        assert queue_progress(db, filters).decided_today == len(done)
    # A small page starts at a random point: different draws begin differently.
    firsts = {queue_page(db, QueueFilter(audit=True, limit=3)).items[0] for _ in range(20)}
    assert len(firsts) > 1


def test_the_stats_are_those_of_every_reviewed_item(db: Database) -> None:
    audited = standing_decisions(db, audit_only=True)
    for filters in (QueueFilter(), QueueFilter(classes=("map", "coin")), QueueFilter(run_id=3)):
        groups: dict[tuple[str, str], list[Item]] = {}
        for item in reference(db, replace(filters, state="any")):
            if item.decision is not None:
                groups.setdefault((item.model_version, item.label_key), []).append(item)
        expected = [_one_class(v, k, items, audited) for (v, k), items in sorted(groups.items())]
        assert expected
        assert class_stats(db, filters) == expected


def test_totals_are_capped(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("enrichment.store.review_queue.TOTAL_CAP", 100)
    page = queue_page(db, QueueFilter())
    assert (page.total, page.total_capped) == (100, True)
    progress = queue_progress(db, QueueFilter(datasets=("400",)))
    assert (progress.pending, progress.pending_capped) == (100, True)
    assert queue_page(db, QueueFilter(classes=("ceramic",), side="above")).total_capped is False


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/migrate.sqlite3"
    return request.getfixturevalue("pg_url")


def test_an_index_never_built_is_built_from_existing_rows_by_0016_and_goes_down(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows written before the review index (0010), upgraded to head: 0011 makes the tables,
    0016 builds them."""
    monkeypatch.setattr(review_index, "REBUILD_BATCH", 70)  # several batches
    rng = random.Random(11)
    db = Database(database_url)
    db.upgrade("0010")
    ids = [record_id(n) for n in range(300)]
    table = sa.table
    column = sa.column
    records = table(
        "records",
        *(column(n) for n in ("id", "dataset", "item_uri")),
        column("first_seen", sa.DateTime),
        column("last_seen", sa.DateTime),
    )
    models = table(
        "models",
        *(column(n) for n in ("version", "name", "architecture", "top_k_fallback")),
        column("classes", sa.JSON),
        column("thresholds", sa.JSON),
        column("registered_at", sa.DateTime),
    )
    results = table(
        "results",
        *(column(n) for n in ("record_id", "model_version", "status")),
        column("scores", sa.JSON),
        column("classified_at", sa.DateTime),
    )
    labels = table("labels", *(column(n) for n in LABEL_COLUMNS))
    rows, label_rows = [], []
    for version, keys, thresholds, every, minute in (
        (OLD, OLD_KEYS, OLD_THRESHOLDS, 1, 1),
        (NEW, NEW_KEYS, NEW_THRESHOLDS, 2, 2),
    ):
        for rid in ids[::every]:
            made = outcome(rng, rid, keys, thresholds, 0.1)
            at = datetime(2026, 1, 1, 0, minute if rng.random() < 0.9 else 3)
            rows.append(
                {
                    "record_id": rid,
                    "model_version": version,
                    "status": made.status,
                    "scores": made.scores,
                    "classified_at": at,
                }
            )
            label_rows += [
                {
                    "record_id": rid,
                    "model_version": version,
                    "label_key": label.key,
                    "concept": label.concept,
                    "confidence": label.confidence,
                }
                for label in made.labels
            ]
    with db.engine.begin() as connection:
        connection.execute(
            records.insert(),
            [
                {
                    "id": r,
                    "dataset": "100",
                    "item_uri": "http://i" + r,
                    "first_seen": datetime(2026, 1, 1),
                    "last_seen": datetime(2026, 1, 1),
                }
                for r in ids
            ],
        )
        connection.execute(
            models.insert(),
            [
                {
                    "version": version,
                    "name": "pilot",
                    "architecture": "resnet18",
                    "top_k_fallback": 0,
                    "classes": classes(keys),
                    "thresholds": thresholds,
                    "registered_at": datetime(2026, 1, 1),
                }
                for version, keys, thresholds in (
                    (OLD, OLD_KEYS, OLD_THRESHOLDS),
                    (NEW, NEW_KEYS, NEW_THRESHOLDS),
                )
            ],
        )
        connection.execute(results.insert(), rows)
        connection.execute(labels.insert(), label_rows)
    db.upgrade()
    current, items = index_rows(db)
    with db.transaction() as session:
        computed = sorted(tuple(row) for row in session.execute(newest_classified(ids, db.dialect)))
    assert current == computed
    assert {version for _, version in current} == {OLD, NEW}
    assert sum(labelled for *_, labelled, _ in items) == len(
        label_rows_of_current(current, label_rows)
    )
    review_index.rebuild(db)
    assert index_rows(db) == (current, items)
    # The queue reads them as the scan does.
    expected = reference(db, QueueFilter(state="any", limit=MAX_LIMIT))
    assert paged(db, QueueFilter(state="any", limit=MAX_LIMIT)) == expected
    db.downgrade("0010")
    names = set(sa.inspect(db.engine).get_table_names())
    assert {"current_results", "review_items"}.isdisjoint(names)
    with db.engine.connect() as connection:
        assert connection.execute(sa.text("SELECT count(*) FROM results")).scalar() == len(rows)
    db.upgrade()
    assert index_rows(db) == (current, items)
    db.dispose()


def test_0016_flags_the_current_results_and_goes_down_to_the_table(database_url: str) -> None:
    """A database written at head, down to 0015 (the `current_results` table and the items'
    model version, from the flags) and up again: the same flags, items and queue."""
    db = build(database_url)
    current, items = index_rows(db)
    everything = QueueFilter(state="any", limit=MAX_LIMIT)
    expected = reference(db, everything)
    assert paged(db, everything) == expected
    db.downgrade("0015")
    versions = dict(current)
    with db.engine.connect() as connection:
        table = connection.execute(
            sa.text("SELECT record_id, model_version FROM current_results ORDER BY record_id")
        ).all()
        old_items = connection.execute(
            sa.text("SELECT record_id, label_key, model_version FROM review_items")
        ).all()
        columns = {c["name"] for c in sa.inspect(connection).get_columns("results")}
    assert sorted(map(tuple, table)) == current
    assert sorted(map(tuple, old_items)) == sorted(
        (record, key, versions[record]) for record, key, *_ in items
    )
    assert "is_current" not in columns
    db.upgrade()
    assert index_rows(db) == (current, items)
    assert paged(db, everything) == expected
    db.dispose()


def label_rows_of_current(current: list[tuple], label_rows: list[dict]) -> list[dict]:
    chosen = set(current)
    return [row for row in label_rows if (row["record_id"], row["model_version"]) in chosen]
