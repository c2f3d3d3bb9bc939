"""What a publish plans and reports: each label wanted, each write planned, what came of
an update, and the report (`publish.sync` decides and sends them)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

from enrichment.publish.annotations import PROBLEMS_KEPT
from enrichment.publish.annotations_api import Rejected, Stored, Unusable
from enrichment.store.publications import LedgerEntry
from enrichment.store.selection import LabelRow


@dataclass(frozen=True)
class Wanted:
    """A current label as the annotation that should be published for it."""

    row: LabelRow
    annotation: dict[str, Any]
    sha256: str


@dataclass
class PublishReport:
    """What a publish did (or, dry, would do)."""

    dry_run: bool = False
    created: int = 0
    updated: int = 0
    withdrawn: int = 0
    unchanged: int = 0
    # Unsettled rows (an interrupted publish, a lost answer): adopted (the server held
    # them) or forgotten; a dry run only counts them.
    unsettled: int = 0
    adopted: int = 0
    forgotten: int = 0
    rejected: int = 0
    not_owned: int = 0
    invalid: int = 0
    # Answers that could not be recorded: the rows stay intents (see the module's docstring).
    unusable: int = 0
    # Labels of the selection that the curators' decisions (`--reviewed`) leave out.
    left_out_by_reviews: int = 0
    # With a precision gate: the classes it refused, and the labels they held back.
    refused_classes: list[dict[str, Any]] = field(default_factory=list)
    held_back: int = 0
    problems: list[str] = field(default_factory=list)
    # A dry run's planned changes, when asked for: action, record, label, annotation id.
    changes: list[dict[str, Any]] = field(default_factory=list)

    def problem(self, text: str) -> None:
        if len(self.problems) < PROBLEMS_KEPT:
            self.problems.append(text)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def content_sha256(annotation: dict[str, Any]) -> str:
    """The annotation's content, canonically serialised and hashed."""
    canonical = json.dumps(annotation, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass
class PlannedWrite:
    """One planned write: `create` (wanted, entry or None), `update` (both), `withdraw` (entry)."""

    kind: str
    wanted: Wanted | None
    entry: LedgerEntry | None
    row_id: int = 0

    @property
    def annotation_id(self) -> str:
        assert self.entry is not None and self.entry.annotation_id is not None, "a held row"
        return self.entry.annotation_id

    @property
    def annotation(self) -> dict[str, Any]:
        assert self.wanted is not None, "only creates and updates carry an annotation"
        return self.wanted.annotation

    def change(self) -> dict[str, Any]:
        """The planned change as a dry run lists it."""
        about: LabelRow | LedgerEntry | None = self.wanted.row if self.wanted else self.entry
        assert about is not None
        held = self.entry.annotation_id if self.entry is not None else None
        return {
            "action": self.kind,
            "record_id": about.record_id,
            "label": about.label_key,
            "concept": about.concept,
            "model_version": about.model_version,
            "annotation_id": held if self.kind != "create" else None,
        }


class UpdateOutcome(NamedTuple):
    """What came of one update: `adopted`, the annotation was found rather than answered;
    `created`, the annotation was gone and was created again (its row a create's intent)."""

    op: PlannedWrite
    outcome: Stored | Unusable | Rejected
    adopted: bool = False
    created: bool = False
