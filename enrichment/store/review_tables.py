"""The review index's two tables (see `review_index.py`, which keeps them, and `current.py`,
whose rule the first stores), in a module of their own that only needs the schema's base."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy import Boolean, Float, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from enrichment.store.schema import Base, RecordId


class CurrentResult(Base):
    """The model version whose result counts for a record; no row: no classified result."""

    __tablename__ = "current_results"

    record_id: Mapped[str] = mapped_column(RecordId, primary_key=True)
    model_version: Mapped[str] = mapped_column(String(120))


class ReviewItem(Base):
    """One class of one record's current result that is within the band or labelled."""

    __tablename__ = "review_items"
    __table_args__ = (
        Index("ix_review_items_margin", "label_key", "margin", "record_id"),
        Index(
            "ix_review_items_sample",
            "label_key",
            "sample_key",
            "record_id",
            postgresql_where=sa.text("labelled"),
            sqlite_where=sa.text("labelled = 1"),
        ),
    )

    record_id: Mapped[str] = mapped_column(RecordId, primary_key=True)
    label_key: Mapped[str] = mapped_column(String(100), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(120))
    # |score - threshold|; None only for a labelled class the score vector lacks.
    margin: Mapped[float | None] = mapped_column(Float)
    labelled: Mapped[bool] = mapped_column(Boolean)
    sample_key: Mapped[int] = mapped_column(Integer)
