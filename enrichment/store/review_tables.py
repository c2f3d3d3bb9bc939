"""The review index's table (see `review_index.py`, which keeps it), in a module of its own
that only needs the schema's base."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy import Boolean, Float, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from enrichment.store.schema import Base, RecordId


class ReviewItem(Base):
    """One class of one record's current result (`Result.is_current`, which also says of
    which model version) that is within the band or labelled."""

    __tablename__ = "review_items"
    __table_args__ = (
        Index("ix_review_items_margin", "label_key", "margin", "record_id"),
        # The audit sample reads a class's labelled items in sample-key order; the key is a
        # hash of the record id, so ties are rare and settled by sorting them (no record id
        # in every entry).
        Index(
            "ix_review_items_sample",
            "label_key",
            "sample_key",
            postgresql_where=sa.text("labelled"),
            sqlite_where=sa.text("labelled = 1"),
        ),
    )

    record_id: Mapped[str] = mapped_column(RecordId, primary_key=True)
    label_key: Mapped[str] = mapped_column(String(100), primary_key=True)
    # |score - threshold|; None only for a labelled class the score vector lacks.
    margin: Mapped[float | None] = mapped_column(Float)
    labelled: Mapped[bool] = mapped_column(Boolean)
    sample_key: Mapped[int] = mapped_column(Integer)
