"""What the review app asks of the store and gets back: filters, items, pages, cursors.

`review_queue` answers with pages (from the review index where it can),
`review_scan` with items read from `results`; both take a `QueueFilter`,
checked here (`check_filter`) against the registered models and runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from enrichment.errors import InvalidValue
from enrichment.store.database import Database
from enrichment.store.models import ModelClasses, model_classes
from enrichment.store.schema import Run
from enrichment.store.selection import datasets_without_records

SIDES = ("any", "above", "below")
STATES = ("pending", "reviewed", "accepted", "rejected", "added", "any")
MAX_LIMIT = 500
# Offsets read and skip every item before the page: `after` (keyset) is how to page deep.
MAX_OFFSET = 10_000
TOTAL_CAP = 10_000  # totals are exact up to this, then "10,000+"
MAX_ID = 2**63 - 1  # the largest id a database integer holds
STREAM = {"stream_results": True, "yield_per": 2000}


@dataclass(frozen=True)
class Cursor:
    """Where a page of the queue ended: the last item's margin |score - threshold| (None
    for an item without a score, which sorts last), record and class."""

    margin: float | None
    record_id: str
    label_key: str

    def as_text(self) -> str:
        """`margin~class~record` (the record last: it may hold any character)."""
        margin = "none" if self.margin is None else repr(self.margin)
        return f"{margin}~{self.label_key}~{self.record_id}"

    @classmethod
    def from_text(cls, text: str) -> Cursor:
        margin, _, rest = text.partition("~")
        label_key, _, record_id = rest.partition("~")
        if not record_id or not label_key:
            raise InvalidValue("after", "after is margin~class~record, as a next-page link has it")
        try:
            value = None if margin == "none" else float(margin)
        except ValueError:
            raise InvalidValue("after", f"after: {margin!r} is not a number") from None
        if value is not None and not 0 <= value <= 1:
            raise InvalidValue("after", "after: the margin is in [0, 1]")
        return cls(value, record_id, label_key)


@dataclass(frozen=True)
class QueueFilter:
    """Which items to show; the defaults are every pending item of every class.

    The fields are named as the `enrich review` commands name their parameters,
    so an `InvalidValue` about one names the option the user gave.
    """

    classes: Sequence[str] = ()
    datasets: Sequence[str] = ()
    run_id: int | None = None
    model_version: str | None = None
    min_score: float | None = None
    max_score: float | None = None
    side: str = "any"  # above: the model gave the label; below: it did not
    state: str = "pending"
    # The audit sample: labels without an audit decision, in random order; `state` is ignored.
    audit: bool = False
    limit: int = 50
    offset: int = 0
    # Keyset paging: only items ordered after this one (see `Cursor`); not for the audit.
    after: Cursor | None = None
    # Two model versions: only the items where exactly one of them gives the label, on
    # records both classified (`store.comparison.disagree_condition`), as a rollout reviews them.
    disagree: tuple[str, str] | None = None

    def check(self) -> None:
        """Refuse values out of range (what needs the database is `check_filter`'s)."""
        if self.side not in SIDES:
            raise InvalidValue("side", f"side must be one of {', '.join(SIDES)}, not {self.side!r}")
        if self.state not in STATES:
            raise InvalidValue(
                "state", f"state must be one of {', '.join(STATES)}, not {self.state!r}"
            )
        if not 1 <= self.limit <= MAX_LIMIT:
            raise InvalidValue("limit", f"limit must be between 1 and {MAX_LIMIT}")
        if not 0 <= self.offset <= MAX_OFFSET:
            raise InvalidValue("offset", f"offset must be between 0 and {MAX_OFFSET}")
        if self.run_id is not None and not 0 < self.run_id <= MAX_ID:
            raise InvalidValue("run_id", f"run {self.run_id} does not exist")
        for name, value in (("min_score", self.min_score), ("max_score", self.max_score)):
            if value is not None and not 0 <= value <= 1:
                raise InvalidValue(name, f"{name} must be in [0, 1]")
        if None not in (self.min_score, self.max_score) and self.min_score > self.max_score:
            # Not an empty queue without a word: the bounds were swapped.
            raise InvalidValue(
                "max_score", f"max_score {self.max_score:g} is below min_score {self.min_score:g}"
            )

    def everything(self, state: str, classes: Sequence[str] = ()) -> QueueFilter:
        """Every item in `state` of the same datasets, run and model version: what an
        export or a summary reads whole, whatever page of the queue the filter showed."""
        return QueueFilter(
            classes=classes,
            datasets=self.datasets,
            run_id=self.run_id,
            model_version=self.model_version,
            state=state,
            limit=MAX_LIMIT,
            disagree=self.disagree,
        )


@dataclass(frozen=True)
class Item:
    """One class of one record, as the queue and the record view show it."""

    record_id: str
    label_key: str
    label_name: str
    model_version: str
    confidence: float | None
    threshold: float
    labelled: bool
    decision: str | None
    reviewer: str | None
    decided_at: datetime | None
    title: str | None
    provider: str | None
    dataset: str
    item_page: str | None

    def as_json(self) -> dict[str, Any]:
        document = asdict(self)
        document["decided_at"] = self.decided_at.isoformat() + "Z" if self.decided_at else None
        document["state"] = self.decision or "pending"
        return document


@dataclass(frozen=True)
class QueuePage:
    items: list[Item]
    total: int  # every matching item, not only the page's, up to TOTAL_CAP
    # Where the next page starts (None: this page is the last one).
    next_page: Cursor | None = None
    total_capped: bool = False  # more than TOTAL_CAP items match


@dataclass(frozen=True)
class RecordView:
    record_id: str
    model_version: str
    title: str | None
    provider: str | None
    dataset: str
    item_page: str | None
    image_url: str | None
    items: list[Item] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "record_id": self.record_id,
            "model_version": self.model_version,
            "title": self.title,
            "provider": self.provider,
            "dataset": self.dataset,
            "item_page": self.item_page,
            "items": [item.as_json() for item in self.items],
        }


@dataclass(frozen=True)
class RecordItems:
    """The items of one record's result, with the image it was classified from."""

    record_id: str
    model_version: str
    image_url: str | None
    items: list[Item]


def registered_models(db: Database) -> dict[str, ModelClasses]:
    """Every registered model version's classes and thresholds, by version."""
    with db.transaction() as session:
        return model_classes(session)


def check_filter(session: Session, filters: QueueFilter) -> dict[str, ModelClasses]:
    """Refuse a filter naming an unknown run, model version, class or dataset; returns the
    models."""
    filters.check()
    models = model_classes(session)
    if filters.model_version is not None and filters.model_version not in models:
        raise InvalidValue("model_version", f"unknown model version {filters.model_version}")
    if filters.disagree is not None:
        unknown_versions = [version for version in filters.disagree if version not in models]
        if unknown_versions:
            raise InvalidValue("disagree", f"unknown model version {unknown_versions[0]}")
        if filters.disagree[0] == filters.disagree[1]:
            raise InvalidValue("disagree", "disagree names two different model versions")
    if (
        filters.run_id is not None
        and session.execute(sa.select(Run.id).where(Run.id == filters.run_id)).first() is None
    ):
        raise InvalidValue("run_id", f"run {filters.run_id} does not exist")
    keys = {key for model in models.values() for key in model.keys}
    unknown = sorted(set(filters.classes) - keys)
    if unknown:
        known = f"known: {', '.join(sorted(keys))}" if keys else "no model is registered yet"
        raise InvalidValue("classes", f"no model has the class {', '.join(unknown)} ({known})")
    # As exports refuse one: a mistyped dataset would read as "no decisions yet".
    missing = datasets_without_records(session, filters.datasets)
    if missing:
        raise InvalidValue("datasets", f"no record belongs to dataset {', '.join(missing)}")
    return models


@dataclass(frozen=True)
class Progress:
    """Where a curator stands: items of the filters still pending (up to `TOTAL_CAP`, then
    `pending_capped`), decisions made today."""

    pending: int
    decided_today: int
    pending_capped: bool = False

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def item_page(item_uri: str | None) -> str | None:
    """Where a person sees the record: its item URI, as the run report links it (one rule).

    Europeana's `http://data.europeana.eu/item/…` resolves to the item's page. Only
    http(s) is a link: an item URI from a records file is third-party text.
    """
    if item_uri and item_uri.startswith(("http://", "https://")):
        return item_uri
    return None
