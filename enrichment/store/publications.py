"""The publication ledger's state changes: an intent before each request, its outcome after.

`publish.sync` decides what to send and `publish.unsettled` what to make of
rows an interrupted publish left; every change to the ledger they make is one
of these operations, one transaction each. Intents (`record_intents`) are
committed before any request goes out, so a publish killed mid-way leaves
rows that say a request may have been carried out; outcomes
(`record_outcomes`) settle them; `forget_intent` drops a create the server
never carried out. Rows are changed by id only: one publish per API runs at
a time (`publish.unsettled.publish_lock`), so no other writer competes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from enrichment.store.current import current_results
from enrichment.store.database import Database
from enrichment.store.ledger import UNSETTLED, Publication, PublicationState
from enrichment.store.schema import RecordRow, Result, of_datasets, record_item_uri, utc_now
from enrichment.store.selection import Selection

S = PublicationState


@dataclass(frozen=True)
class LedgerEntry:
    """A ledger row as a publish plans with it."""

    id: int
    record_id: str
    label_key: str
    state: str
    content_sha256: str
    annotation_id: str | None
    owner: str | None
    # The label as last published, for a dry run's list of withdrawals.
    concept: str
    model_version: str


@dataclass(frozen=True)
class UnsettledIntent:
    """A `creating` or `withdrawing` row, with what it takes to look its annotation up."""

    id: int
    record_id: str
    state: str
    concept: str
    annotation_id: str | None
    item_uri: str


def count_unsettled(db: Database, api_url: str) -> int:
    """Rows whose request may or may not have been carried out."""
    query = sa.select(sa.func.count()).where(
        Publication.api_url == api_url, Publication.state.in_(UNSETTLED)
    )
    with db.transaction() as session:
        return session.execute(query).scalar_one()


def known_account(db: Database, api_url: str) -> str | None:
    """The owner of the last annotation this API's own create answered: this account, likely."""
    query = (
        sa.select(Publication.owner)
        .where(
            Publication.api_url == api_url,
            Publication.owner.is_not(None),
            Publication.adopted.is_(False),
        )
        .order_by(Publication.published_at.desc())
        .limit(1)
    )
    with db.transaction() as session:
        return session.execute(query).scalar()


def entries_of_current_records(
    db: Database, api_url: str, selection: Selection
) -> dict[tuple[str, str], LedgerEntry]:
    """The ledger rows of the records whose current result the selection covers, by label.

    Held in memory, about 200 bytes a row: they are the annotations this
    selection has on the server.
    """
    chosen = current_results(selection.datasets, selection.run_id, selection.model_version)
    covered = Publication.record_id.in_(sa.select(chosen.c.record_id))
    return _entries(db, api_url, selection, covered)


def entries_published_by(
    db: Database, api_url: str, selection: Selection
) -> dict[tuple[str, str], LedgerEntry]:
    """The ledger rows a withdrawal of everything the selection published covers, by label.

    Its model version is the one that published (not the records' current
    one); its datasets and run name records, whatever their current result.
    """
    scope = []
    if selection.model_version is not None:
        scope.append(Publication.model_version == selection.model_version)
    if selection.datasets:
        scope.append(of_datasets(Publication.record_id, selection.datasets))
    if selection.run_id is not None:
        scope.append(
            Publication.record_id.in_(
                sa.select(Result.record_id).where(Result.run_id == selection.run_id)
            )
        )
    return _entries(db, api_url, selection, *scope)


def _entries(
    db: Database, api_url: str, selection: Selection, *scope: sa.ColumnElement[bool]
) -> dict[tuple[str, str], LedgerEntry]:
    query = sa.select(
        Publication.id,
        Publication.record_id,
        Publication.label_key,
        Publication.state,
        Publication.content_sha256,
        Publication.annotation_id,
        Publication.owner,
        Publication.concept,
        Publication.model_version,
    ).where(Publication.api_url == api_url, *scope)
    if selection.labels:
        query = query.where(Publication.label_key.in_(selection.labels))
    with db.transaction() as session:
        return {(row.record_id, row.label_key): LedgerEntry(*row) for row in session.execute(query)}


def unsettled_intents(db: Database, api_url: str) -> list[UnsettledIntent]:
    """This API's `creating` and `withdrawing` rows, oldest first.

    `updating` rows need no lookup: the next plan sends their update again.
    """
    query = (
        sa.select(
            Publication.id,
            Publication.record_id,
            Publication.state,
            Publication.concept,
            Publication.annotation_id,
            record_item_uri(RecordRow.item_uri, RecordRow.id).label("item_uri"),
        )
        .join(RecordRow, RecordRow.id == Publication.record_id)
        .where(
            Publication.api_url == api_url,
            Publication.state.in_((S.CREATING, S.WITHDRAWING)),
        )
        .order_by(Publication.id)
    )
    with db.transaction() as session:
        return [UnsettledIntent(*row) for row in session.execute(query)]


# -- intents ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CreateIntent:
    """A label about to be created: a new row, or its row once withdrawn or refused (`row_id`)."""

    row_id: int | None
    record_id: str
    label_key: str
    concept: str
    model_version: str
    content_sha256: str


@dataclass(frozen=True)
class ChangeIntent:
    """A held annotation about to be updated (`UPDATING`) or withdrawn (`WITHDRAWING`)."""

    row_id: int
    state: PublicationState


def record_intents(
    db: Database, api_url: str, intents: Sequence[CreateIntent | ChangeIntent]
) -> list[int]:
    """Write the intents in one transaction, before any of their requests goes out.

    Returns each intent's row id, in order: new rows get theirs here. A create
    starts its row afresh (no id, no owner, no error), whatever it held before.
    """
    now = utc_now()
    inserts: list[dict[str, Any]] = []
    changes: list[tuple[int, dict[str, Any]]] = []
    for intent in intents:
        if isinstance(intent, ChangeIntent):
            changes.append((intent.row_id, {"state": intent.state}))
            continue
        values = {
            "concept": intent.concept,
            "model_version": intent.model_version,
            "content_sha256": intent.content_sha256,
            "annotation_id": None,
            "owner": None,
            "adopted": False,
            "state": S.CREATING,
            "last_error": None,
        }
        if intent.row_id is None:
            inserts.append(
                {
                    "api_url": api_url,
                    "record_id": intent.record_id,
                    "label_key": intent.label_key,
                    "updated_at": now,
                    **values,
                }
            )
        else:
            changes.append((intent.row_id, values))
    table = Publication.__table__
    with db.transaction() as session:
        inserted: list[int] = []
        if inserts:
            returning = sa.insert(table).returning(table.c.id, sort_by_parameter_order=True)
            inserted = list(session.execute(returning, inserts).scalars())
        _update_rows(session, changes)
    new_ids = iter(inserted)
    return [
        next(new_ids)
        if isinstance(intent, CreateIntent) and intent.row_id is None
        else intent.row_id
        for intent in intents
    ]


# -- outcomes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Created:
    """The server answered a create with the annotation's id and owner."""

    row_id: int
    annotation_id: str
    owner: str | None
    at: datetime = field(default_factory=utc_now)

    def values(self) -> dict[str, Any]:
        return {
            "annotation_id": self.annotation_id,
            "owner": self.owner,
            "state": S.PUBLISHED,
            "published_at": self.at,
            "withdrawn_at": None,
        }


@dataclass(frozen=True)
class Adopted:
    """An unsettled create found on the server: its id and owner, read back rather than answered."""

    row_id: int
    annotation_id: str
    owner: str | None
    at: datetime = field(default_factory=utc_now)

    def values(self) -> dict[str, Any]:
        return {
            "annotation_id": self.annotation_id,
            "owner": self.owner,
            "adopted": True,
            "state": S.PUBLISHED,
            "published_at": self.at,
        }


@dataclass(frozen=True)
class Updated:
    """The server holds the new content (`adopted`: under an id found, not answered)."""

    row_id: int
    annotation_id: str
    owner: str | None
    adopted: bool
    content_sha256: str
    model_version: str
    concept: str

    def values(self) -> dict[str, Any]:
        return {
            "annotation_id": self.annotation_id,
            "owner": self.owner,
            "adopted": self.adopted,
            "state": S.PUBLISHED,
            "content_sha256": self.content_sha256,
            "model_version": self.model_version,
            "concept": self.concept,
            "last_error": None,
        }


@dataclass(frozen=True)
class Refused:
    """The server refused the request: a refused create is `REJECTED` (tried again next time);
    a refused update leaves the annotation published as it was (`kept`)."""

    row_id: int
    message: str
    kept: bool

    def values(self) -> dict[str, Any]:
        return {"state": S.PUBLISHED if self.kept else S.REJECTED, "last_error": self.message}


@dataclass(frozen=True)
class Withdrawn:
    """The annotation is gone from the server."""

    row_id: int
    at: datetime = field(default_factory=utc_now)

    def values(self) -> dict[str, Any]:
        return {"state": S.WITHDRAWN, "withdrawn_at": self.at, "last_error": None}


PublicationOutcome = Created | Adopted | Updated | Refused | Withdrawn


def record_outcomes(db: Database, outcomes: Sequence[PublicationOutcome]) -> None:
    """Settle the rows of answered requests, in one transaction."""
    if not outcomes:
        return
    with db.transaction() as session:
        _update_rows(session, [(outcome.row_id, outcome.values()) for outcome in outcomes])


def forget_intent(db: Database, row_id: int) -> None:
    """Drop a `creating` row whose create the server never carried out: it is planned afresh."""
    with db.transaction() as session:
        session.execute(sa.delete(Publication).where(Publication.id == row_id))


def _update_rows(session: Session, changes: list[tuple[int, dict[str, Any]]]) -> None:
    """UPDATE rows by id, one executemany per set of columns changed."""
    table = Publication.__table__
    now = utc_now()
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row_id, values in changes:
        groups.setdefault(tuple(sorted(values)), []).append(
            {"row_id": row_id, **{f"new_{column}": value for column, value in values.items()}}
        )
    for columns, rows in groups.items():
        statement = (
            sa.update(table)
            .where(table.c.id == sa.bindparam("row_id"))
            .values(updated_at=now, **{c: sa.bindparam(f"new_{c}") for c in columns})
        )
        session.execute(statement, rows)
