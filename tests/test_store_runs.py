"""The run and batch state changes of `enrichment.store`, called directly.

Each runs on SQLite and on PostgreSQL (where the SQL differs: the row lock
when a batch starts, the conditional UPDATE of a claim, COPY in the writes).
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from enrichment.errors import EnrichError, ScopeBusy
from enrichment.sources.records_file import Record
from enrichment.store import batches, retire, runs, workers
from enrichment.store.database import Database
from enrichment.store.locks import LockLiveness
from enrichment.store.query import run_summary
from enrichment.store.retire import RetiredVersion
from enrichment.store.runs import ModelRegistration, PreviousRun
from enrichment.store.schema import (
    Batch,
    BatchStatus,
    Label,
    Outcome,
    Result,
    Run,
    RunStatus,
    utc_now,
)
from enrichment.store.writes import (
    LabelScore,
    RecordOutcome,
    register_model,
    save_outcomes,
    upsert_records,
)
from enrichment.thresholds import DecisionRule
from tests.plans import scans_of

VERSION = "tiny@000000000000"
MODEL = ModelRegistration(
    VERSION, "tiny", "resnet18", [{"key": "a", "label": "A", "concept": "urn:a"}], [0.5]
)
SCOPE = {"source": "records_file", "path": "/records.jsonl"}


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/db.sqlite3"
    else:
        url = request.getfixturevalue("pg_url")
    database = Database(url)
    database.upgrade()
    yield database
    database.dispose()


def record(number: int, image: str = "http://img/1.jpg") -> Record:
    return Record(f"/d/{number}", "d", f"http://data.europeana.eu/item/d/{number}", image)


def new_run(db: Database, scope: dict = SCOPE, full: bool = False) -> int:
    return runs.start_run(db, MODEL, "on_demand", "enrich.on_demand", scope, _fresh, full)


def _fresh(previous: PreviousRun | None) -> dict:
    return {"pending": []} if previous is None else {"pending": [], "previous_run": previous.id}


def test_a_run_starts_scheduling_and_a_second_over_its_scope_is_refused(db: Database) -> None:
    run_id = new_run(db)
    state = runs.run_state(db, run_id)
    assert (state.status, state.queue, state.model_version) == (
        RunStatus.SCHEDULING,
        "enrich.on_demand",
        VERSION,
    )
    assert state.checkpoint == {"pending": []}
    with pytest.raises(ScopeBusy, match=f"run {run_id} over the same scope has not finished"):
        new_run(db)
    assert new_run(db, {**SCOPE, "path": "/other.jsonl"}) != run_id  # another scope is free
    with pytest.raises(EnrichError, match="run 999 does not exist"):
        runs.run_state(db, 999)


def test_the_first_checkpoint_sees_the_last_completed_run_unless_full(db: Database) -> None:
    first = new_run(db)
    runs.mark_running(db, first)
    assert runs.complete_run_if_done(db, first)  # no batches: done at once
    second = new_run(db)
    assert runs.run_state(db, second).checkpoint == {"pending": [], "previous_run": first}
    runs.mark_failed(db, second, "stopped")
    third = new_run(db, full=True)
    assert runs.run_state(db, third).checkpoint == {"pending": []}


def test_a_page_stores_its_records_and_cuts_whole_batches(db: Database) -> None:
    run_id = new_run(db)
    page = [record(1), record(2), record(2), record(3)]  # one served twice
    committed = runs.commit_page(
        db, run_id, VERSION, page, {"records": 4}, {"pending": []}, 2, False
    )
    assert committed.checkpoint == {"pending": ["/d/3"], "position": {"records": 4}}
    assert len(committed.batch_ids) == 1
    state = runs.run_state(db, run_id)
    assert (state.records_seen, state.batches_total) == (3, 1)
    # The next page: a record still waiting is not enqueued twice.
    page = [record(3), record(4), record(5)]
    committed = runs.commit_page(
        db, run_id, VERSION, page, {"records": 7}, committed.checkpoint, 2, False
    )
    assert committed.checkpoint["pending"] == ["/d/5"]
    tail = runs.commit_tail(db, run_id, VERSION, committed.checkpoint, 2)
    assert tail.checkpoint == {"pending": [], "position": {"records": 7}, "done": True}
    assert len(tail.batch_ids) == 1
    assert runs.unfinished_batches(db, run_id) == _batch_ids(db, run_id)
    with db.transaction() as session:
        run = session.get(Run, run_id)
        assert (run.records_seen, run.records_enqueued, run.batches_total) == (6, 5, 3)
    assert _record_lists(db, run_id) == [["/d/1", "/d/2"], ["/d/3", "/d/4"], ["/d/5"]]


def test_only_records_needing_work_are_enqueued_and_errors_are_retried(db: Database) -> None:
    first = new_run(db)
    committed = runs.commit_page(
        db, first, VERSION, [record(1), record(2)], {}, {"pending": []}, 2, False
    )
    (batch_id,) = committed.batch_ids
    runs.commit_tail(db, first, VERSION, committed.checkpoint, 2)
    runs.mark_running(db, first)
    batches.finish_batch(
        db,
        batch_id,
        first,
        VERSION,
        [
            RecordOutcome("/d/1", Outcome.BELOW_THRESHOLD, [0.1], image_url="http://img/1.jpg"),
            RecordOutcome.failed("/d/2", "fetch_error", "gone", image_url="http://img/1.jpg"),
        ],
    )
    assert runs.complete_run_if_done(db, first)
    with db.transaction() as session:
        counts = session.get(Run, first).final_counts
    assert counts["outcomes"] == {"below_threshold": 1, "error": 1}
    assert counts["errors_by_reason"] == {"fetch_error": 1}
    second = new_run(db)
    checkpoint = runs.run_state(db, second).checkpoint
    # Unchanged and classified: skipped; failed before, or its image changed: enqueued.
    page = [record(1), record(2), record(3, "http://img/new.jpg")]
    committed = runs.commit_page(db, second, VERSION, page, {}, checkpoint, 10, False)
    assert committed.checkpoint["pending"] == ["/d/2", "/d/3"]
    # The tail adds the previous run's errors that the pages did not bring back.
    tail = runs.commit_tail(db, second, VERSION, {**checkpoint, "pending": []}, 10)
    with db.transaction() as session:
        (retried,) = tail.batch_ids
        assert session.get(Batch, retried).record_ids == ["/d/2"]


def test_a_run_completes_only_when_running_and_every_batch_finished(db: Database) -> None:
    run_id, (one, two) = _run_with_batches(db, 2)
    assert not runs.complete_run_if_done(db, run_id)  # still scheduling
    runs.mark_running(db, run_id)
    batches.finish_batch(db, one, run_id, VERSION, [])
    assert not runs.complete_run_if_done(db, run_id)
    assert batches.give_up_batch(db, two, "batch_failed", "boom") == run_id
    assert runs.complete_run_if_done(db, run_id)
    assert not runs.complete_run_if_done(db, run_id)  # once
    state = runs.run_state(db, run_id)
    assert state.status == RunStatus.COMPLETED
    assert runs.unfinished_batches(db, run_id) == []
    # Its batches are counted once, when it completes, and read from there after.
    with db.transaction() as session:
        assert session.get(Run, run_id).final_counts["batches"] == {"done": 1, "failed": 1}
        session.execute(sa.delete(Batch).where(Batch.run_id == run_id))
    assert run_summary(db, run_id).batches == {"done": 1, "failed": 1}


def test_an_interrupted_runs_rate_is_up_to_its_last_finished_batch(db: Database) -> None:
    """Nobody works on it: its rate stays what it was when work stopped, instead of falling
    for as long as it waits for `enrich resume`."""
    run_id, (one, _) = _run_with_batches(db, 2)
    runs.mark_running(db, run_id)
    outcomes = [RecordOutcome(f"/d/{n}", Outcome.BELOW_THRESHOLD, [0.1]) for n in (1, 2)]
    batches.finish_batch(db, one, run_id, VERSION, outcomes)
    with db.transaction() as session:
        started = session.get(Run, run_id).started_at
        session.execute(  # the batch finished 4 s in; the run was stopped long ago
            sa.update(Run).where(Run.id == run_id).values(started_at=started - timedelta(hours=1))
        )
        session.execute(
            sa.update(Batch)
            .where(Batch.id == one)
            .values(updated_at=started - timedelta(hours=1) + timedelta(seconds=4))
        )
    summary = run_summary(db, run_id, LockLiveness(db))
    assert (summary.status, summary.records_done) == ("interrupted", 2)
    assert (summary.rate, summary.eta_seconds) == (0.5, None)
    assert run_summary(db, run_id).rate == round(2 / 3600, 2), "a live run's rate is to now"


def test_marking_queued_moves_only_pending_batches(db: Database) -> None:
    run_id, (one, two) = _run_with_batches(db, 2)
    batches.finish_batch(db, one, run_id, VERSION, [])
    runs.mark_queued(db, [one, two])
    assert _statuses(db, run_id) == {one: BatchStatus.DONE, two: BatchStatus.QUEUED}


def test_a_start_counts_its_attempt_before_work_and_refuses_a_poison_batch(db: Database) -> None:
    run_id, (batch_id,) = _run_with_batches(db, 1, [["/d/1", "/d/2", "/d/1"]])
    started = batches.start_batch(db, batch_id, max_attempts=2, heartbeat=True)
    assert started is not None
    assert (started.run_id, started.model_version) == (run_id, VERSION)
    assert [r.id for r in started.records] == ["/d/1", "/d/2"]  # a record listed twice, once
    batches.note_batch_error(db, batch_id, "RuntimeError: " + "x" * 3000)
    assert batches.start_batch(db, batch_id, max_attempts=2) is not None
    with pytest.raises(batches.AttemptsExhausted, match=r"started 2 times.*last error: Runtime"):
        batches.start_batch(db, batch_id, max_attempts=2)
    with db.transaction() as session:
        batch = session.get(Batch, batch_id)
        assert (batch.attempts, len(batch.error), batch.heartbeat_at) == (2, 2000, None)
    assert batches.give_up_batch(db, batch_id, "batch_failed", "gave up") == run_id
    assert batches.give_up_batch(db, batch_id, "batch_failed", "again") is None  # finished
    assert batches.start_batch(db, batch_id, max_attempts=2) is None
    assert batches.batch_run(db, batch_id) == run_id
    with pytest.raises(LookupError):
        batches.start_batch(db, 12345, max_attempts=2)


def test_concurrent_starts_count_every_attempt_under_the_row_lock(pg_url: str) -> None:
    """PostgreSQL: two deliveries of a batch at once count two attempts (SELECT FOR UPDATE).
    SQLite has one starting thread per process (the in-process dispatcher's)."""
    db = Database(pg_url)
    db.upgrade()
    _, (batch_id,) = _run_with_batches(db, 1)
    errors: list[BaseException] = []

    def start() -> None:
        try:
            batches.start_batch(db, batch_id, max_attempts=100)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with db.transaction() as session:
        assert session.get(Batch, batch_id).attempts == 6


def test_a_stale_batch_is_claimed_once_and_its_beat_stops_with_it(db: Database) -> None:
    run_id, (beating, stale, idle) = _run_with_batches(db, 3)
    for batch_id in (beating, stale):
        batches.start_batch(db, batch_id, max_attempts=3, heartbeat=True)
    batches.start_batch(db, idle, max_attempts=3)  # no heartbeat: never swept
    _age_heartbeat(db, stale, timedelta(minutes=10))
    batches.touch_heartbeats(db, [beating, stale])  # the stale one's worker is alive after all
    _age_heartbeat(db, stale, timedelta(minutes=10))
    claims: list[list[batches.StaleBatch]] = []
    sweepers = [
        threading.Thread(target=lambda: claims.append(batches.claim_stale_batches(db, 60)))
        for _ in range(4)
    ]
    for sweeper in sweepers:
        sweeper.start()
    for sweeper in sweepers:
        sweeper.join()
    claimed_once = [batches.StaleBatch(stale, "enrich.on_demand", VERSION)]
    assert [claim for claimed in claims for claim in claimed] == claimed_once
    assert _statuses(db, run_id)[stale] == BatchStatus.QUEUED
    assert batches.claim_stale_batches(db, 60) == []  # its heartbeat is cleared
    batches.restart_heartbeats(db, [stale])  # not sent after all: a later sweep finds it
    _age_heartbeat(db, stale, timedelta(minutes=10))
    assert batches.claim_stale_batches(db, 60) == claimed_once


def test_a_batch_for_another_version_is_refused_without_counting_an_attempt(
    db: Database,
) -> None:
    _, (batch_id,) = _run_with_batches(db, 1)
    for _ in range(3):  # however often it reaches the wrong worker, nothing is counted
        with pytest.raises(batches.Misrouted) as refused:
            batches.start_batch(db, batch_id, max_attempts=1, version="other@000000000000")
    assert (refused.value.queue, refused.value.model_version) == ("enrich.on_demand", VERSION)
    with db.transaction() as session:
        assert session.get(Batch, batch_id).attempts == 0
    assert batches.start_batch(db, batch_id, max_attempts=1, version=VERSION) is not None


def test_moving_a_run_moves_its_unfinished_batches_and_refuses_when_none_are_left(
    db: Database,
) -> None:
    run_id, (done, running, waiting) = _run_with_batches(db, 3)
    other = ModelRegistration(
        "tiny@bbbbbbbbbbbb",
        "tiny",
        "resnet18",
        [{"key": "a", "label": "A", "concept": "urn:a"}],
        [0.5],
    )
    batches.start_batch(db, done, max_attempts=3)
    batches.finish_batch(
        db, done, run_id, VERSION, [RecordOutcome("/d/1", Outcome.LABELLED, [0.9])]
    )
    batches.start_batch(db, running, max_attempts=3, heartbeat=True)
    runs.mark_running(db, run_id)
    with pytest.raises(EnrichError, match="already for model"):
        runs.move_run(db, run_id, MODEL)
    assert runs.move_run(db, run_id, other) == 2
    assert runs.run_state(db, run_id).model_version == other.version
    with db.transaction() as session:
        moved = [session.get(Batch, batch_id) for batch_id in (running, waiting)]
        assert [(b.attempts, b.heartbeat_at) for b in moved] == [(0, None), (0, None)]
    # The old version's worker still running a moved batch may not commit it.
    with pytest.raises(batches.Misrouted):
        batches.finish_batch(
            db, running, run_id, VERSION, [RecordOutcome("/d/3", Outcome.LABELLED, [0.9])]
        )
    for batch_id, record_id in ((running, "/d/3"), (waiting, "/d/5")):
        batches.start_batch(db, batch_id, max_attempts=3, version=other.version)
        batches.finish_batch(
            db, batch_id, run_id, other.version, [RecordOutcome(record_id, Outcome.LABELLED, [0.8])]
        )
    runs.complete_run_if_done(db, run_id)
    with pytest.raises(EnrichError, match="nothing left to move"):
        runs.move_run(db, run_id, MODEL)
    with db.transaction() as session:
        versions = dict(session.execute(sa.select(Result.record_id, Result.model_version)).all())
    assert versions == {"/d/1": VERSION, "/d/3": other.version, "/d/5": other.version}
    # Completed, it is no baseline for the next incremental run of its new version: /d/1 has
    # only the first version's result, and paging from the moved run's start would pass
    # over it for good (retiring the first version then left it with none).
    assert runs.run_state(db, run_id).checkpoint["moved_from"] == [VERSION]
    scope = runs.run_state(db, run_id).scope
    after = runs.start_run(db, other, "on_demand", "enrich.on_demand", scope, _fresh, False)
    assert runs.run_state(db, after).checkpoint == {"pending": []}


def test_a_run_is_not_moved_to_a_retired_version(db: Database) -> None:
    """Refused before anything changes: the moved run would no longer hold its own version,
    which could then be retired under it, its results with it."""
    gone = ModelRegistration(
        "tiny@dddddddddddd",
        "tiny",
        "resnet18",
        [{"key": "a", "label": "A", "concept": "urn:a"}],
        [0.5],
    )
    with db.transaction() as session:
        register_model(session, gone.version, "tiny", "resnet18", gone.classes, gone.thresholds)
    retire.mark_retired(db, gone.version)
    run_id, _ = _run_with_batches(db, 2)
    with pytest.raises(RetiredVersion):
        runs.move_run(db, run_id, gone)
    assert runs.run_state(db, run_id).model_version == VERSION
    assert "moved_from" not in runs.run_state(db, run_id).checkpoint


def test_live_versions_are_those_reported_recently(db: Database) -> None:
    workers.advertise(db, "gpu1:10", VERSION)
    workers.advertise(db, "gpu2:11", "tiny@bbbbbbbbbbbb")
    assert workers.live_versions(db, 60) == {VERSION, "tiny@bbbbbbbbbbbb"}
    workers.withdraw(db, "gpu2:11")
    with db.transaction() as session:  # gpu1's machine died a while ago
        session.execute(
            sa.update(workers.LiveWorker).values(seen_at=utc_now() - timedelta(minutes=10))
        )
    assert workers.live_versions(db, 60) == set()
    workers.advertise(db, "gpu1:10", VERSION)
    assert workers.live_versions(db, 60) == {VERSION}


def test_finishing_a_batch_writes_its_outcomes_and_stored_scores_are_found(db: Database) -> None:
    run_id, (batch_id,) = _run_with_batches(db, 1)
    batches.start_batch(db, batch_id, max_attempts=3, heartbeat=True)
    outcomes = [
        RecordOutcome("/d/1", Outcome.LABELLED, [0.9], image_sha256="aa"),
        RecordOutcome("/d/2", Outcome.BELOW_THRESHOLD, [0.1], image_sha256="bb"),
    ]
    batches.finish_batch(db, batch_id, run_id, VERSION, outcomes)
    batches.finish_batch(db, batch_id, run_id, VERSION, outcomes)  # twice: the same rows
    assert _statuses(db, run_id) == {batch_id: BatchStatus.DONE}
    assert batches.stored_scores(db, VERSION, ["aa", "bb", "cc"]) == {"aa": [0.9], "bb": [0.1]}
    assert batches.stored_scores(db, "other@1", ["aa"]) == {}


def test_a_batch_decided_by_other_thresholds_is_stored_as_the_registered_ones_decide(
    db: Database,
) -> None:
    """A worker holding thresholds from before a recalibration (0.15 against the registered
    0.5) passes them with its outcomes; the registered ones decide."""
    run_id, (batch_id,) = _run_with_batches(db, 1)
    batches.start_batch(db, batch_id, max_attempts=3, heartbeat=True)
    outcomes = [
        RecordOutcome("/d/1", Outcome.BELOW_THRESHOLD, [0.9]),
        RecordOutcome("/d/2", Outcome.LABELLED, [0.2], [LabelScore("a", "urn:a", 0.2)]),
    ]
    batches.finish_batch(db, batch_id, run_id, VERSION, outcomes, DecisionRule((0.15,)))
    with db.transaction() as session:
        stored = dict(session.execute(sa.select(Result.record_id, Result.status)).all())
        labels = session.execute(sa.select(Label.record_id, Label.confidence)).all()
    assert stored == {"/d/1": Outcome.LABELLED, "/d/2": Outcome.BELOW_THRESHOLD}
    assert labels == [("/d/1", 0.9)]


def _run_with_batches(
    db: Database, count: int, record_ids: list[list[str]] | None = None
) -> tuple[int, list[int]]:
    run_id = new_run(db, {**SCOPE, "path": f"/{time.monotonic_ns()}.jsonl"})
    lists = record_ids or [[f"/d/{2 * n + 1}", f"/d/{2 * n + 2}"] for n in range(count)]
    records = {record_id for ids in lists for record_id in ids}
    numbered = [record(int(record_id.rsplit("/", 1)[1])) for record_id in sorted(records)]
    runs.commit_page(db, run_id, VERSION, numbered, {}, {"pending": []}, 10**6, False)
    with db.transaction() as session:
        added = [
            Batch(run_id=run_id, seq=seq, status=BatchStatus.PENDING, attempts=0, record_ids=ids)
            for seq, ids in enumerate(lists)
        ]
        session.add_all(added)
        session.flush()
        return run_id, [batch.id for batch in added]


def _batch_ids(db: Database, run_id: int) -> list[int]:
    with db.transaction() as session:
        return [b.id for b in session.query(Batch).filter_by(run_id=run_id).order_by(Batch.seq)]


def _record_lists(db: Database, run_id: int) -> list[list[str]]:
    with db.transaction() as session:
        query = session.query(Batch).filter_by(run_id=run_id).order_by(Batch.seq)
        return [batch.record_ids for batch in query]


def _statuses(db: Database, run_id: int) -> dict[int, str]:
    with db.transaction() as session:
        return {b.id: b.status for b in session.query(Batch).filter_by(run_id=run_id)}


def _age_heartbeat(db: Database, batch_id: int, age: timedelta) -> None:
    with db.transaction() as session:
        batch = session.get(Batch, batch_id)
        batch.heartbeat_at = utc_now() - age


def test_a_sweep_reads_the_batches_being_worked_not_every_batch(pg_url: str) -> None:
    """Every worker process sweeps for stale heartbeats each interval (15 s), while the
    batches of every run ever stay in the table: 700,000 after one run over Europeana.
    A sweep reads the batches with a heartbeat alone (a partial index), as PostgreSQL ran
    it (auto_explain): before, each read the whole table."""
    db = Database(pg_url)
    db.upgrade()
    run_id, (beating, stale) = _run_with_batches(db, 2)
    with db.transaction() as session:
        session.add_all(
            Batch(run_id=run_id, seq=seq, status=BatchStatus.DONE, attempts=1, record_ids=[])
            for seq in range(2, 3002)
        )
    for batch_id in (beating, stale):
        batches.start_batch(db, batch_id, max_attempts=3, heartbeat=True)
    _age_heartbeat(db, stale, timedelta(minutes=10))
    with db.engine.connect() as connection:
        connection.execute(sa.text("COMMIT"))
        connection.execute(sa.text("ANALYZE batches"))
    with scans_of(db) as scans:
        claimed = batches.claim_stale_batches(db, 60)
    assert [claim.batch_id for claim in claimed] == [stale]
    read = [scan for scan in scans if scan.table.startswith(("batches", "ix_batches"))]
    assert read and all(scan.rows <= 2 for scan in read), read
    db.dispose()


def test_the_check_for_a_runs_end_reads_its_unfinished_batches_not_its_done_ones(
    pg_url: str,
) -> None:
    """After every batch, whether its run is complete: near the end of a run over Europeana
    (470,000 batches) nearly all are done, and the check read them all, every batch. It reads
    the unfinished ones alone (a partial index), as PostgreSQL ran it (auto_explain)."""
    db = Database(pg_url)
    db.upgrade()
    run_id, (last,) = _run_with_batches(db, 1)
    with db.transaction() as session:
        session.add_all(
            Batch(run_id=run_id, seq=seq, status=BatchStatus.DONE, attempts=1, record_ids=[])
            for seq in range(1, 3001)
        )
        session.get(Batch, last).seq = 3001  # the last one still to finish
    runs.mark_running(db, run_id)
    with db.engine.connect() as connection:
        connection.execute(sa.text("COMMIT"))
        connection.execute(sa.text("ANALYZE batches"))
    with scans_of(db) as scans:
        assert not runs.complete_run_if_done(db, run_id)
    read = [scan for scan in scans if scan.table.startswith(("batches", "ix_batches"))]
    assert read and all(scan.rows <= 1 for scan in read), read
    batches.start_batch(db, last, max_attempts=3)
    batches.finish_batch(db, last, run_id, VERSION, [])
    assert runs.complete_run_if_done(db, run_id)
    db.dispose()


def test_an_image_many_records_share_is_looked_up_once_per_version(pg_url: str) -> None:
    """The dedupe finds the scores a version gave an image, whatever other versions gave it
    and however many records share it (a placeholder): the lookup reads one row of the
    version's, as PostgreSQL ran it (auto_explain), where it read every row of the image."""
    db = Database(pg_url)
    db.upgrade()
    newer = "tiny@111111111111"
    placeholder, other = "ab" * 32, "cd" * 32
    ids = [f"/d/{n}" for n in range(3000)]
    with db.transaction() as session:
        for version in (VERSION, newer):
            register_model(session, version, "tiny", "resnet18", MODEL.classes, [0.5])
        upsert_records(session, [record(n) for n in range(3000)])
    for start in range(0, len(ids), 1000):
        with db.transaction() as session:
            save_outcomes(
                session,
                None,
                VERSION,
                [
                    RecordOutcome(r, Outcome.BELOW_THRESHOLD, [0.2], image_sha256=placeholder)
                    for r in ids[start : start + 1000]
                ],
            )
    with db.transaction() as session:
        save_outcomes(
            session,
            None,
            newer,
            [
                RecordOutcome(ids[-2], Outcome.BELOW_THRESHOLD, [0.3], image_sha256=placeholder),
                RecordOutcome(ids[-1], Outcome.BELOW_THRESHOLD, [0.4], image_sha256=other),
            ],
        )
    with db.engine.connect() as connection:
        connection.execute(sa.text("COMMIT"))
        connection.execute(sa.text("ANALYZE results"))
    with scans_of(db) as scans:
        found = batches.stored_scores(db, newer, [placeholder, "ef" * 32, other, placeholder])
        found_before = batches.stored_scores(db, VERSION, [placeholder, other])
    assert found == {placeholder: [0.3], other: [0.4]}
    assert found_before == {placeholder: [0.2]}
    read = [scan for scan in scans if scan.table.startswith(("results", "ix_results"))]
    assert read and sum(scan.rows for scan in read) <= 5, read
    db.dispose()
