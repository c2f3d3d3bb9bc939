"""Curators' decisions flow into exports: `--reviewed accepted|not-rejected|any`."""

from __future__ import annotations

from pathlib import Path

import pytest

from enrichment.publish.export import ExportError, ExportFilter
from enrichment.store.database import Database
from enrichment.store.reviews import Decision, Review
from tests.conftest import enrich
from tests.export_support import (
    NEW,
    OLD,
    annotations_in,
    build_catalogue,
    export_text,
    exported_labels,
    open_database,
)


@pytest.fixture(params=["sqlite", "postgresql"])
def reviewed(request: pytest.FixtureRequest, tmp_path: Path):
    """The export catalogue with decisions on some of its labels; yields what they decide."""
    url = (
        f"sqlite:///{tmp_path}/review.sqlite3"
        if request.param == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    db = open_database(url)
    stored = build_catalogue(db)
    labels = sorted(stored.expected())
    # (record, key) -> decisions in order; the last one counts.
    history = {
        labels[0][::2]: [Decision.ACCEPT],
        labels[1][::2]: [Decision.REJECT],
        labels[2][::2]: [Decision.ACCEPT, Decision.REJECT],
        labels[3][::2]: [Decision.REJECT, Decision.ACCEPT],
        labels[4][::2]: [Decision.ADD],
    }
    # A decision made on the OLD model's label still counts when NEW labels the record.
    relabelled = next(label for label in labels if label[1] == NEW and label not in labels[:5])
    history[relabelled[::2]] = [Decision.REJECT]
    with db.transaction() as session:
        for (record_id, key), decisions in history.items():
            for decision in decisions:
                session.add(
                    Review(
                        record_id=record_id,
                        label_key=key,
                        model_version=OLD,
                        decision=decision,
                        reviewer="ada",
                    )
                )
                session.flush()
    last = {pair: decisions[-1] for pair, decisions in history.items()}
    yield db, stored, last
    db.dispose()


def exported(db: Database, **filters) -> set[tuple[str, str, str]]:
    return set(exported_labels(annotations_in(export_text(db, ExportFilter(**filters)))))


def test_accepted_holds_exactly_the_accepted_labels(reviewed) -> None:
    db, stored, last = reviewed
    positive = {pair for pair, decision in last.items() if decision in Decision.POSITIVE}
    want = {label for label in stored.expected() if label[::2] in positive}
    assert len(want) == 3
    assert exported(db, reviewed="accepted") == want


def test_not_rejected_leaves_out_only_the_rejected(reviewed) -> None:
    db, stored, last = reviewed
    rejected = {pair for pair, decision in last.items() if decision == Decision.REJECT}
    want = {label for label in stored.expected() if label[::2] not in rejected}
    assert len(want) == len(stored.expected()) - 3
    assert exported(db, reviewed="not-rejected") == want
    assert exported(db, reviewed="any") == set(stored.expected())


def test_recomputed_thresholds_apply_the_same_decisions(reviewed) -> None:
    db, stored, last = reviewed
    thresholds = {"photograph": 0.3, "drawing": 0.3, "map": 0.3}
    rejected = {pair for pair, decision in last.items() if decision == Decision.REJECT}
    positive = {pair for pair, decision in last.items() if decision in Decision.POSITIVE}
    every = stored.expected(thresholds=thresholds)
    got = exported(db, reviewed="not-rejected", thresholds=thresholds)
    assert got == {label for label in every if label[::2] not in rejected}
    got = exported(db, reviewed="accepted", thresholds=thresholds)
    assert got == {label for label in every if label[::2] in positive}


def test_unknown_review_filter_is_refused(tmp_path: Path) -> None:
    db = open_database(f"sqlite:///{tmp_path}/empty.sqlite3")
    with pytest.raises(ExportError, match="reviewed must be one of"):
        export_text(db, ExportFilter(reviewed="maybe"))


def test_cli_export_reviewed_accepted(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/cli.sqlite3"
    db = open_database(url)
    stored = build_catalogue(db)
    record_id, version, key = sorted(stored.expected())[0]
    with db.transaction() as session:
        session.add(
            Review(
                record_id=record_id,
                label_key=key,
                model_version=version,
                decision=Decision.ACCEPT,
                reviewer="ada",
            )
        )
    db.dispose()
    out = tmp_path / "accepted.jsonld"
    done = enrich("export", "--reviewed", "accepted", "--out", str(out), env={"DATABASE_URL": url})
    assert done.returncode == 0, done.stderr
    assert set(exported_labels(annotations_in(out.read_text()))) == {(record_id, version, key)}
    assert "reviewed accepted" in out.read_text()
