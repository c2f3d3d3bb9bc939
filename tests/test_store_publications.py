"""The publication ledger's state changes (store/publications.py), on SQLite and PostgreSQL.

Each operation is called directly, without a server or a publish around it:
intents written before a request, the outcomes that settle them, a create
forgotten, and the reads a publish plans with. `tests/test_publish.py` drives
them through real publishes against a stand-in of the Annotations API.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from enrichment.store.database import Database
from enrichment.store.ledger import Publication, PublicationState, publication_status
from enrichment.store.publications import (
    Adopted,
    ChangeIntent,
    Created,
    CreateIntent,
    Refused,
    Updated,
    Withdrawn,
    count_unsettled,
    entries_of_current_records,
    entries_published_by,
    forget_intent,
    known_account,
    record_intents,
    record_outcomes,
    unsettled_intents,
)
from enrichment.store.selection import Selection
from tests.conftest import VOCABULARY
from tests.export_support import NEW, OLD, build_catalogue, item_uri, open_database, record_ids

API = "https://api.example.org/annotation"
OURS = "http://data.europeana.eu/user/publisher"
THEIRS = "http://data.europeana.eu/user/other"
S = PublicationState


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    url = (
        f"sqlite:///{tmp_path}/ledger.sqlite3"
        if request.param == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    database = open_database(url)
    build_catalogue(database)
    yield database
    database.dispose()


def create(record_id: str, key: str, version: str = OLD, row_id: int | None = None):
    return CreateIntent(row_id, record_id, key, VOCABULARY[key], version, f"sha-{key}-{version}")


def rows(db: Database) -> dict[int, Publication]:
    with db.transaction() as session:
        return {row.id: row for row in session.scalars(sa.select(Publication))}


def test_publication_state_is_a_string_enum_with_the_stored_values() -> None:
    assert [state.value for state in PublicationState] == [
        "creating",
        "updating",
        "withdrawing",
        "published",
        "withdrawn",
        "rejected",
    ]
    assert PublicationState.PUBLISHED == "published" and isinstance(S.REJECTED, str)


def test_intents_and_outcomes_move_each_row_through_its_states(db: Database) -> None:
    first, second = record_ids("1001")[:2]
    ids = record_intents(
        db, API, [create(first, "photograph"), create(first, "map"), create(second, "drawing")]
    )
    assert len(set(ids)) == 3
    written = rows(db)
    assert [(written[i].record_id, written[i].label_key) for i in ids] == [
        (first, "photograph"),
        (first, "map"),
        (second, "drawing"),
    ]
    assert {row.state for row in written.values()} == {S.CREATING}
    assert count_unsettled(db, API) == 3 and count_unsettled(db, API + "/other") == 0
    unsettled = unsettled_intents(db, API)
    assert [intent.id for intent in unsettled] == sorted(ids)
    assert unsettled[0].item_uri == item_uri(first) and unsettled[0].annotation_id is None

    photograph, map_, drawing = ids
    record_outcomes(
        db, [Created(photograph, "anno/1", OURS), Refused(map_, "bad body", kept=False)]
    )
    written = rows(db)
    assert written[photograph].state == S.PUBLISHED
    assert written[photograph].annotation_id == "anno/1" and written[photograph].published_at
    assert (written[map_].state, written[map_].last_error) == (S.REJECTED, "bad body")
    assert written[drawing].state == S.CREATING
    assert known_account(db, API) == OURS

    # A refused label is created afresh in its own row; a published one is updated.
    again = record_intents(
        db, API, [create(first, "map", row_id=map_), ChangeIntent(photograph, S.UPDATING)]
    )
    assert again == [map_, photograph]
    written = rows(db)
    assert (written[map_].state, written[map_].last_error) == (S.CREATING, None)
    assert written[photograph].state == S.UPDATING
    record_outcomes(
        db,
        [
            Updated(photograph, "anno/1", OURS, False, "sha-new", NEW, VOCABULARY["photograph"]),
            Adopted(map_, "anno/2", THEIRS),
        ],
    )
    written = rows(db)
    assert (written[photograph].state, written[photograph].model_version) == (S.PUBLISHED, NEW)
    assert written[photograph].content_sha256 == "sha-new"
    assert written[map_].adopted and written[map_].owner == THEIRS
    assert known_account(db, API) == OURS, "an adopted annotation says nothing of this account"

    # An update the server refuses leaves the annotation published as it was.
    record_intents(db, API, [ChangeIntent(photograph, S.UPDATING)])
    record_outcomes(db, [Refused(photograph, "too long", kept=True)])
    written = rows(db)
    assert (written[photograph].state, written[photograph].last_error) == (S.PUBLISHED, "too long")

    forget_intent(db, drawing)
    record_intents(db, API, [ChangeIntent(photograph, S.WITHDRAWING)])
    (withdrawing,) = unsettled_intents(db, API)
    assert (withdrawing.id, withdrawing.annotation_id) == (photograph, "anno/1")
    record_outcomes(db, [Withdrawn(photograph)])
    written = rows(db)
    assert drawing not in written
    assert written[photograph].state == S.WITHDRAWN and written[photograph].withdrawn_at
    assert written[photograph].last_error is None
    assert count_unsettled(db, API) == 0
    assert publication_status(db, API)["by_state"] == {"published": 1, "withdrawn": 1}


def test_ledger_entries_of_current_records_and_of_what_a_version_published(
    db: Database,
) -> None:
    new_first = record_ids("1001")[0]  # NEW re-classified it: its current result is NEW's
    old_only = record_ids("1002")[0]
    ids = record_intents(
        db,
        API,
        [
            create(new_first, "photograph", OLD),
            create(new_first, "drawing", NEW),
            create(old_only, "map", OLD),
        ],
    )
    every = {(new_first, "photograph"), (new_first, "drawing"), (old_only, "map")}
    assert set(entries_of_current_records(db, API, Selection())) == every
    assert entries_of_current_records(db, API + "/other", Selection()) == {}
    by_dataset = entries_of_current_records(db, API, Selection(datasets=("1002",)))
    assert set(by_dataset) == {(old_only, "map")}
    entry = by_dataset[(old_only, "map")]
    assert (entry.id, entry.state, entry.content_sha256) == (ids[2], S.CREATING, "sha-map-" + OLD)
    # Current under NEW: the records NEW classified, whatever version published their labels.
    current_new = entries_of_current_records(db, API, Selection(model_version=NEW))
    assert set(current_new) == {(new_first, "photograph"), (new_first, "drawing")}
    labelled = entries_of_current_records(db, API, Selection(labels=("drawing", "map")))
    assert set(labelled) == {(new_first, "drawing"), (old_only, "map")}

    # What a version published, whatever the records' current result.
    assert set(entries_published_by(db, API, Selection(model_version=OLD))) == {
        (new_first, "photograph"),
        (old_only, "map"),
    }
    assert set(entries_published_by(db, API, Selection())) == every
    assert set(entries_published_by(db, API, Selection(datasets=("1001",)))) == {
        (new_first, "photograph"),
        (new_first, "drawing"),
    }
    assert entries_published_by(db, API, Selection(run_id=1)) == {}
