"""The publication ledger: what was posted to Europeana's Annotations API, under which id.

One row per (API, record, label): the id Europeana assigned, the account that
owns it (only the owner may update or withdraw it), and its state. A row is
written as `pending` before the request that creates the annotation, so a
publish killed between the server's answer and the client's commit can find
and adopt what it created instead of posting it twice.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from enrichment.store.schema import Base, utc_now


class PublicationState:
    PENDING = "pending"
    PUBLISHED = "published"
    WITHDRAWN = "withdrawn"


class Publication(Base):
    __tablename__ = "publications"
    __table_args__ = (UniqueConstraint("api_url", "record_id", "label_key"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    api_url: Mapped[str] = mapped_column(Text)
    record_id: Mapped[str] = mapped_column(String(512), index=True)
    label_key: Mapped[str] = mapped_column(String(100))
    concept: Mapped[str] = mapped_column(Text)
    model_version: Mapped[str] = mapped_column(String(120), index=True)
    # What was last sent, hashed: a label whose annotation would read differently is updated.
    content_sha256: Mapped[str] = mapped_column(String(64))
    annotation_id: Mapped[str | None] = mapped_column(Text)
    owner: Mapped[str | None] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(20), index=True)
    published_at: Mapped[datetime | None] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utc_now, onupdate=utc_now)
    withdrawn_at: Mapped[datetime | None] = mapped_column(DateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
