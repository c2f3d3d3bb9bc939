"""The publication ledger: what was posted to Europeana's Annotations API, under which id.

One row per (API, record, label): the id Europeana assigned, the account that
owns it (only the owner may update or withdraw it), the model version and a
hash of the content last sent, and its state. The state is written *before*
each request (an intent: `creating`, `updating`, `withdrawing`) and settled
after the answer, so a publish killed between the server's answer and the
client's commit finds the unsettled rows on its next start and resolves them
(adopting what the server already created) instead of posting twice.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Boolean, DateTime, Index, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from enrichment.store.database import Database
from enrichment.store.schema import Base, RecordId, utc_now

# Rejections listed by `enrich publish --status`.
ERRORS_SHOWN = 10


class PublicationState(StrEnum):
    # Intents: the request may or may not have reached the server.
    CREATING = "creating"
    UPDATING = "updating"
    WITHDRAWING = "withdrawing"
    # Settled.
    PUBLISHED = "published"
    WITHDRAWN = "withdrawn"
    # The server refused the annotation (`last_error` says why); tried again next time.
    REJECTED = "rejected"


# The intents: rows whose request may or may not have been carried out.
UNSETTLED = (
    PublicationState.CREATING,
    PublicationState.UPDATING,
    PublicationState.WITHDRAWING,
)


class Publication(Base):
    __tablename__ = "publications"
    __table_args__ = (
        UniqueConstraint("api_url", "record_id", "label_key"),
        # `known_account`, on every publish: the API's latest publication, read from the end.
        Index("ix_publications_account", "api_url", "published_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    api_url: Mapped[str] = mapped_column(Text)
    record_id: Mapped[str] = mapped_column(RecordId, index=True)
    label_key: Mapped[str] = mapped_column(String(100))
    concept: Mapped[str] = mapped_column(Text)
    model_version: Mapped[str] = mapped_column(String(120), index=True)
    # What was last sent (or is about to be), hashed: a label whose annotation would
    # read differently is updated.
    content_sha256: Mapped[str] = mapped_column(String(64))
    annotation_id: Mapped[str | None] = mapped_column(Text)
    # The annotation's creator as the server reports it: only this account may change it.
    owner: Mapped[str | None] = mapped_column(Text)
    # The id was found on the server (a create whose answer was lost, or a duplicate of
    # someone else's annotation) rather than read from the answer to our create.
    adopted: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    state: Mapped[str] = mapped_column(String(20), index=True)
    published_at: Mapped[datetime | None] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utc_now, onupdate=utc_now)
    withdrawn_at: Mapped[datetime | None] = mapped_column(DateTime)
    last_error: Mapped[str | None] = mapped_column(Text)


def publications_for_record(db: Database, record_id: str) -> list[dict[str, Any]]:
    """A record's ledger rows, for `enrich results`: what is published for it, and where.

    `sent` is False for an intent (`creating`, `updating`, `withdrawing`): the
    request was about to go out, and no answer of the server confirmed it, so
    it may never have reached the server. Show such a row as an intent, not as
    something published.
    """
    query = (
        sa.select(Publication)
        .where(Publication.record_id == record_id)
        .order_by(Publication.api_url, Publication.label_key)
    )
    with db.transaction() as session:
        return [
            {
                "api_url": row.api_url,
                "label": row.label_key,
                "concept": row.concept,
                "model_version": row.model_version,
                "annotation_id": row.annotation_id,
                "owner": row.owner,
                "state": row.state,
                "sent": row.state not in UNSETTLED,
                "published_at": _iso(row.published_at),
                "updated_at": _iso(row.updated_at),
                "withdrawn_at": _iso(row.withdrawn_at),
                "last_error": row.last_error,
            }
            for row in session.scalars(query)
        ]


def publication_status(db: Database, api_url: str) -> dict[str, Any]:
    """`enrich publish --status`: the ledger of one API by state and by model version."""
    where = Publication.api_url == api_url
    with db.transaction() as session:
        by_state = dict(
            session.execute(
                sa.select(Publication.state, sa.func.count())
                .where(where)
                .group_by(Publication.state)
            ).all()
        )
        by_version: dict[str, dict[str, int]] = {}
        for version, state, count in session.execute(
            sa.select(Publication.model_version, Publication.state, sa.func.count())
            .where(where)
            .group_by(Publication.model_version, Publication.state)
            .order_by(Publication.model_version)
        ):
            by_version.setdefault(version, {})[state] = count
        last = session.execute(sa.select(sa.func.max(Publication.updated_at)).where(where)).scalar()
        errors = [
            f"{record_id} ({key}): {error}"
            for record_id, key, error in session.execute(
                sa.select(Publication.record_id, Publication.label_key, Publication.last_error)
                .where(where, Publication.state == PublicationState.REJECTED)
                .order_by(Publication.updated_at.desc())
                .limit(ERRORS_SHOWN)
            )
        ]
    return {
        "api_url": api_url,
        "by_state": by_state,
        "by_model_version": by_version,
        "last_change": _iso(last),
        "rejected": errors,
    }


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() + "Z" if moment is not None else None
