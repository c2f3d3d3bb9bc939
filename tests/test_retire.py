"""Retiring a model version on PostgreSQL with 100,000 results: bounded transactions, refusals.

The rows go in with COPY (the library's batched writes would take minutes for
this many). Every DELETE of results is watched through SQLAlchemy's engine
events and summed per commit, so the test sees how many results each
transaction removed: never more than a chunk, never the whole version at once.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy import event
from sqlalchemy.engine import Engine

from enrichment.cli import cli
from enrichment.errors import InvalidValue
from enrichment.publish.export import ExportError, ExportFilter, check_filter
from enrichment.store import runs
from enrichment.store.database import Database
from enrichment.store.decisions import NewDecision, record_decisions
from enrichment.store.ledger import Publication, PublicationState
from enrichment.store.retire import (
    RetiredVersion,
    RetireRefused,
    mark_retired,
    remove_some,
    retired_versions,
)
from enrichment.store.review_tables import ReviewItem
from enrichment.store.reviews import Review
from enrichment.store.runs import ModelRegistration
from enrichment.store.schema import (
    Batch,
    BatchStatus,
    Label,
    ModelRow,
    RecordRow,
    Result,
    Run,
    RunStatus,
    utc_now,
)
from enrichment.store.writes import LabelScore, RecordOutcome, register_model, save_outcomes

OLD = "pilot@aaaaaaaaaaaa"
NEW = "pilot@bbbbbbbbbbbb"
CLASSES = [{"key": "photograph", "label": "Photograph", "concept": "urn:photograph"}]
RECORDS = 20_000  # 10 chunks: enough to see each transaction bounded
NEW_RECORDS = 1_000
CHUNK = 2_000
API = "http://annotations.example.org/"


def record_id(n: int) -> str:
    return f"/9001/item_{n:06d}"


def copy_rows(db: Database, table: str, columns: str, rows: Iterator[tuple[Any, ...]]) -> None:
    text = io.StringIO("".join("\t".join(str(value) for value in row) + "\n" for row in rows))
    connection = db.engine.raw_connection()
    try:
        with connection.cursor() as cursor:
            cursor.copy_expert(f"COPY {table} ({columns}) FROM STDIN", text)
        connection.commit()
    finally:
        connection.close()


@pytest.fixture
def db(pg_url: str) -> Iterator[Database]:
    database = Database(pg_url)
    database.upgrade()
    with database.transaction() as session:
        for version in (OLD, NEW):
            register_model(session, version, "pilot", "resnet18", CLASSES, [0.5])
    now = utc_now().isoformat()
    copy_rows(
        database,
        "records",
        "id, dataset, item_uri, first_seen, last_seen",
        ((record_id(n), "9001", f"http://x/{n}", now, now) for n in range(RECORDS)),
    )
    for version, count in ((OLD, RECORDS), (NEW, NEW_RECORDS)):
        copy_rows(
            database,
            "results",
            "record_id, model_version, status, scores, classified_at",
            ((record_id(n), version, "labelled", "{0.9}", now) for n in range(count)),
        )
        copy_rows(
            database,
            "labels",
            "record_id, model_version, label_key, concept, confidence",
            ((record_id(n), version, "photograph", "urn:photograph", 0.9) for n in range(count)),
        )
    record_decisions(
        database,
        [NewDecision(record_id(n), "photograph", OLD, "accept", "curator") for n in range(5)],
    )
    yield database
    database.dispose()


class DeletesPerTransaction:
    """Results deleted by each committed transaction, on every engine (the CLI opens its own)."""

    def __init__(self) -> None:
        self.pending = 0
        self.committed: list[int] = []

    def __enter__(self) -> DeletesPerTransaction:
        event.listen(Engine, "after_cursor_execute", self._executed)
        event.listen(Engine, "commit", self._commit)
        return self

    def __exit__(self, *_: object) -> None:
        event.remove(Engine, "after_cursor_execute", self._executed)
        event.remove(Engine, "commit", self._commit)

    def _executed(self, _conn, cursor, statement: str, *_: object) -> None:
        if statement.lstrip().upper().startswith("DELETE FROM RESULTS"):
            self.pending += cursor.rowcount

    def _commit(self, _conn) -> None:
        self.committed.append(self.pending)
        self.pending = 0


def counts(db: Database) -> dict[str, int]:
    with db.transaction() as session:

        def count(query: sa.Select) -> int:
            return session.execute(
                sa.select(sa.func.count()).select_from(query.subquery())
            ).scalar()

        return {
            "old_results": count(sa.select(Result.record_id).where(Result.model_version == OLD)),
            "old_labels": count(sa.select(Label.record_id).where(Label.model_version == OLD)),
            "new_results": count(sa.select(Result.record_id).where(Result.model_version == NEW)),
            "new_labels": count(sa.select(Label.record_id).where(Label.model_version == NEW)),
            "old_reviews": count(sa.select(Review.id).where(Review.model_version == OLD)),
        }


def test_a_version_is_retired_in_bounded_transactions_and_refused_while_live(
    db: Database,
) -> None:
    env = {"DATABASE_URL": db.url}
    with db.transaction() as session:
        session.add(
            Publication(
                api_url=API,
                record_id=record_id(7),
                label_key="photograph",
                concept="urn:photograph",
                model_version=OLD,
                content_sha256="0" * 64,
                annotation_id="http://data.europeana.eu/annotation/1",
                state=PublicationState.PUBLISHED,
            )
        )
        session.add(
            Run(
                kind="nightly",
                scope={"s": 1},
                model_version=OLD,
                status=RunStatus.RUNNING,
                queue="q",
            )
        )
    before = counts(db)
    assert before == {
        "old_results": RECORDS,
        "old_labels": RECORDS,
        "new_results": NEW_RECORDS,
        "new_labels": NEW_RECORDS,
        "old_reviews": 5,
    }

    # Refused while a run of the version is running, then while an annotation is live.
    refused = CliRunner().invoke(cli, ["model", "retire", OLD, "--yes"], env=env)
    assert refused.exit_code != 0
    assert "unfinished runs" in refused.output
    with db.transaction() as session:
        session.execute(sa.update(Run).values(status=RunStatus.COMPLETED))
    refused = CliRunner().invoke(cli, ["model", "retire", OLD, "--yes"], env=env)
    assert refused.exit_code != 0
    assert f"1 at {API}" in refused.output
    assert f"withdraw first: enrich publish --withdraw --model-version {OLD}" in refused.output
    assert counts(db) == before and retired_versions(db) == {}

    # Withdrawn: now it may go. Interrupted after three chunks...
    with db.transaction() as session:
        session.execute(sa.update(Publication).values(state=PublicationState.WITHDRAWN))
    with DeletesPerTransaction() as watched:
        retirement = mark_retired(db, OLD)
        assert retirement.remaining == RECORDS
        assert [remove_some(db, OLD, CHUNK) for _ in range(3)] == [CHUNK] * 3
    assert watched.committed == [0, CHUNK, CHUNK, CHUNK]
    assert counts(db)["old_results"] == RECORDS - 3 * CHUNK

    # ...a retired version is refused by runs and exports...
    model = ModelRegistration(OLD, "pilot", "resnet18", CLASSES, [0.5])
    with pytest.raises(RetiredVersion, match=f"{OLD} was retired on"):
        runs.start_run(db, model, "on_demand", "q", {"s": 2}, lambda _: {}, False)
    with db.transaction() as session:
        old_run = session.scalars(sa.select(Run.id)).one()
    with pytest.raises(RetiredVersion, match=f"{OLD} was retired on"):
        runs.mark_scheduling(db, old_run)  # `enrich resume` of one of its runs
    with pytest.raises(ExportError, match="was retired on") as refused_export:
        check_filter(db, ExportFilter(model_version=OLD))
    assert refused_export.value.field == "model_version"
    # A run of it, too (its export was an empty file, exit 0, and a dry publish planned
    # nothing, without a word of why).
    with pytest.raises(ExportError, match=f"run {old_run}'s model version {OLD} was retired"):
        check_filter(db, ExportFilter(run_id=old_run))

    # ...and the command goes on where it stopped.
    with DeletesPerTransaction() as watched:
        done = CliRunner().invoke(
            cli, ["model", "retire", OLD, "--yes", "--chunk", str(CHUNK)], env=env
        )
    assert done.exit_code == 0, done.output
    assert f"{OLD} retired: {RECORDS - 3 * CHUNK} results and their labels removed" in done.output
    deleted = [n for n in watched.committed if n]
    assert sum(deleted) == RECORDS - 3 * CHUNK
    assert max(deleted) == CHUNK and len(deleted) == (RECORDS - 3 * CHUNK) // CHUNK

    assert counts(db) == {
        "old_results": 0,
        "old_labels": 0,
        "new_results": NEW_RECORDS,
        "new_labels": NEW_RECORDS,
        "old_reviews": 5,  # training data: kept
    }
    with db.transaction() as session:
        row = session.get(ModelRow, OLD)
        assert row is not None and row.retired_at is not None
        assert session.execute(sa.select(sa.func.count()).select_from(Run)).scalar() == 1
    again = CliRunner().invoke(cli, ["model", "retire", OLD, "--yes"], env=env)
    assert again.exit_code == 0 and "0 results" in again.output


def test_an_unknown_version_and_an_unconfirmed_retire_change_nothing(db: Database) -> None:
    with pytest.raises(InvalidValue, match="unknown model version pilot@cccccccccccc"):
        mark_retired(db, "pilot@cccccccccccc")
    env = {"DATABASE_URL": db.url}
    declined = CliRunner().invoke(cli, ["model", "retire", OLD], input="n\n", env=env)
    assert declined.exit_code != 0
    assert f"Remove the {RECORDS} results of {OLD}" in declined.output
    assert retired_versions(db) == {} and counts(db)["old_results"] == RECORDS


def test_a_failed_run_with_a_queued_batch_holds_its_version(db: Database) -> None:
    """Scheduling failed, but a worker may still write the batch it had queued."""
    with db.transaction() as session:
        run = Run(kind="nightly", scope={}, model_version=OLD, status=RunStatus.FAILED, queue="q")
        session.add(run)
        session.flush()
        session.add(Batch(run_id=run.id, seq=0, status=BatchStatus.QUEUED, record_ids=["/a"]))
        run_id = run.id
    with pytest.raises(RetireRefused, match=f"unfinished runs \\({run_id}\\)"):
        mark_retired(db, OLD)
    with db.transaction() as session:
        session.execute(sa.update(Batch).values(status=BatchStatus.DONE))
    assert mark_retired(db, OLD).remaining == RECORDS


def test_retiring_a_version_hands_its_records_to_the_version_that_counts_next(
    tmp_path,
) -> None:
    """The stored current result and the review index follow the removal: a record the
    retired version classified last counts with the other version's result again, and a
    record only it classified leaves the review index."""
    small = Database(f"sqlite:///{tmp_path}/retire.sqlite3")
    small.upgrade()
    with small.transaction() as session:
        for version in (NEW, OLD):  # OLD classifies last: its results count at first
            register_model(session, version, "pilot", "resnet18", CLASSES, [0.5])
        session.add_all(
            RecordRow(id=f"/r/{n}", dataset="9001", item_uri=f"http://x/{n}") for n in range(4)
        )
    for version, numbers in ((NEW, range(2)), (OLD, range(4))):
        with small.transaction() as session:
            save_outcomes(
                session,
                None,
                version,
                [
                    RecordOutcome(
                        f"/r/{n}",
                        "labelled",
                        scores=[0.55],
                        labels=[LabelScore("photograph", "urn:photograph", 0.55)],
                    )
                    for n in numbers
                ],
            )

    def indexed() -> tuple[dict[str, str], set[str]]:
        with small.transaction() as session:
            current = dict(
                session.execute(
                    sa.select(Result.record_id, Result.model_version).where(Result.is_current)
                ).all()
            )
            items = set(session.scalars(sa.select(ReviewItem.record_id)))
        return current, items

    assert indexed() == ({f"/r/{n}": OLD for n in range(4)}, {f"/r/{n}" for n in range(4)})
    mark_retired(small, OLD)
    while remove_some(small, OLD, 3):
        pass
    assert indexed() == ({f"/r/{n}": NEW for n in range(2)}, {f"/r/{n}" for n in range(2)})
    small.dispose()
