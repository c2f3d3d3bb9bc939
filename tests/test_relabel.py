"""A recalibrated model version's labels are decided again from the stored scores.

Calibration keeps the version and changes its thresholds; the next run registers them.
Before, records classified earlier kept the labels the old thresholds gave, and an export
of the version shipped both rules under one `generator.version`. On both dialects: the
labels, statuses and review items after re-registering and relabelling equal what
classifying every record afresh with the new thresholds stores (`export_support.labels_of`);
the relabelling goes a chunk per transaction from a cursor that survives an interruption,
and a run, an export and a publish finish it before they use any label.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from enrichment.cli import cli
from enrichment.config import Settings
from enrichment.model.spec import ClassSpec, ModelSpec
from enrichment.publish.export import ExportFilter
from enrichment.report.report import gather, render
from enrichment.review.app import create_app
from enrichment.runs import service
from enrichment.runs.schedule import ModelIdentity, RunKind
from enrichment.store import relabel
from enrichment.store.batches import as_registered
from enrichment.store.database import Database
from enrichment.store.query import run_summary
from enrichment.store.relabel import finish_relabelling, pending_relabelling, relabel_some
from enrichment.store.review_tables import ReviewItem
from enrichment.store.runs import ModelRegistration, start_run
from enrichment.store.schema import Label, ModelRow, Outcome, Result
from enrichment.store.writes import LabelScore, RecordOutcome, register_model, save_outcomes
from enrichment.thresholds import DecisionRule, decide
from tests.conftest import upgraded_database
from tests.export_support import (
    KEYS,
    MODEL_LABELS,
    NEW,
    OLD,
    OWN_THRESHOLDS,
    Catalogue,
    annotations_in,
    build_catalogue,
    export_text,
    exported_labels,
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


def register(db: Database, version: str, thresholds: list[float], top_k: int = 0) -> None:
    with db.transaction() as session:
        register_model(session, version, "pilot", "resnet18", MODEL_LABELS, thresholds, top_k)


def recalibrate(db: Database, version: str, thresholds: list[float], top_k: int = 0) -> None:
    """Registered, then relabelled to the end, as the run that registers it does."""
    register(db, version, thresholds, top_k)
    finish_relabelling(db)


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


def labelled_items(db: Database) -> set[tuple[str, str]]:
    with db.transaction() as session:
        return set(
            session.execute(
                sa.select(ReviewItem.record_id, ReviewItem.label_key).where(ReviewItem.labelled)
            ).all()
        )


def expected_labels(
    catalogue: Catalogue, thresholds: dict[str, float] | None
) -> dict[str, dict[str, float]]:
    """OLD's labels as classifying every record afresh by these thresholds gives them."""
    return {
        record_id: found
        for record_id, by_version in catalogue.results.items()
        if (found := labels_of(by_version[OLD], thresholds))
    }


def test_a_registration_leaves_the_relabelling_to_chunks_that_resume_from_a_cursor(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Registering only sets the cursor; each chunk is one transaction over the next
    results in record order (labels, statuses and review items), and an interruption
    between chunks loses nothing: whoever finishes goes on from the cursor."""
    monkeypatch.setattr(relabel, "CHUNK", 6)
    catalogue = build_catalogue(db)
    before, items_before = stored(db, OLD), labelled_items(db)
    ids = sorted(catalogue.results)
    current_old = {r for r, by in catalogue.results.items() if by.get(NEW) is None}

    register(db, OLD, RECALIBRATED_THRESHOLDS)
    assert stored(db, OLD) == before, "the registration itself relabels nothing"
    assert labelled_items(db) == items_before
    assert pending_relabelling(db) == {OLD: len(ids)}

    changed = relabel.Relabelled()
    assert relabel_some(db, OLD, changed)  # one chunk, then an interruption
    assert changed.results == 6
    assert pending_relabelling(db) == {OLD: len(ids) - 6}
    new = expected_labels(catalogue, RECALIBRATED)
    first = set(ids[:6])
    labels = stored(db, OLD)[0]
    assert {r: f for r, f in labels.items() if r in first} == {
        r: f for r, f in new.items() if r in first
    }
    assert {r: f for r, f in labels.items() if r not in first} == {
        r: f for r, f in before[0].items() if r not in first
    }, "the rest waits for the next chunk"
    assert {(r, k) for r, k in labelled_items(db) if r in first & current_old} == {
        (r, k) for r, found in new.items() if r in first & current_old for k in found
    }, "the chunk's review items follow its labels in the same transaction"

    other = {"drawing": 0.3}  # recalibrated again before the first finished: starts over
    register(db, OLD, [other.get(k, own) for k, own in zip(KEYS, OWN_THRESHOLDS, strict=True)])
    assert pending_relabelling(db) == {OLD: len(ids)}
    done = finish_relabelling(db)
    assert done[OLD].results == len(ids)
    assert pending_relabelling(db) == {}
    final = expected_labels(catalogue, other)
    assert stored(db, OLD)[0] == final
    assert {(r, k) for r, k in labelled_items(db) if r in current_old} == {
        (r, k) for r, found in final.items() if r in current_old for k in found
    }
    assert finish_relabelling(db) == {}, "nothing is left to do twice"


def test_an_export_finishes_a_pending_relabelling_before_it_reads_a_label(db: Database) -> None:
    catalogue = build_catalogue(db)
    register(db, OLD, RECALIBRATED_THRESHOLDS)  # a run registered it, then was stopped
    got = exported_labels(annotations_in(export_text(db, ExportFilter(model_version=OLD))))
    want = catalogue.expected(OLD, thresholds=RECALIBRATED)
    assert sorted(got) == sorted(want)
    assert all(abs(got[key] - want[key]) < 1e-6 for key in want), "6 decimals in JSON-LD"
    assert pending_relabelling(db) == {}


def test_a_run_registering_new_thresholds_relabels_before_its_first_batch(
    db: Database, tmp_path: Path
) -> None:
    catalogue = build_catalogue(db)
    seen: list[tuple[dict[str, int], dict[str, dict[str, float]]]] = []

    class Watching:
        """Sees what is stored when the run hands its first batches on."""

        def dispatch(self, db: Database, queue: str, batch_ids: list[int]) -> None:
            seen.append((pending_relabelling(db), stored(db, OLD)[0]))

    spec = ModelSpec(
        "pilot",
        "resnet18",
        224,
        tuple(
            ClassSpec(entry["key"], entry["label"], entry["concept"], threshold)
            for entry, threshold in zip(MODEL_LABELS, RECALIBRATED_THRESHOLDS, strict=True)
        ),
    )
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps({"id": f"/1003/r{n}"}) + "\n" for n in range(3)))
    service.start(
        db,
        Settings(database_url=db.url),
        service.records_scope(records),
        RunKind.ON_DEMAND,
        ModelIdentity(OLD, spec),
        Watching(),
        batch_size=10,
    )
    assert seen == [({}, expected_labels(catalogue, RECALIBRATED))]


def test_a_chunk_waits_for_a_batch_being_written_and_relabels_it(pg_url: str) -> None:
    """The other side of the registration's lock: a batch decided by the old rule and not
    yet committed holds the version's row (FOR SHARE) and its records' rows; the chunk
    waits for it, then reads its rows, so none of the old rule's labels is left behind."""
    db = Database(pg_url)
    db.upgrade()
    catalogue = build_catalogue(db)
    scores = {record_id: by[OLD] for record_id, by in catalogue.results.items()}
    register(db, OLD, RECALIBRATED_THRESHOLDS)
    relabelled = threading.Event()
    with db.transaction() as session:
        session.execute(
            sa.select(ModelRow.version).where(ModelRow.version == OLD).with_for_update(read=True)
        ).all()  # as `as_registered` holds it while the batch is written
        # The batch's write, by the rule its worker loaded (not decided again here).
        save_outcomes(session, None, OLD, decided_by(LOADED, scores))
        chunk = threading.Thread(target=lambda: (finish_relabelling(db), relabelled.set()))
        chunk.start()
        assert not relabelled.wait(1.0), "the chunk waits for the batch to commit"
    chunk.join(30)
    assert relabelled.is_set()
    assert stored(db, OLD)[0] == expected_labels(catalogue, RECALIBRATED)
    db.dispose()


def test_status_and_report_say_a_runs_relabelling_is_not_finished(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run stopped while it relabelled (before it paged anything) says so, and where; its
    report, whose label figures mix both rules meanwhile, says so too."""
    monkeypatch.setattr(relabel, "CHUNK", 6)
    build_catalogue(db)
    registration = ModelRegistration(
        OLD, "pilot", "resnet18", MODEL_LABELS, RECALIBRATED_THRESHOLDS
    )
    run_id = start_run(db, registration, "on_demand", "q", {"source": "test"}, lambda _: {}, False)
    changed = relabel.Relabelled()
    relabel_some(db, OLD, changed)  # then the process was stopped
    with db.transaction() as session:
        after = session.scalar(sa.select(ModelRow.relabel_after).where(ModelRow.version == OLD))
    assert after
    assert run_summary(db, run_id).relabelling_after == after
    shown = CliRunner().invoke(cli, ["status", "--run", str(run_id)], env={"DATABASE_URL": db.url})
    assert shown.exit_code == 0, shown.output
    assert f"relabelling    by the model's new thresholds, not finished (after record {after})" in (
        shown.output
    )
    assert 'id="relabelling"' in render(gather(db, run_id, 4), {})
    finish_relabelling(db)
    assert run_summary(db, run_id).relabelling_after is None
    again = CliRunner().invoke(cli, ["status", "--run", str(run_id)], env={"DATABASE_URL": db.url})
    assert "relabelling" not in again.output
    assert 'id="relabelling"' not in render(gather(db, run_id, 4), {})


def test_the_review_pages_say_which_labels_still_follow_old_thresholds(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A curator deciding on labels that the pending relabelling may remove is told so, on
    every page, until it has finished."""
    monkeypatch.setattr(relabel, "CHUNK", 6)
    build_catalogue(db)
    app = create_app(db, Settings(database_url="unused"), tmp_path / "cache")
    client = app.test_client()
    pages = ("/queue", "/queue?audit=1", "/stats", "/recent")
    record_id = client.get("/api/queue").get_json()["items"][0]["record_id"]
    # The JSON API says it to scripts, on what shows labels.
    answers = ("/api/queue", f"/api/record?id={quote(record_id)}", "/api/stats")
    for page in pages:
        assert 'id="relabelling-notice"' not in client.get(page).text, page
    for answer in answers:
        assert client.get(answer).get_json()["relabelling"] == [], answer
    register(db, OLD, RECALIBRATED_THRESHOLDS)
    relabel_some(db, OLD, relabel.Relabelled())  # started, not finished
    for page in pages:
        shown = client.get(page)
        assert shown.status_code == 200, page
        notice = re.search(r'<p class="notice" id="relabelling-notice".*?</p>', shown.text, re.S)
        assert notice and f"the labels of {OLD} are still being decided again" in notice[0], page
    for answer in answers:
        found = client.get(answer).get_json()
        assert found["relabelling"] == [OLD], answer
    # Nor does it tell a visitor who has not logged in which model versions there are.
    team = create_app(db, Settings(database_url="unused", review_token="t0ken"), tmp_path / "c2")
    login = team.test_client().get("/queue", follow_redirects=True)
    assert 'id="token"' in login.text and OLD not in login.text
    finish_relabelling(db)
    for page in pages:
        assert 'id="relabelling-notice"' not in client.get(page).text, page
    for answer in answers:
        assert client.get(answer).get_json()["relabelling"] == [], answer
