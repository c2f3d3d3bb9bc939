"""The review app's store operations called directly, on SQLite and PostgreSQL (the queue's
score lookup differs between them): the queue's order and filters, a record's view, the
decisions recorded and taken back in one transaction each, and what each refuses."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from enrichment.errors import InvalidValue
from enrichment.store.database import Database
from enrichment.store.decisions import (
    NewDecision,
    record_decisions,
    results_and_labels,
    standing_decisions,
    take_back_decisions,
)
from enrichment.store.review_queue import (
    QueueFilter,
    all_items,
    image_url,
    items_by_record,
    queue_page,
    queue_progress,
    record_view,
    registered_models,
)
from enrichment.store.reviews import Decision, Review
from enrichment.store.schema import utc_now
from tests.test_review_api import KEYS, SCORES, THRESHOLDS, VERSION, build_review_db, margin_order


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, image_host, tmp_path: Path) -> Iterator[Database]:
    url = (
        f"sqlite:///{tmp_path}/review.sqlite3"
        if request.param == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    database = build_review_db(url, image_host)
    yield database
    database.dispose()


def labelled() -> set[tuple[str, str]]:
    """(record, class) of every label the model gave: scores at or above the threshold."""
    return {
        (record, key)
        for record, scores in SCORES.items()
        for key, score, threshold in zip(KEYS, scores, THRESHOLDS, strict=True)
        if score >= threshold
    }


def decision(record_id: str, key: str, made: str, audit: bool = False) -> NewDecision:
    return NewDecision(record_id, key, VERSION, made, "ada", audit)


def test_the_queue_is_ordered_by_margin_and_filtered(db: Database) -> None:
    page = queue_page(db, QueueFilter(limit=100))
    assert [(i.record_id, i.label_key) for i in page.items] == margin_order(SCORES)
    assert page.total == 15
    assert {(i.record_id, i.label_key) for i in page.items if i.labelled} == labelled()
    maps = queue_page(db, QueueFilter(classes=("map",), limit=2))
    assert [(i.record_id, i.label_key) for i in maps.items] == margin_order(SCORES, ("map",))[:2]
    assert maps.total == 5
    below = queue_page(db, QueueFilter(side="below", datasets=("9002",)))
    assert {(i.record_id, i.label_key) for i in below.items} == {("/9002/e", key) for key in KEYS}
    beyond = queue_page(db, QueueFilter(offset=100))
    assert (beyond.items, beyond.total) == ([], 15)
    audit = queue_page(db, QueueFilter(audit=True, limit=100))
    assert {(i.record_id, i.label_key) for i in audit.items} == labelled()


def test_the_audit_sample_shows_each_label_as_not_yet_audited(db: Database) -> None:
    """A decision made in the queue neither hides a sample label's place in the audit nor is
    shown on it: the audit is an independent second look, done when the audit decides."""
    first, second = sorted(labelled())[:2]
    record_decisions(db, [decision(*first, Decision.ACCEPT), decision(*second, Decision.REJECT)])
    record_decisions(db, [decision(*second, Decision.ACCEPT, audit=True)])
    wanted = labelled() - {second}
    for filters in (
        QueueFilter(audit=True, limit=100),  # the review index
        QueueFilter(audit=True, limit=100, datasets=("9001", "9002")),  # a scan of results
    ):
        page = queue_page(db, filters)
        assert {(i.record_id, i.label_key) for i in page.items} == wanted
        assert page.total == len(wanted)
        assert [i for i in page.items if i.decision or i.reviewer or i.decided_at] == []
    assert queue_progress(db, QueueFilter(audit=True)).pending == len(wanted)


@pytest.mark.parametrize(
    ("filters", "field"),
    [
        (QueueFilter(side="sideways"), "side"),
        (QueueFilter(state="maybe"), "state"),
        (QueueFilter(limit=0), "limit"),
        (QueueFilter(offset=-1), "offset"),
        (QueueFilter(max_score=1.5), "max_score"),
        (QueueFilter(model_version="pilot@000000000000"), "model_version"),
        (QueueFilter(run_id=42), "run_id"),
        (QueueFilter(classes=("unicorn",)), "classes"),
    ],
)
def test_a_filter_naming_nothing_is_refused_by_its_field(
    db: Database, filters: QueueFilter, field: str
) -> None:
    with pytest.raises(InvalidValue) as refused:
        queue_page(db, filters)
    assert refused.value.field == field
    assert "--" not in str(refused.value)
    with pytest.raises(InvalidValue):
        list(all_items(db, filters))


def test_a_record_view_lists_its_classes_in_model_order(db: Database, image_host) -> None:
    view = record_view(db, "/9001/b")
    assert (view.model_version, view.title, view.dataset) == (VERSION, "Object B", "9001")
    assert [item.label_key for item in view.items] == list(KEYS)
    assert [item.confidence for item in view.items] == pytest.approx(SCORES["/9001/b"])
    assert view.image_url == image_url(db, "/9001/b", VERSION)
    assert view.image_url.endswith("/review/9001/b.png")
    assert image_url(db, "/9001/b", "pilot@000000000000") is None
    with pytest.raises(InvalidValue) as missing:
        record_view(db, "/9001/zz")
    assert missing.value.field == "record_id"


def test_decisions_are_recorded_in_order_and_the_last_one_stands(db: Database) -> None:
    ids = record_decisions(
        db,
        [
            decision("/9001/c", "drawing", Decision.ACCEPT),
            decision("/9001/b", "photograph", Decision.REJECT, audit=True),
            decision("/9002/e", "photograph", Decision.ADD),
        ],
    )
    assert len(ids) == 3 and ids == sorted(ids)
    (later,) = record_decisions(db, [decision("/9001/c", "drawing", Decision.REJECT)])
    assert standing_decisions(db) == {
        ("/9001/c", "drawing"): "reject",
        ("/9001/b", "photograph"): "reject",
        ("/9002/e", "photograph"): "add",
    }
    assert standing_decisions(db, audit_only=True) == {("/9001/b", "photograph"): "reject"}
    assert queue_page(db, QueueFilter(limit=100)).total == 12
    accepted = queue_page(db, QueueFilter(state="added"))
    assert [(i.record_id, i.decision, i.reviewer) for i in accepted.items] == [
        ("/9002/e", "add", "ada")
    ]
    # Taking back the later decision lets the one before it count again.
    assert take_back_decisions(db, [later]) == 1
    assert standing_decisions(db)[("/9001/c", "drawing")] == "accept"
    assert take_back_decisions(db, [later]) == 0
    with pytest.raises(InvalidValue) as refused:
        take_back_decisions(db, [])
    assert refused.value.field == "ids"
    with pytest.raises(InvalidValue):
        take_back_decisions(db, [True])


@pytest.mark.parametrize(
    ("made", "field", "message"),
    [
        (decision("/9002/e", "drawing", Decision.ACCEPT), "decision", "add it instead"),
        (decision("/9001/a", "photograph", Decision.ADD), "decision", "accept it"),
        (decision("/9001/a", "photograph", "maybe"), "decision", "must be one of"),
        (decision("/9001/a", "unicorn", Decision.REJECT), "label_key", "has no class"),
        (decision("/9003/gone", "map", Decision.REJECT), "record_id", "has no result"),
        (
            NewDecision("/9001/a", "map", "pilot@000000000000", Decision.REJECT, "ada"),
            "model_version",
            "unknown model version",
        ),
    ],
)
def test_a_wrong_decision_is_refused_and_none_of_its_batch_stored(
    db: Database, made: NewDecision, field: str, message: str
) -> None:
    good = decision("/9001/a", "map", Decision.REJECT)
    with pytest.raises(InvalidValue, match=message) as refused:
        record_decisions(db, [good, made])
    assert refused.value.field == field
    assert standing_decisions(db) == {}


def test_records_grouped_with_their_image_by_whether_anyone_decided(db: Database) -> None:
    record_decisions(db, [decision("/9001/b", "map", Decision.ACCEPT)])
    every = QueueFilter(state="any", limit=500)
    groups = list(items_by_record(db, every))
    assert [group.record_id for group in groups] == sorted(SCORES)
    assert all([i.label_key for i in group.items] == sorted(KEYS) for group in groups)
    assert all(group.image_url.endswith(f"/review{group.record_id}.png") for group in groups)
    assert [group.record_id for group in items_by_record(db, every, decided=True)] == ["/9001/b"]
    undecided = [group.record_id for group in items_by_record(db, every, decided=False)]
    assert undecided == sorted(set(SCORES) - {"/9001/b"})


def test_results_and_labels_of_a_whole_import_at_once(db: Database) -> None:
    known = results_and_labels(db, [("/9001/a", VERSION), ("/9003/gone", VERSION)])
    assert known.results == {("/9001/a", VERSION)}
    assert known.labels == {
        ("/9001/a", VERSION, key) for record, key in labelled() if record == "/9001/a"
    }
    assert registered_models(db)[VERSION].keys == KEYS


def test_decision_is_a_string_enum_with_the_stored_values() -> None:
    assert [str(item) for item in Decision] == ["accept", "reject", "add"]
    assert Decision("reject") is Decision.REJECT and Decision.ADD == "add"
    assert set(Decision.POSITIVE) == {Decision.ACCEPT, Decision.ADD}


def test_an_items_page_is_its_item_uri_as_the_report_links_it() -> None:
    """One rule for the review app and the run report; third-party text is never a link."""
    from enrichment.store.review_queue import item_page

    uri = "http://data.europeana.eu/item/2048128/object_1"
    assert item_page(uri) == uri
    assert item_page("javascript:alert(1)") is None and item_page(None) is None


def test_swapped_score_bounds_are_refused_not_an_empty_queue() -> None:
    with pytest.raises(InvalidValue, match=r"max_score 0\.2 is below min_score 0\.6") as refused:
        QueueFilter(min_score=0.6, max_score=0.2).check()
    assert refused.value.field == "max_score"
    QueueFilter(min_score=0.4, max_score=0.4).check()  # one score exactly: allowed


def test_decided_today_counts_the_decisions_within_the_pages_filters(db: Database) -> None:
    """Like the pending count beside it: a curator on the map queue of one dataset sees the
    map decisions of that dataset made today, not every decision of the day (audit: the
    audit decisions among the sample's labels of the filters)."""
    record_decisions(
        db,
        [
            decision("/9001/a", "map", Decision.REJECT),  # below threshold
            decision("/9001/b", "map", Decision.ACCEPT),  # above, .95
            decision("/9002/d", "map", Decision.REJECT),  # above, .62
            decision("/9002/d", "photograph", Decision.ACCEPT),  # above, .75
            decision("/9001/c", "drawing", Decision.ACCEPT, audit=True),  # above, .41
            decision("/9002/e", "photograph", Decision.ADD),  # below
            decision("/9001/a", "photograph", Decision.ACCEPT),  # made yesterday
        ],
    )
    with db.transaction() as session:  # the last one was made yesterday: not today's
        last = session.scalar(sa.select(sa.func.max(Review.id)))
        yesterday = utc_now() - timedelta(days=1)
        session.execute(sa.update(Review).where(Review.id == last).values(decided_at=yesterday))
    (taken,) = record_decisions(db, [decision("/9001/b", "drawing", Decision.ADD)])
    assert take_back_decisions(db, [taken]) == 1  # taken back: counts for nothing

    def progress(**filters: object) -> tuple[int, int]:
        counted = queue_progress(db, QueueFilter(**filters))
        return counted.pending, counted.decided_today

    assert progress() == (15 - 7, 6)
    assert progress(classes=("map",)) == (5 - 3, 3)
    assert progress(datasets=("9001",)) == (9 - 4, 3)
    assert progress(classes=("map",), datasets=("9002",)) == (2 - 1, 1)
    assert progress(classes=("map", "photograph"), datasets=("9002",)) == (4 - 3, 3)
    assert progress(model_version=VERSION) == (15 - 7, 6)
    # The state shown: today's decisions in it (pending, any or reviewed: every one).
    assert progress(state="rejected")[1] == 2
    assert progress(state="accepted", classes=("map",))[1] == 1
    assert progress(state="added")[1] == 1
    assert progress(state="any", classes=("drawing",))[1] == 1
    assert progress(state="reviewed", datasets=("9002",))[1] == 3
    # The side and the scores, as the queue filters them.
    assert progress(side="below")[1] == 2
    assert progress(side="above", classes=("map",))[1] == 2
    assert progress(min_score=0.6)[1] == 3
    assert progress(min_score=0.4, max_score=0.6)[1] == 2
    # The audit sample: audit decisions only.
    assert progress(audit=True) == (len(labelled()) - 1, 1)
    assert progress(audit=True, classes=("drawing",))[1] == 1
    assert progress(audit=True, classes=("map",))[1] == 0
    assert progress(audit=True, datasets=("9002",))[1] == 0
