"""`enrich publish` against a local stand-in of Europeana's Annotations API (annotations_api.py).

The database is filled the way the export tests fill it (tests/export_support.py):
records, two model versions, stored scores and labels, with every label also
computed independently, so each test knows exactly what the server must hold.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from enrichment.cli import cli
from enrichment.publish.annotations import europeana_annotation
from enrichment.publish.annotations_api import AnnotationsAPI, AnnotationsAPIError, AuthError
from enrichment.publish.export import ExportFilter
from enrichment.publish.sync import Publisher, PublishReport
from enrichment.publish.unsettled import PublishError, publish_lock
from enrichment.sources.records_file import Record
from enrichment.store.database import Database
from enrichment.store.ledger import (
    Publication,
    PublicationState,
    publication_status,
    publications_for_record,
)
from enrichment.store.reviews import Decision, Review
from enrichment.store.writes import register_model, upsert_records
from tests.annotations_api import ITEM_BASE, AnnotationsServer
from tests.conftest import REPO, VOCABULARY, enrich
from tests.export_support import (
    DATASETS,
    MODEL_LABELS,
    NEW,
    OLD,
    OWN_THRESHOLDS,
    Catalogue,
    image_url,
    item_uri,
    open_database,
    record_ids,
)
from tests.services import free_port

ALL = record_ids("1001") + record_ids("1002")
TOKEN = "good-token"


@pytest.fixture
def server() -> Iterator[AnnotationsServer]:
    stand_in = AnnotationsServer(lock_every=7)
    yield stand_in
    stand_in.close()


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = open_database(f"sqlite:///{tmp_path}/publish.sqlite3")
    yield database
    database.dispose()


def catalogue_of(db: Database, extra: list[Record] = ()) -> Catalogue:
    """The export tests' twenty records in two datasets, all classified by OLD only."""
    with db.transaction() as session:
        for version in (OLD, NEW):
            register_model(session, version, "pilot", "resnet18", MODEL_LABELS, OWN_THRESHOLDS)
        records = [
            Record(record_id, dataset, item_uri(record_id), image_url(record_id), "Museum")
            for dataset in DATASETS
            for record_id in record_ids(dataset)
        ]
        upsert_records(session, records + list(extra))
    catalogue = Catalogue()
    catalogue.classify(db, OLD, ALL + [record.id for record in extra])
    return catalogue


def publish(
    db: Database, server: AnnotationsServer, withdraw_all: bool = False, **filters
) -> PublishReport:
    api = AnnotationsAPI(server.url, TOKEN, concurrency=4, backoff=0.01)
    try:
        publisher = Publisher(db, server.url, api, concurrency=4, page_size=4)
        return publisher.publish(ExportFilter(**filters), withdraw_all=withdraw_all)
    finally:
        api.close()


def wanted(catalogue: Catalogue, **filters) -> set[tuple[str, str]]:
    """(record, concept) of every label the server must hold."""
    return {(record_id, VOCABULARY[key]) for record_id, _, key in catalogue.expected(**filters)}


def held(server: AnnotationsServer) -> set[tuple[str, str]]:
    """(record, concept) of the server's active annotations, none of them twice."""
    pairs = [
        (annotation["target"].removeprefix(ITEM_BASE), annotation["body"])
        for annotation in server.active()
    ]
    duplicates = [pair for pair, n in Counter(pairs).items() if n > 1]
    assert duplicates == []
    return set(pairs)


def ledger(db: Database) -> dict[tuple[str, str], Publication]:
    with db.transaction() as session:
        rows = session.scalars(sa.select(Publication)).all()
    return {(row.record_id, row.concept): row for row in rows}


def test_publish_then_publish_again_creates_nothing_new(
    db: Database, server: AnnotationsServer
) -> None:
    catalogue = catalogue_of(db)
    expected = wanted(catalogue)
    first = publish(db, server)
    assert (first.created, first.updated, first.withdrawn) == (len(expected), 0, 0)
    assert held(server) == expected
    # The write lock was met (every 7th write) and waited out.
    assert any(status == 423 for _, _, status in server.requests)
    rows = ledger(db)
    by_id = {annotation["id"]: annotation for annotation in server.active()}
    assert set(rows) == expected
    for (record_id, concept), row in rows.items():
        assert row.state == PublicationState.PUBLISHED and row.model_version == OLD
        assert by_id[row.annotation_id]["target"] == item_uri(record_id)
        assert by_id[row.annotation_id]["body"] == concept
        assert row.owner == "http://data.europeana.eu/user/publisher"
    writes = len(server.writes())

    second = publish(db, server)
    assert (second.created, second.updated, second.withdrawn) == (0, 0, 0)
    assert second.unchanged == len(expected)
    assert len(server.writes()) == writes
    assert held(server) == expected

    env = {"DATABASE_URL": db.url, "EUROPEANA_ANNOTATION_API_URL": server.url}
    status = CliRunner().invoke(cli, ["publish", "--status"], env=env)
    assert status.exit_code == 0, status.output
    assert f"{len(expected)} published" in status.output and OLD in status.output

    shown = publications_for_record(db, ALL[0])
    assert {entry["concept"] for entry in shown} == {c for r, c in expected if r == ALL[0]}
    assert all(entry["annotation_id"].startswith("http://data.europeana.eu/") for entry in shown)


def test_one_invalid_item_is_isolated_and_everything_else_published(
    db: Database, server: AnnotationsServer
) -> None:
    # One record the local check refuses (not a Europeana item), one the server refuses.
    odd_id = "/1001/odd_1"  # its scores give it two labels
    odd = Record(odd_id, "1001", "https://example.org/odd", image_url(odd_id), "Museum")
    catalogue = catalogue_of(db, [odd])
    expected = {pair for pair in wanted(catalogue) if pair[0] != odd_id}
    refused = sorted({record for record, _ in expected})[5]
    server.refuse_targets = {item_uri(refused)}
    api = AnnotationsAPI(server.url, TOKEN, backoff=0.01)
    report = Publisher(db, server.url, api, page_size=100).publish(ExportFilter())
    api.close()

    refused_labels = {pair for pair in expected if pair[0] == refused}
    assert held(server) == expected - refused_labels
    assert report.rejected == len(refused_labels) >= 1
    assert report.invalid == 2
    assert any("not a Europeana item URI" in p for p in report.problems)
    assert any("An error occurred during annotation validation" in p for p in report.problems)
    rows = ledger(db)
    for pair in refused_labels:
        assert rows[pair].state == PublicationState.REJECTED
        assert "annotation validation" in rows[pair].last_error
    # The rejected page was split, not posted item by item: far fewer pages than items.
    pages = [r for r in server.requests if r[:2] == ("POST", "/annotations/") and r[2] != 423]
    assert len(pages) < len(expected) / 2


def test_new_model_version_leaves_exactly_the_new_labels(
    db: Database, server: AnnotationsServer
) -> None:
    catalogue = catalogue_of(db)
    publish(db, server)
    before = {annotation["id"] for annotation in server.active()}
    first = record_ids("1001")
    catalogue.classify(db, NEW, first[:6], failed=tuple(first[6:8]))

    old = {(r, k) for r, v, k in catalogue.expected(version=OLD) if r in first[:6]}
    new = {(r, k) for r, v, k in catalogue.expected(version=NEW)}
    report = publish(db, server)
    assert report.created == len(new - old)
    assert report.updated == len(old & new)
    assert report.withdrawn == len(old - new)
    assert report.created and report.updated and report.withdrawn
    assert held(server) == wanted(catalogue)
    # Updated in place (the same Europeana id), with the new classification's content.
    rows = ledger(db)
    for record_id, key in old & new:
        row = rows[(record_id, VOCABULARY[key])]
        assert row.annotation_id in before and row.model_version == NEW
    stored = {a["id"]: a for a in server.active()}
    for (record_id, concept), row in rows.items():
        if row.state == PublicationState.PUBLISHED and row.model_version == NEW:
            annotation = stored[row.annotation_id]
            assert annotation["created"] == sent_created(db, record_id, concept, NEW)

    # Withdrawing everything NEW published leaves only the OLD labels of the other records.
    env = {"DATABASE_URL": db.url, "EUROPEANA_ANNOTATION_API_URL": server.url}
    dry = CliRunner().invoke(
        cli, ["publish", "--withdraw", "--model-version", NEW, "--dry-run"], env=env
    )
    assert f"would create 0, update 0, withdraw {len(new)};" in dry.output, dry.output
    gone = publish(db, server, withdraw_all=True, model_version=NEW)
    assert gone.withdrawn == len(new) and gone.created == gone.updated == 0
    assert held(server) == {(r, VOCABULARY[k]) for r, v, k in catalogue.expected() if v == OLD}


def sent_created(db: Database, record_id: str, concept: str, version: str) -> str:
    from enrichment.publish.export import iter_label_rows

    for row in iter_label_rows(db, ExportFilter(model_version=version)):
        if row.record_id == record_id and row.concept == concept:
            return europeana_annotation(row)["created"]
    raise AssertionError(f"no label {record_id} {concept}")


def test_a_bad_token_stops_at_once_with_the_message_and_publishes_nothing(
    db: Database, server: AnnotationsServer
) -> None:
    catalogue_of(db)
    secret = "not-a-valid-token-5f1c"
    result = enrich(
        "publish",
        env={
            "DATABASE_URL": db.url,
            "EUROPEANA_ANNOTATION_API_URL": server.url,
            "EUROPEANA_ANNOTATION_TOKEN": secret,
        },
    )
    assert result.returncode == 1
    assert "The provided authentication token is invalid" in result.stderr
    assert "401" in result.stderr
    assert secret not in result.stderr + result.stdout
    assert server.active() == []
    # At once: no more requests than the pages in flight when the first answer came.
    assert 1 <= len(server.writes()) <= 5


def test_a_publish_killed_mid_way_and_started_again_leaves_no_duplicates(
    pg_url: str, server: AnnotationsServer
) -> None:
    db = open_database(pg_url)
    catalogue = catalogue_of(db)
    expected = wanted(catalogue)
    env = {
        **os.environ,
        "DATABASE_URL": pg_url,
        "EUROPEANA_ANNOTATION_API_URL": server.url,
        "EUROPEANA_ANNOTATION_TOKEN": TOKEN,
    }
    server.lock_every = 0
    # The server carries out the third write and all after it, and keeps their answers back.
    server.hold_after = 2
    command = [sys.executable, "-m", "enrichment", "publish", "--page-size", "3"]
    process = subprocess.Popen(
        [*command, "--concurrency", "2"], env=env, cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 30
    while server.held < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.held == 2, "two requests carried out and in flight"
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    server.release()
    on_server_at_kill = len(server.active())
    states = Counter(row.state for row in ledger(db).values())
    assert states[PublicationState.CREATING] >= 6  # two held pages of 3, their ids unknown
    assert on_server_at_kill > states[PublicationState.PUBLISHED]

    again = subprocess.run(
        [*command, "--json"], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert report["adopted"] >= 6
    assert held(server) == expected
    rows = ledger(db)
    assert {row.state for row in rows.values()} == {PublicationState.PUBLISHED}
    assert {row.annotation_id for row in rows.values()} == {a["id"] for a in server.active()}

    dry = Publisher(db, server.url, None).publish(ExportFilter(reviewed="not-rejected"))
    assert (dry.created, dry.updated, dry.withdrawn, dry.unsettled) == (0, 0, 0, 0)
    status = publication_status(db, server.url)
    assert status["by_state"] == {"published": len(expected)}
    assert status["by_model_version"] == {OLD: {"published": len(expected)}}
    db.dispose()


def test_lost_answers_and_write_locks_end_with_exactly_the_labels(
    db: Database, server: AnnotationsServer
) -> None:
    """Every 3rd write is carried out and its answer lost (502); every 4th meets the lock."""
    catalogue = catalogue_of(db)
    server.lose_answer_every, server.lock_every, server.retry_after = 3, 4, "1"
    started = time.monotonic()
    report = publish(db, server)
    # Retry-After: 1 on each lock was honoured, not the 0.01 s backoff.
    locks = sum(1 for _, _, status in server.requests if status == 423)
    assert locks >= 2 and time.monotonic() - started >= 1.0
    # Pages whose answer was lost were not posted again: they were found and adopted.
    assert report.adopted >= 1
    assert held(server) == wanted(catalogue)
    assert {row.state for row in ledger(db).values()} == {PublicationState.PUBLISHED}
    server.lose_answer_every = server.lock_every = 0
    again = publish(db, server)
    assert (again.created, again.updated, again.withdrawn) == (0, 0, 0)


def test_annotations_of_another_account_are_left_alone(
    db: Database, server: AnnotationsServer
) -> None:
    catalogue = catalogue_of(db)
    publish(db, server)
    # One published annotation now belongs to someone else, on the server and in the ledger.
    record_id, concept = sorted(wanted(catalogue))[0]
    with db.transaction() as session:
        row = session.scalars(
            sa.select(Publication).where(
                Publication.record_id == record_id, Publication.concept == concept
            )
        ).one()
        row.owner = "http://data.europeana.eu/user/other"
        annotation_id = row.annotation_id
    number = int(annotation_id.rsplit("/", 1)[1])
    server.annotations[number]["creator"] = {"id": "http://data.europeana.eu/user/other"}
    # The server refuses its owner's annotation to anyone else, and stops a publish that tries.
    api = AnnotationsAPI(server.url, TOKEN, backoff=0.01)
    with pytest.raises(AuthError, match="not authorized to perform the given action"):
        api.withdraw(annotation_id)
    api.close()

    report = publish(db, server, withdraw_all=True)
    assert report.not_owned == 1 and report.withdrawn == len(wanted(catalogue)) - 1
    assert [a["id"] for a in server.active()] == [annotation_id]


def test_a_label_the_curators_reject_is_withdrawn(db: Database, server: AnnotationsServer) -> None:
    catalogue = catalogue_of(db)
    publish(db, server, reviewed="not-rejected")
    record_id, concept = sorted(wanted(catalogue))[0]
    key = next(k for k, uri in VOCABULARY.items() if uri == concept)
    with db.transaction() as session:
        session.add(
            Review(
                record_id=record_id,
                label_key=key,
                model_version=OLD,
                decision=Decision.REJECT,
                reviewer="curator",
            )
        )
    dry = Publisher(db, server.url, None).publish(ExportFilter(reviewed="not-rejected"))
    assert (dry.created, dry.updated, dry.withdrawn) == (0, 0, 1)
    report = publish(db, server, reviewed="not-rejected")
    assert (report.created, report.updated, report.withdrawn) == (0, 0, 1)
    assert held(server) == wanted(catalogue) - {(record_id, concept)}


def gone_on_the_server(
    db: Database, server: AnnotationsServer, catalogue: Catalogue
) -> tuple[tuple[str, str], str]:
    """A published label the next publish updates (a new model version classified its
    record again, with it), whose annotation someone withdrew at Europeana meanwhile:
    (record, concept) and the gone annotation's id."""
    first = record_ids("1001")
    catalogue.classify(db, NEW, first[:6])
    old = {(r, k) for r, _, k in catalogue.expected(version=OLD)}
    new = {(r, k) for r, _, k in catalogue.expected(version=NEW)}
    kept = sorted((r, VOCABULARY[k]) for r, k in old & new)[0]
    gone = ledger(db)[kept].annotation_id
    server.deleted.add(int(gone.rsplit("/", 1)[1]))
    return kept, gone


def test_an_annotation_deleted_on_the_server_is_created_again_on_update(
    db: Database, server: AnnotationsServer
) -> None:
    catalogue = catalogue_of(db)
    publish(db, server)
    kept, gone = gone_on_the_server(db, server, catalogue)
    publish(db, server)
    assert held(server) == wanted(catalogue)
    assert ledger(db)[kept].annotation_id != gone


def test_an_unreachable_server_is_retried_then_reported_without_the_token(
    db: Database,
) -> None:
    catalogue_of(db)
    closed = f"http://127.0.0.1:{free_port()}/annotation"
    api = AnnotationsAPI(closed, "secret-token-9d2e", backoff=0.01)
    with pytest.raises(AnnotationsAPIError, match="cannot reach the server") as caught:
        Publisher(db, closed, api).publish(ExportFilter())
    api.close()
    assert "secret-token-9d2e" not in str(caught.value)


def test_a_second_publish_to_the_same_api_is_refused_while_one_runs(
    db: Database, server: AnnotationsServer
) -> None:
    catalogue_of(db)
    with publish_lock(db, server.url), pytest.raises(PublishError, match="another publish"):
        publish(db, server)
    assert server.requests == []
