"""Retiring a model version: its results and labels removed, in bounded transactions.

A version's score vectors are the largest rows there are (one per record it
classified), so a retired version's rows go; but never in one transaction
over the whole version, which on 60 million rows would hold locks and grow
the write-ahead log for hours. `mark_retired` first checks and marks the
version (one transaction), then `remove_some` deletes the results and labels
of up to `CHUNK` records per transaction until none is left. Interrupted, the
same command goes on where it stopped: what is left is simply what remains.

Refused while the version has live annotations in the publication ledger
(published, or an intent whose request may have reached the server): those
would be left on Europeana with nothing behind them. Refused too while a run
of the version is scheduling or running, or has batches not yet done.

What stays: the `models` row, marked `retired_at` (runs and reviews still name
it; runs and exports refuse a retired version, `refuse_retired`), the runs
with their counts, and curators' reviews of the version, which are training
data and say what the images show whichever model asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session

from enrichment.errors import EnrichError, InvalidValue
from enrichment.store.columns import among
from enrichment.store.database import Database
from enrichment.store.ledger import UNSETTLED, Publication, PublicationState
from enrichment.store.review_index import reindex
from enrichment.store.schema import (
    FINISHED_BATCHES,
    Batch,
    Label,
    ModelRow,
    Result,
    Run,
    RunStatus,
    utc_now,
)

CHUNK = 5000  # records per transaction
LIVE = (PublicationState.PUBLISHED, *UNSETTLED)


class RetireRefused(EnrichError):
    """A version cannot be retired yet: live publications or unfinished runs."""


class RetiredVersion(EnrichError):
    """A run or export names a retired version."""


@dataclass(frozen=True)
class Retirement:
    version: str
    retired_at: datetime
    remaining: int  # results still to remove when the mark was set (or found)


def check_retirable(db: Database, version: str) -> int:
    """How many results retiring the version would remove; raises as `mark_retired` does."""
    with db.transaction() as session:
        _checked(session, version)
        return _results_of(session, version)


def mark_retired(db: Database, version: str) -> Retirement:
    """Check that the version may be retired and mark it (kept if already marked).

    Returns how many of its results are left to remove. Raises InvalidValue
    for an unknown version, RetireRefused while it has live publications or
    unfinished runs.
    """
    with db.transaction() as session:
        row = _checked(session, version)
        if row.retired_at is None:
            row.retired_at = utc_now()
        return Retirement(version, row.retired_at, _results_of(session, version))


def _checked(session: Session, version: str) -> ModelRow:
    row = session.get(ModelRow, version, with_for_update=True)
    if row is None:
        known = ", ".join(sorted(session.scalars(sa.select(ModelRow.version)))) or "none yet"
        raise InvalidValue("version", f"unknown model version {version} (known: {known})")
    _refuse_unfinished_runs(session, version)
    _refuse_live_publications(session, version)
    return row


def _results_of(session: Session, version: str) -> int:
    return session.execute(
        sa.select(sa.func.count()).where(Result.model_version == version)
    ).scalar_one()


def _refuse_unfinished_runs(session: Session, version: str) -> None:
    """A run still paging or running, or one that failed while batches of it were queued
    (a worker may still write them)."""
    open_batches = (
        sa.select(Batch.id)
        .where(Batch.run_id == Run.id, Batch.status.not_in(FINISHED_BATCHES))
        .exists()
    )
    runs = session.scalars(
        sa.select(Run.id)
        .where(
            Run.model_version == version,
            Run.status.in_([RunStatus.SCHEDULING, RunStatus.RUNNING]) | open_batches,
        )
        .order_by(Run.id)
    ).all()
    if runs:
        named = ", ".join(str(run) for run in runs)
        raise RetireRefused(
            f"model version {version} has unfinished runs ({named}): let them finish, "
            f"or resume them, before retiring it (enrich status --run {runs[0]})"
        )


def _refuse_live_publications(session: Session, version: str) -> None:
    live = session.execute(
        sa.select(Publication.api_url, sa.func.count())
        .where(Publication.model_version == version, Publication.state.in_(LIVE))
        .group_by(Publication.api_url)
        .order_by(Publication.api_url)
    ).all()
    if live:
        where = "; ".join(f"{count} at {api_url}" for api_url, count in live)
        raise RetireRefused(
            f"model version {version} has live annotations ({where}): withdraw first: "
            f"enrich publish --withdraw --model-version {version}"
        )


def remove_some(db: Database, version: str, chunk: int = CHUNK) -> int:
    """Delete the results and labels of up to `chunk` of the version's records, in one
    transaction; returns how many results went (0: none left)."""
    with db.transaction() as session:
        record_ids = session.scalars(
            sa.select(Result.record_id).where(Result.model_version == version).limit(chunk)
        ).all()
        if not record_ids:
            return 0
        dialect = session.get_bind().dialect.name
        for table in (Label.__table__, Result.__table__):
            session.execute(
                sa.delete(table).where(
                    table.c.model_version == version, among(table.c.record_id, record_ids, dialect)
                )
            )
        # Where the version's result counted, another version's (or none) counts now.
        reindex(session.connection(), record_ids)
        return len(record_ids)


def retired_versions(db: Database) -> dict[str, datetime]:
    """Every retired version, with when it was retired."""
    with db.transaction() as session:
        return dict(
            session.execute(
                sa.select(ModelRow.version, ModelRow.retired_at).where(
                    ModelRow.retired_at.is_not(None)
                )
            ).all()
        )


def refuse_retired(session: Session, version: str) -> None:
    """Raise RetiredVersion if the version was retired: a run must not bring its rows back."""
    retired_at = session.execute(
        sa.select(ModelRow.retired_at).where(ModelRow.version == version)
    ).scalar()
    if retired_at is not None:
        raise RetiredVersion(retired_version_message(version, retired_at))


def retired_version_message(version: str, retired_at: datetime) -> str:
    return (
        f"model version {version} was retired on {retired_at:%Y-%m-%d %H:%M} UTC: "
        "its results and labels were removed; use a current model version"
    )
