"""A recalibrated model version's labels are decided again from the stored scores.

Calibration keeps the version and changes its thresholds; the next run registers them.
Before, records classified earlier kept the labels the old thresholds gave, and an export
of the version shipped both rules under one `generator.version`. On both dialects: the
labels, statuses and review items after re-registering equal what classifying every
record afresh with the new thresholds stores (`export_support.labels_of`).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from enrichment.store.batches import as_registered
from enrichment.store.database import Database
from enrichment.store.review_tables import ReviewItem
from enrichment.store.schema import Label, Outcome, Result
from enrichment.store.writes import LabelScore, RecordOutcome, register_model, save_outcomes
from enrichment.thresholds import DecisionRule, decide
from tests.conftest import upgraded_database
from tests.export_support import (
    KEYS,
    MODEL_LABELS,
    NEW,
    OLD,
    OWN_THRESHOLDS,
    build_catalogue,
    labels_of,
)

RECALIBRATED = {"map": 0.7, "photograph": 0.25}  # one class stricter, one looser
RECALIBRATED_THRESHOLDS = [
    RECALIBRATED.get(key, own) for key, own in zip(KEYS, OWN_THRESHOLDS, strict=True)
]
LOADED = DecisionRule.of(OWN_THRESHOLDS, 0)  # what a worker started before the recalibration holds


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    return upgraded_database(request, tmp_path)


def stored(db: Database, version: str) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """(record -> key -> confidence, record -> status) of `version`'s classified results."""
    with db.transaction() as session:
        labels: dict[str, dict[str, float]] = {}
        for record_id, key, confidence in session.execute(
            sa.select(Label.record_id, Label.label_key, Label.confidence).where(
                Label.model_version == version
            )
        ):
            labels.setdefault(record_id, {})[key] = confidence
        statuses = dict(
            session.execute(
                sa.select(Result.record_id, Result.status).where(
                    Result.model_version == version, Result.scores.is_not(None)
                )
            ).all()
        )
    return labels, statuses


def recalibrate(db: Database, version: str, thresholds: list[float], top_k: int = 0) -> None:
    with db.transaction() as session:
        register_model(session, version, "pilot", "resnet18", MODEL_LABELS, thresholds, top_k)


def test_new_thresholds_decide_the_versions_labels_again(db: Database) -> None:
    catalogue = build_catalogue(db)
    new_labels_before, _ = stored(db, NEW)
    recalibrate(db, OLD, RECALIBRATED_THRESHOLDS)

    labels, statuses = stored(db, OLD)
    expected = {
        record_id: found
        for record_id, by_version in catalogue.results.items()
        if (found := labels_of(by_version[OLD], RECALIBRATED))
    }
    assert labels == expected
    assert statuses == {
        record_id: "labelled" if record_id in expected else "below_threshold"
        for record_id in catalogue.results
    }
    old_labels_at_old_thresholds = {
        record_id: found
        for record_id, by_version in catalogue.results.items()
        if (found := labels_of(by_version[OLD]))
    }
    assert labels != old_labels_at_old_thresholds, "the new thresholds change some labels"
    assert stored(db, NEW)[0] == new_labels_before, "another version's labels are its own"
    with db.transaction() as session:
        items = session.execute(
            sa.select(ReviewItem.record_id, ReviewItem.label_key).where(ReviewItem.labelled)
        ).all()
    current_old = {record_id for record_id, by in catalogue.results.items() if by.get(NEW) is None}
    assert {(r, k) for r, k in items if r in current_old} == {
        (r, k) for r, found in expected.items() if r in current_old for k in found
    }, "the review index follows the new labels"


def test_a_new_top_k_fallback_gives_unlabelled_results_their_best_class(db: Database) -> None:
    catalogue = build_catalogue(db)
    high = [1.0] * len(KEYS)  # no score reaches it: only the fallback labels
    recalibrate(db, OLD, high, top_k=1)
    labels, statuses = stored(db, OLD)
    for record_id, by_version in catalogue.results.items():
        scores = by_version[OLD]
        (best,) = [
            key for key, on in zip(KEYS, decide([scores], high, 1)[0].tolist(), strict=True) if on
        ]
        assert labels[record_id] == {best: scores[KEYS.index(best)]}
        assert statuses[record_id] == "labelled"
    recalibrate(db, OLD, high, top_k=0)
    assert stored(db, OLD) == ({}, dict.fromkeys(catalogue.results, "below_threshold"))


def test_registering_the_same_thresholds_again_changes_nothing(db: Database) -> None:
    build_catalogue(db)
    before = stored(db, OLD)
    with db.transaction() as session:
        session.execute(sa.delete(Label).where(Label.label_key == "coin"))  # a marker
    recalibrate(db, OLD, list(OWN_THRESHOLDS))
    after = stored(db, OLD)[0]
    assert "coin" not in {key for found in after.values() for key in found}, "not re-derived"
    assert after == {
        record_id: {key: c for key, c in found.items() if key != "coin"}
        for record_id, found in before[0].items()
        if any(key != "coin" for key in found)
    }


def decided_by(rule: DecisionRule, scores: dict[str, list[float]]) -> list[RecordOutcome]:
    """Outcomes as a worker holding `rule` writes them for these records' scores."""
    chosen = rule.decide(np.asarray(list(scores.values()))).tolist()
    outcomes = []
    for (record_id, vector), given in zip(scores.items(), chosen, strict=True):
        labels = [
            LabelScore(entry["key"], entry["concept"], score)
            for entry, score, on in zip(MODEL_LABELS, vector, given, strict=True)
            if on
        ]
        status = Outcome.LABELLED if labels else Outcome.BELOW_THRESHOLD
        outcomes.append(RecordOutcome(record_id, status, vector, labels))
    return outcomes


def write_batch(db: Database, outcomes: list[RecordOutcome], rule: DecisionRule) -> None:
    """A batch's write as `store.batches.finish_batch` makes it."""
    with db.transaction() as session:
        save_outcomes(session, None, OLD, as_registered(session.connection(), OLD, outcomes, rule))


def test_a_batch_labelled_by_thresholds_since_recalibrated_gets_the_registered_ones(
    db: Database,
) -> None:
    catalogue = build_catalogue(db)
    scores = {record_id: by[OLD] for record_id, by in catalogue.results.items()}
    outcomes = decided_by(LOADED, scores)
    with db.transaction() as session:
        kept = as_registered(session.connection(), OLD, outcomes, LOADED)
    assert kept is outcomes, "a batch decided by the registered rule is written as it is"

    recalibrate(db, OLD, RECALIBRATED_THRESHOLDS)
    write_batch(db, outcomes, LOADED)  # a worker loaded before the recalibration
    labels, statuses = stored(db, OLD)
    expected = {r: found for r, s in scores.items() if (found := labels_of(s, RECALIBRATED))}
    assert labels == expected
    assert statuses == {r: "labelled" if r in expected else "below_threshold" for r in scores}
    by_old_rule = {r: labels_of(s) for r, s in scores.items()}
    assert expected != {r: found for r, found in by_old_rule.items() if found}


def test_a_batch_written_while_a_recalibration_registers_waits_and_takes_its_rule(
    pg_url: str,
) -> None:
    """The race the lock closes: the registration relabels what is stored in its
    transaction; a batch decided by the old rule and committed after that relabelling
    passed, but read the rule before the registration committed, would keep old labels."""
    db = Database(pg_url)
    db.upgrade()
    catalogue = build_catalogue(db)
    scores = {record_id: by[OLD] for record_id, by in catalogue.results.items()}
    outcomes = decided_by(LOADED, scores)
    written = threading.Event()
    with db.transaction() as session:
        register_model(
            session, OLD, "pilot", "resnet18", MODEL_LABELS, RECALIBRATED_THRESHOLDS
        )  # relabelled and not yet committed
        writer = threading.Thread(target=lambda: (write_batch(db, outcomes, LOADED), written.set()))
        writer.start()
        assert not written.wait(1.0), "the batch waits for the registration to commit"
    writer.join(30)
    assert written.is_set()
    expected = {r: found for r, s in scores.items() if (found := labels_of(s, RECALIBRATED))}
    assert stored(db, OLD)[0] == expected
    db.dispose()
