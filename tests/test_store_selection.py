"""The reads that select labels (store/selection.py), on SQLite and PostgreSQL.

`tests/test_export_select.py` checks the labels whole exports hold; these call
the store's reads directly: the two forms of the review rule agree, each
record's current result comes with its scores, and the filter checks.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from enrichment.store.database import Database
from enrichment.store.reviews import REVIEWED, Decision, Review
from enrichment.store.selection import (
    Selection,
    classified_scores,
    known_models,
    last_decisions,
    review_keeps,
    run_exists,
    stored_labels,
)
from tests.export_support import (
    NEW,
    OLD,
    OWN_THRESHOLDS,
    Catalogue,
    build_catalogue,
    open_database,
)


@pytest.fixture(params=["sqlite", "postgresql"])
def catalogue(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[Database, Catalogue]]:
    url = (
        f"sqlite:///{tmp_path}/selection.sqlite3"
        if request.param == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    db = open_database(url)
    yield db, build_catalogue(db)
    db.dispose()


def test_the_review_rule_in_python_is_the_rule_in_sql(catalogue) -> None:
    db, _ = catalogue
    labels = list(stored_labels(db, Selection()))
    decided = [(label.record_id, label.label_key) for label in labels[:6]]
    # Accepted; rejected; rejected then accepted; accepted then rejected; added; none.
    history = [
        [Decision.ACCEPT],
        [Decision.REJECT],
        [Decision.REJECT, Decision.ACCEPT],
        [Decision.ACCEPT, Decision.REJECT],
        [Decision.ADD],
    ]
    with db.transaction() as session:
        for (record_id, key), decisions in zip(decided, history, strict=False):
            for decision in decisions:
                session.add(
                    Review(
                        record_id=record_id,
                        label_key=key,
                        model_version=OLD,
                        decision=decision,
                        reviewer="curator",
                    )
                )
                session.flush()
    last = last_decisions(db)
    assert last == {pair: decisions[-1] for pair, decisions in zip(decided, history, strict=False)}
    for reviewed in REVIEWED:
        in_sql = list(stored_labels(db, Selection(reviewed=reviewed)))
        in_python = [
            label
            for label in labels
            if review_keeps(last.get((label.record_id, label.label_key)), reviewed)
        ]
        assert in_sql == in_python, reviewed
    accepted = {
        (label.record_id, label.label_key)
        for label in stored_labels(db, Selection(reviewed="accepted"))
    }
    assert accepted == {decided[0], decided[2], decided[4]}


def test_each_records_current_result_comes_with_its_scores(catalogue) -> None:
    db, stored = catalogue
    results = list(classified_scores(db, Selection()))
    classified = {
        record_id: [version for version, scores in by_version.items() if scores is not None]
        for record_id, by_version in stored.results.items()
    }
    assert [result.record_id for result in results] == sorted(classified)
    for result in results:
        assert result.model_version == classified[result.record_id][-1]
        assert result.scores == pytest.approx(
            stored.results[result.record_id][result.model_version]
        )
    by_new = list(classified_scores(db, Selection(model_version=NEW)))
    assert {result.model_version for result in by_new} == {NEW} and len(by_new) == 6
    later = list(classified_scores(db, Selection(since=stored.saved_at[NEW])))
    assert {result.model_version for result in later} == {NEW}
    assert list(classified_scores(db, Selection(datasets=("9999",)))) == []


def test_a_stream_stopped_early_ends_its_transaction(catalogue) -> None:
    db, _ = catalogue
    rows = stored_labels(db, Selection())
    first = next(rows)
    rows.close()
    assert db.engine.pool.checkedout() == 0, "the streaming connection went back to the pool"
    assert first == next(stored_labels(db, Selection()))


def test_what_the_filter_checks_read(catalogue) -> None:
    db, _ = catalogue
    assert not run_exists(db, 42)
    models = known_models(db)
    assert set(models) == {OLD, NEW}
    assert models[OLD].keys == ("photograph", "drawing", "map")
    assert models[OLD].thresholds == OWN_THRESHOLDS
    assert all(isinstance(threshold, float) for threshold in models[NEW].thresholds)
