"""Curators' decisions on machine labels: accept, reject, or add a label the model missed.

Every decision is kept for audit; the last one per (record, label, model
version) counts. Exports, publishing, calibration and training read them.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, DateTime, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from enrichment.store.schema import Base, utc_now


class Decision:
    ACCEPT = "accept"
    REJECT = "reject"
    ADD = "add"
    ALL = (ACCEPT, REJECT, ADD)


class Review(Base):
    __tablename__ = "reviews"
    __table_args__ = (Index("ix_reviews_label", "record_id", "label_key", "model_version"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    record_id: Mapped[str] = mapped_column(String(512))
    label_key: Mapped[str] = mapped_column(String(100))
    model_version: Mapped[str] = mapped_column(String(120))
    decision: Mapped[str] = mapped_column(String(10))
    reviewer: Mapped[str] = mapped_column(String(200))
    # Reviewed as part of the random audit sample, not picked by uncertainty.
    audit: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    decided_at: Mapped[datetime] = mapped_column(DateTime, default=utc_now)
