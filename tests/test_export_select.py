"""Which labels an export holds, on SQLite and on PostgreSQL (server-side cursors)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from enrichment.errors import InvalidValue
from enrichment.publish.export import ExportError, ExportFilter, read_thresholds
from enrichment.sources.records_file import Record
from enrichment.store.database import Database
from enrichment.store.schema import Outcome
from enrichment.store.writes import RecordOutcome, register_model, save_outcomes, upsert_records
from tests.export_support import (
    MODEL_LABELS,
    NEW,
    OLD,
    OWN_THRESHOLDS,
    Catalogue,
    annotations_in,
    build_catalogue,
    export_text,
    exported_labels,
    image_url,
    item_uri,
    open_database,
)


@pytest.fixture(params=["sqlite", "postgresql"])
def catalogue(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Database, Catalogue]:
    url = (
        f"sqlite:///{tmp_path}/export.sqlite3"
        if request.param == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    db = open_database(url)
    yield db, build_catalogue(db)
    db.dispose()


def exported(db: Database, **filters) -> dict[tuple[str, str, str], float]:
    return exported_labels(annotations_in(export_text(db, ExportFilter(**filters))))


def assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    assert all(abs(got[key] - want[key]) < 1e-6 for key in want)


def test_each_record_shows_its_latest_classification_by_default(catalogue) -> None:
    db, stored = catalogue
    got = exported(db)
    assert_same(got, stored.expected())
    versions = {record: version for record, version, _ in got}
    assert versions["/1001/item_00"] == NEW
    # NEW failed on items 6 and 7: their OLD labels stay exported.
    assert {versions.get("/1001/item_06"), versions.get("/1001/item_07")} <= {OLD, None}
    assert {version for record, version in versions.items() if record.startswith("/1002/")} == {OLD}


def test_model_version_dataset_label_and_since_filters(catalogue) -> None:
    db, stored = catalogue
    assert_same(exported(db, model_version=OLD), stored.expected(version=OLD))
    assert_same(exported(db, model_version=NEW), stored.expected(version=NEW))
    assert_same(exported(db, datasets=("1002",)), stored.expected(datasets=("1002",)))
    assert_same(
        exported(db, datasets=("1001", "1002"), labels=("map", "drawing")),
        stored.expected(keys=("map", "drawing")),
    )
    assert_same(exported(db, since=stored.saved_at[NEW]), stored.expected(only_versions=(NEW,)))


def test_min_confidence_and_thresholds_change_exactly_the_expected_set(
    catalogue, tmp_path: Path
) -> None:
    db, stored = catalogue
    assert_same(exported(db, min_confidence=0.75), stored.expected(min_confidence=0.75))
    assert len(stored.expected(min_confidence=0.75)) < len(stored.expected())

    lower = {"photograph": 0.2, "map": 0.3}
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps(lower))
    thresholds = read_thresholds(path)
    got = exported(db, thresholds=thresholds)
    assert_same(got, stored.expected(thresholds=lower))
    assert set(got) > set(stored.expected()), "lower thresholds add labels, keep the others"

    higher = {"drawing": 0.9}
    assert_same(exported(db, thresholds=higher), stored.expected(thresholds=higher))
    assert_same(
        exported(db, thresholds=lower, min_confidence=0.5, labels=("map",), model_version=OLD),
        stored.expected(version=OLD, thresholds=lower, min_confidence=0.5, keys=("map",)),
    )


def test_rethresholding_with_the_models_own_thresholds_reproduces_the_stored_labels(
    catalogue,
) -> None:
    db, _ = catalogue
    own = {"photograph": 0.5, "drawing": 0.4, "map": 0.6}
    stored_text = export_text(db, ExportFilter(datasets=("1001",)))
    rescored = export_text(db, ExportFilter(datasets=("1001",), thresholds=own))
    assert annotations_in(rescored) == annotations_in(stored_text)


def test_filters_that_name_nothing_known_are_refused(catalogue) -> None:
    db, _ = catalogue
    cases = [
        (ExportFilter(model_version="nope@1"), "model_version", "unknown model version nope@1"),
        (ExportFilter(run_id=42), "run_id", "run 42 does not exist"),
        (
            ExportFilter(datasets=("1001", "9999", "nosuch")),
            "datasets",
            "^no record belongs to dataset 9999, nosuch$",
        ),
        (ExportFilter(labels=("portrait",)), "labels", "^names classes no model has: portrait"),
        (ExportFilter(thresholds={"mapp": 0.3}), "thresholds", "^names classes no model has: mapp"),
        (ExportFilter(reviewed="maybe"), "reviewed", "^reviewed must be one of any, not-rejected"),
    ]
    for filters, field, message in cases:
        with pytest.raises(InvalidValue, match=message) as refused:
            export_text(db, filters)
        assert refused.value.field == field
        assert "--" not in str(refused.value), "a library error names no CLI flag"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[0.5]", "must be a JSON object"),
        ('{"map": 1.5}', "'map' must be a number in \\[0, 1\\]"),
        ('{"map": true}', "'map' must be a number"),
        ("{map: 0.5}", "is not valid JSON"),
    ],
)
def test_a_bad_thresholds_file_is_one_clear_error(tmp_path: Path, content: str, message) -> None:
    path = tmp_path / "thresholds.json"
    path.write_text(content)
    with pytest.raises(ExportError, match=message) as refused:
        read_thresholds(path)
    assert refused.value.field == "thresholds"


def test_a_score_equal_to_its_new_threshold_is_a_label(tmp_path: Path) -> None:
    """The tie: 0.43 against a threshold of 0.43 is a label, as the worker decides it."""
    db = open_database(f"sqlite:///{tmp_path}/tie.sqlite3")
    record_id = "/1001/tie"
    with db.transaction() as session:
        register_model(session, OLD, "pilot", "resnet18", MODEL_LABELS, OWN_THRESHOLDS)
        upsert_records(
            session, [Record(record_id, "1001", item_uri(record_id), image_url(record_id))]
        )
        outcome = RecordOutcome(
            record_id,
            Outcome.BELOW_THRESHOLD,
            scores=[0.43, 0.1, 0.1],
            labels=[],
            image_url=image_url(record_id),
        )
        save_outcomes(session, None, OLD, [outcome])
    assert exported(db) == {}
    tie = exported(db, thresholds={"photograph": 0.43})
    assert tie == {(record_id, OLD, "photograph"): pytest.approx(0.43)}
    assert exported(db, thresholds={"photograph": 0.43 + 1e-9}) == {}
    db.dispose()
