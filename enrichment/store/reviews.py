"""Curators' decisions on machine labels: accept, reject, or add a label the model missed.

Every decision is kept for audit, and so is every take-back (undo): a row of
its own, decision `undo`, naming the decision it reverses, which then no
longer counts. The last decision per (record, class) that stands counts,
whichever model version it was made on: it says what the image shows, which
does not change when a new model labels it again. `model_version` records
what the reviewer was shown. Exports, publishing, calibration and training
read the last decisions through `latest_decisions`.

Recording and taking back decisions are `store/decisions.py`'s.
"""

from __future__ import annotations

import enum
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy import Boolean, DateTime, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from enrichment.store.schema import Base, RecordId, utc_now


class Decision(enum.StrEnum):
    ACCEPT = "accept"
    REJECT = "reject"
    ADD = "add"
    # Decisions that say the label is right: accepted, or added by the reviewer.
    POSITIVE = enum.nonmember(("accept", "add"))


# The decision of a take-back row; never a decision a curator sends.
TAKE_BACK = "undo"

# What exports may ask of the decisions (`--reviewed`); the first ignores them.
REVIEWED = ("any", "not-rejected", "accepted")


class Review(Base):
    __tablename__ = "reviews"
    __table_args__ = (
        Index("ix_reviews_label", "record_id", "label_key", "model_version"),
        Index("ix_reviews_reverses", "reverses"),
    )

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    record_id: Mapped[str] = mapped_column(RecordId)
    label_key: Mapped[str] = mapped_column(String(100))
    model_version: Mapped[str] = mapped_column(String(120))
    decision: Mapped[str] = mapped_column(String(10))
    reviewer: Mapped[str] = mapped_column(String(200))
    # Reviewed as part of the random audit sample, not picked by uncertainty.
    audit: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    decided_at: Mapped[datetime] = mapped_column(DateTime, default=utc_now)
    # On a take-back row (decision `undo`): the id of the decision it takes back.
    reverses: Mapped[int | None] = mapped_column(sa.Integer, nullable=True)


def standing() -> sa.ColumnElement[bool]:
    """Rows that are decisions still standing: not a take-back, not taken back."""
    taken_back = sa.select(Review.reverses).where(Review.reverses.is_not(None))
    return (Review.decision != TAKE_BACK) & Review.id.not_in(taken_back)


def latest_decisions(audit_only: bool = False) -> sa.Subquery:
    """The last decision per (record, class): the row with the highest id, ids being in order.

    With `audit_only`, the last decision made in the audit sample, so that
    precision estimated from it is not biased by the uncertainty ordering.
    """
    last = (
        sa.select(sa.func.max(Review.id).label("id"))
        .where(standing())
        .group_by(Review.record_id, Review.label_key)
    )
    if audit_only:
        last = last.where(Review.audit.is_(True))
    return (
        sa.select(
            Review.id,
            Review.record_id,
            Review.label_key,
            Review.model_version,
            Review.decision,
            Review.reviewer,
            Review.audit,
            Review.decided_at,
        )
        .where(Review.id.in_(last))
        .subquery("audit_decisions" if audit_only else "decisions")
    )
