"""The database schema as typed SQLAlchemy models.

Alembic migrations in `migrations/` are the only way this schema reaches a
database; a test checks that the migrations and these models agree.

Times are stored as naive UTC (`utc_now`, `as_utc_naive`) so that PostgreSQL
and SQLite compare them the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from enrichment.errors import InvalidValue
from enrichment.store.columns import Scores, Sha256


def utc_now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def as_utc_naive(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is None:
        return value
    return value.astimezone(UTC).replace(tzinfo=None)


# A record's item page where Europeana serves it: the base followed by the record's id.
# Records store their item URI as NULL where it is exactly that (nearly every record);
# read it through `record_item_uri` (SQL) or `item_uri_of` (Python). Changing the base
# would change every such record's URI, and the targets of annotations already published:
# it takes a migration that first writes the old base into those records.
ITEM_URI_BASE = "http://data.europeana.eu/item"

# A record's id ("/DATASET/LOCAL") and every column that holds one. PostgreSQL compares
# it bytewise (COLLATE "C", as SQLite compares text) so that a dataset's records are one
# range of every index that starts with a record id (`of_datasets`), whatever the
# database's own collation; columns joined to `records.id` share its collation, since
# PostgreSQL uses an index for a join only where both sides' collations agree.
RecordId = String(512).with_variant(String(512, collation="C"), "postgresql")


class Base(DeclarativeBase):
    # None is SQL NULL, not JSON null, so `IS NULL` means what it says.
    type_annotation_map = {  # noqa: RUF012
        dict[str, Any]: JSON(none_as_null=True),
        list[Any]: JSON(none_as_null=True),
    }


class RunStatus(StrEnum):
    SCHEDULING = "scheduling"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


class BatchStatus(StrEnum):
    PENDING = "pending"
    QUEUED = "queued"
    DONE = "done"
    FAILED = "failed"


# A batch in one of these states is never worked on again.
FINISHED_BATCHES = (BatchStatus.DONE, BatchStatus.FAILED)
# The same as an index's condition: the queries' `status NOT IN (...)` imply it.
UNFINISHED_BATCH = sa.text(f"status NOT IN ({', '.join(repr(str(s)) for s in FINISHED_BATCHES)})")


class Outcome(StrEnum):
    """A record's result: labelled, classified with no label above threshold, or an error."""

    LABELLED = "labelled"
    BELOW_THRESHOLD = "below_threshold"
    ERROR = "error"


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(20))
    scope: Mapped[dict[str, Any]]
    model_version: Mapped[str] = mapped_column(String(120), ForeignKey("models.version"))
    status: Mapped[str] = mapped_column(String(20), index=True)
    queue: Mapped[str] = mapped_column(String(60))
    records_seen: Mapped[int] = mapped_column(Integer, default=0)
    records_enqueued: Mapped[int] = mapped_column(Integer, default=0)
    batches_total: Mapped[int] = mapped_column(Integer, default=0)
    checkpoint: Mapped[dict[str, Any] | None]
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utc_now)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    # The counts by outcome when the run completed: a later run over the same records takes
    # their result rows over, and must not rewrite what this run did.
    final_counts: Mapped[dict[str, Any] | None]


class Batch(Base):
    __tablename__ = "batches"
    __table_args__ = (
        UniqueConstraint("run_id", "seq"),
        # Every worker process sweeps for stale heartbeats each interval (15 s); only the
        # batches being worked have one, a few among the batches of every run ever (700,000
        # after one run over Europeana's 60 million records): the sweep reads only those.
        Index(
            "ix_batches_beating",
            "heartbeat_at",
            postgresql_where=sa.text("heartbeat_at IS NOT NULL"),
            sqlite_where=sa.text("heartbeat_at IS NOT NULL"),
        ),
        # After each batch, whether its run is complete (`runs.complete_run_if_done`): near
        # a run's end, its other batches are nearly all done, and were all read each time.
        Index(
            "ix_batches_unfinished",
            "run_id",
            "seq",
            postgresql_where=UNFINISHED_BATCH,
            sqlite_where=UNFINISHED_BATCH,
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    record_ids: Mapped[list[Any]]
    error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utc_now, onupdate=utc_now)
    # Touched by the worker running the batch; a stale one means the worker died.
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime)


class RecordRow(Base):
    """A collection record. Its dataset is its id's first segment (the sources set it so:
    `id.split("/")[1]`), so the primary key serves a dataset's records as one range
    (`of_datasets`), and dataset filters read the id, not this column: no index of its own."""

    __tablename__ = "records"

    id: Mapped[str] = mapped_column(RecordId, primary_key=True)
    dataset: Mapped[str] = mapped_column(String(128))
    # NULL where it is ITEM_URI_BASE + id: read it through `record_item_uri`.
    item_uri: Mapped[str | None] = mapped_column(Text)
    image_url: Mapped[str | None] = mapped_column(Text)
    provider: Mapped[str | None] = mapped_column(Text)
    title: Mapped[str | None] = mapped_column(Text)
    timestamp_update: Mapped[datetime | None] = mapped_column(DateTime)
    first_seen: Mapped[datetime] = mapped_column(DateTime, default=utc_now)
    last_seen: Mapped[datetime] = mapped_column(DateTime, default=utc_now)


class ModelRow(Base):
    __tablename__ = "models"

    version: Mapped[str] = mapped_column(String(120), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    architecture: Mapped[str] = mapped_column(String(100))
    # Each class's key, human name and concept URI, in score order; thresholds beside.
    classes: Mapped[list[Any]]
    thresholds: Mapped[list[Any]]
    top_k_fallback: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    registered_at: Mapped[datetime] = mapped_column(DateTime, default=utc_now)
    # Set by `enrich model retire`: its results and labels are removed, runs refuse it.
    retired_at: Mapped[datetime | None] = mapped_column(DateTime)
    # Set when its thresholds change: its labels are decided again from the record after
    # this one ("": from the first), a chunk at a time (`store.relabel`); NULL: none left.
    relabel_after: Mapped[str | None] = mapped_column(RecordId)


# An image's digest with a model version, as the dedupe's index on PostgreSQL keys them.
IMAGE_VERSION = sa.text("(encode(image_sha256, 'hex') || model_version)")


class Result(Base):
    """One record classified (or failed) by one model version; the full score vector is kept.

    Stored compactly (`store.columns`): the scores packed, the image hash as bytes, and the
    image URL only where it is not the record's own (NULL: the record's; read it through
    `result_image_url`).
    """

    __tablename__ = "results"
    __table_args__ = (
        Index("ix_results_model_status", "model_version", "status"),
        # The dedupe of identical images looks an image's scores up by digest and model
        # version, by equality only: on PostgreSQL a hash index of the two together (a
        # 4-byte hash an entry, no NULLs), 40 % smaller than a b-tree of the 32-byte digests
        # (docs/scale.md). One image shared by many records (a placeholder) has many rows:
        # with the version in the key, a lookup stops at the first of its version's.
        Index("ix_results_image_version", IMAGE_VERSION, postgresql_using="hash").ddl_if(
            dialect="postgresql"
        ),
        Index("ix_results_image_sha256", "image_sha256").ddl_if(dialect="sqlite"),
    )

    record_id: Mapped[str] = mapped_column(
        ForeignKey("records.id", ondelete="CASCADE"), primary_key=True
    )
    model_version: Mapped[str] = mapped_column(ForeignKey("models.version"), primary_key=True)
    run_id: Mapped[int | None] = mapped_column(
        ForeignKey("runs.id", ondelete="SET NULL"), index=True
    )
    status: Mapped[str] = mapped_column(String(20))
    error_reason: Mapped[str | None] = mapped_column(String(40))
    error_message: Mapped[str | None] = mapped_column(Text)
    scores: Mapped[list[float] | None] = mapped_column(Scores())
    # NULL when it is the record's image URL (most results); "" when the result has none
    # although the record has one.
    image_url: Mapped[str | None] = mapped_column(Text)
    image_sha256: Mapped[str | None] = mapped_column(Sha256())
    source_timestamp: Mapped[datetime | None] = mapped_column(DateTime)
    classified_at: Mapped[datetime] = mapped_column(DateTime, default=utc_now)
    # The result that counts for its record (`store.current`'s rule: the latest classified),
    # kept by the transaction that writes results. A flag in the row rather than a table of
    # its own: one byte where a (record id, model version) row and its index took 160.
    is_current: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa.false())


def stored_item_uri(record_id: str, item_uri: str) -> str | None:
    """What a record stores of its item URI: NULL where it is the one its id gives."""
    return None if item_uri == ITEM_URI_BASE + record_id else item_uri


def item_uri_of(record_id: str, stored: str | None) -> str:
    """A record's item URI from its stored form (`stored_item_uri`)."""
    return ITEM_URI_BASE + record_id if stored is None else stored


def record_item_uri(
    item_uri: sa.ColumnElement[str | None], record_id: sa.ColumnElement[str]
) -> sa.ColumnElement[str]:
    """A record's item URI from its stored form, in SQL (`item_uri_of`)."""
    return sa.func.coalesce(item_uri, sa.literal(ITEM_URI_BASE, Text) + record_id, type_=Text)


def check_dataset(dataset: str) -> str:
    """A dataset name as a filter takes it: the first segment of a record id, so never empty
    and never with a "/" (which would name a part of another dataset's id range)."""
    if not dataset or "/" in dataset:
        raise InvalidValue(
            "dataset",
            f"{dataset!r} is not a dataset: a dataset is the first segment of a record id"
            " /DATASET/LOCAL_ID, such as 2048128, and holds no '/'",
        )
    return dataset


def dataset_range(dataset: str) -> tuple[str, str]:
    """The ids of a dataset's records are those from the first bound up to the second.

    An id is "/DATASET/LOCAL" and a dataset has no "/" (`check_dataset`): its ids are the
    strings that start "/DATASET/", which compare bytewise from there up to "/DATASET0"
    ("0" follows "/").
    """
    check_dataset(dataset)
    return f"/{dataset}/", f"/{dataset}0"


def of_datasets(
    record_id: sa.ColumnElement[str], datasets: Sequence[str]
) -> sa.ColumnElement[bool]:
    """The rows whose record id is of one of these datasets (at least one): a range scan of
    an index that starts with the record id (`RecordId`), one range a dataset."""
    return sa.or_(
        *(
            sa.and_(record_id >= low, record_id < high)
            for low, high in map(dataset_range, sorted(set(datasets)))
        )
    )


def result_image_url(
    result_url: sa.ColumnElement[str | None], record_url: sa.ColumnElement[str | None]
) -> sa.ColumnElement[str | None]:
    """The image URL a result was classified from (None: it had none), from its stored form."""
    return sa.func.nullif(sa.func.coalesce(result_url, record_url), "")


def shown_image_url(
    result_url: sa.ColumnElement[str | None], record_url: sa.ColumnElement[str | None]
) -> sa.ColumnElement[str | None]:
    """The image to show for a result: the one it was classified from, else its record's."""
    return sa.func.coalesce(sa.func.nullif(result_url, ""), record_url)


class Label(Base):
    """A label above its class threshold, materialised from its result for querying and export."""

    __tablename__ = "labels"
    # No foreign key to results (labels are only written by `save_outcomes`, in the
    # transaction of their result; a per-row check halved batch write speed). The primary
    # key's record_id prefix serves the per-record reads; (class, confidence) serves the
    # report's galleries, which read a class's labels from either end of the ranking.
    __table_args__ = (Index("ix_labels_class_confidence", "label_key", "confidence"),)

    record_id: Mapped[str] = mapped_column(RecordId, primary_key=True)
    model_version: Mapped[str] = mapped_column(String(120), primary_key=True)
    label_key: Mapped[str] = mapped_column(String(100), primary_key=True)
    # "" where it is the class's concept in the model's classes (nearly every label): read
    # it through `label_concept`.
    concept: Mapped[str] = mapped_column(Text)
    confidence: Mapped[float] = mapped_column(Float)


def label_concept(stored: str, class_concept: str | None) -> str:
    """A label's concept URI from what it stores ("": its class's)."""
    return stored or class_concept or ""


# Tables of later stages live beside the code that owns them; importing them here
# registers them on Base, so migrations and the schema check see every table.
from enrichment.store import ledger, review_tables, reviews, workers  # noqa: E402, F401
