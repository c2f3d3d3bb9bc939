"""`enrich resume` over a records file: on in the file the run counted, never in another.

A records-file run's position is a count of records; a file regenerated at the
same path (tonight's export) holds other records in those places, so resuming
by count would skip records never enqueued and end "completed" without them.
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path

import pytest
import sqlalchemy as sa

from enrichment.config import Settings
from enrichment.errors import RecordsFileError
from enrichment.runs import service
from enrichment.runs.schedule import RunKind
from enrichment.sources import FILE_PAGE, RecordsFileSource
from enrichment.sources.records_file import read_records_file
from enrichment.store.database import Database
from enrichment.store.runs import run_state
from enrichment.store.schema import Run
from tests.conftest import write_jsonl

BATCH = 100


class BrokerDown:
    """A dispatcher whose broker cannot be reached: the run fails after its first page."""

    def dispatch(self, db: Database, queue: str, batch_ids: list[int]) -> None:
        raise ConnectionError("broker unreachable")


class Queued:
    """A dispatcher that keeps the batches it is handed, for workers that are not here."""

    def __init__(self) -> None:
        self.batch_ids: list[int] = []

    def dispatch(self, db: Database, queue: str, batch_ids: list[int]) -> None:
        self.batch_ids += batch_ids


def write_records(path: Path, prefix: str, count: int) -> Path:
    """`count` records without an image: they need no image host to be paged."""
    return write_jsonl(path, [{"id": f"/{prefix}/r{n:05d}"} for n in range(count)])


def failed_after_one_page(tmp_path: Path, tiny_model: Path) -> tuple[Database, Settings, int]:
    """A run over 1,200 records whose broker went away once the first 1,000 were committed."""
    settings = Settings(database_url=f"sqlite:///{tmp_path}/db.sqlite3", model_dir=tiny_model)
    db = Database(settings.database_url)
    db.upgrade()
    records = write_records(tmp_path / "records.jsonl", "700", FILE_PAGE + 200)
    started: list[int] = []
    with pytest.raises(ConnectionError):
        service.start(
            db,
            settings,
            service.records_scope(records),
            RunKind.ON_DEMAND,
            service.model_identity(tiny_model),
            BrokerDown(),
            BATCH,
            on_start=started.append,
        )
    [run_id] = started
    state = run_state(db, run_id)
    assert (state.status, state.checkpoint["position"]["records"]) == ("failed", FILE_PAGE)
    return db, settings, run_id


def resume(db: Database, settings: Settings, run_id: int) -> Queued:
    queued = Queued()
    service.resume(db, settings, run_id, lambda: nullcontext(queued), BATCH)
    return queued


def record_ids(db: Database) -> set[str]:
    with db.engine.connect() as connection:
        return set(connection.execute(sa.text("SELECT id FROM records")).scalars())


def regrown(path: Path) -> None:
    """Tonight's export at the same path: 100 new records."""
    write_records(path, "999", 100)


def rewritten_in_place(path: Path) -> None:
    """The same size, other records (ids of the same length), written a second later."""
    before = path.stat()
    path.write_text(path.read_text().replace("/700/", "/701/"))
    assert path.stat().st_size == before.st_size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))


@pytest.mark.parametrize("change", [regrown, rewritten_in_place])
def test_resume_refuses_a_records_file_that_changed_and_a_new_run_over_it_starts(
    tmp_path: Path, tiny_model: Path, change
) -> None:
    db, settings, run_id = failed_after_one_page(tmp_path, tiny_model)
    before = run_state(db, run_id)
    done = record_ids(db)
    path = tmp_path / "records.jsonl"
    change(path)

    with pytest.raises(RecordsFileError) as refused:
        resume(db, settings, run_id)
    assert str(refused.value) == (
        f"records file {path} changed since run {run_id} started (size/mtime); start a new run: "
        f"`enrich run --records {path}`, which enqueues only what is not done"
    )
    after = run_state(db, run_id)
    assert (after.status, after.checkpoint, after.batches_total) == (
        "failed",
        before.checkpoint,
        before.batches_total,
    )
    with db.engine.connect() as connection:
        error = connection.execute(sa.select(Run.error).where(Run.id == run_id)).scalar_one()
    assert error == str(refused.value)
    assert record_ids(db) == done

    # The scope (the key of the scheduler lock and of "not finished") is the path alone,
    # so two runs over one file are still refused whatever it holds.
    assert service.records_scope(path) == after.scope
    queued = Queued()
    progress = service.start(
        db,
        settings,
        service.records_scope(path),
        RunKind.ON_DEMAND,
        service.model_identity(tiny_model),
        queued,
        BATCH,
    )
    new_ids = {record.id for record in read_records_file(path)}
    assert progress.records_seen == len(new_ids)
    assert record_ids(db) == done | new_ids


def test_a_source_will_not_count_off_records_in_a_file_that_changed(tmp_path: Path) -> None:
    path = write_records(tmp_path / "records.jsonl", "700", 3)
    source = RecordsFileSource(path)
    [page] = source.pages(None)
    assert page.checkpoint == {"records": 3, **source.identity()}
    regrown(path)
    assert source.changed_since(page.checkpoint)
    with pytest.raises(RecordsFileError, match="changed since its run started"):
        next(source.pages(page.checkpoint))


def test_resume_in_the_same_file_pages_on_from_its_count(tmp_path: Path, tiny_model: Path) -> None:
    db, settings, run_id = failed_after_one_page(tmp_path, tiny_model)
    resume(db, settings, run_id)
    state = run_state(db, run_id)
    assert (state.status, state.records_seen) == ("running", FILE_PAGE + 200)


def test_a_run_from_before_file_identities_still_resumes(tmp_path: Path, tiny_model: Path) -> None:
    db, settings, run_id = failed_after_one_page(tmp_path, tiny_model)
    checkpoint = run_state(db, run_id).checkpoint
    checkpoint["position"] = {"records": checkpoint["position"]["records"]}
    with db.engine.begin() as connection:
        connection.execute(sa.update(Run).where(Run.id == run_id).values(checkpoint=checkpoint))
    assert "size" not in json.dumps(run_state(db, run_id).checkpoint)
    resume(db, settings, run_id)
    state = run_state(db, run_id)
    assert (state.status, state.records_seen) == ("running", FILE_PAGE + 200)
