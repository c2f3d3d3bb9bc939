"""A model version's classes and thresholds, as registered when its first run started.

The one place they are read back: exports re-thresholding stored scores, the
review queue ordering by margin, publishing and the report all see the same
keys, names, concepts and thresholds, in score order.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.orm import Session

from enrichment.errors import EnrichError
from enrichment.store.schema import ModelRow


@dataclass(frozen=True)
class ModelClasses:
    """A model version's classes in score order: key, human name, concept URI, threshold."""

    version: str
    keys: tuple[str, ...]
    names: tuple[str, ...]
    concepts: tuple[str, ...]
    thresholds: tuple[float, ...]
    top_k_fallback: int

    def index(self, key: str) -> int:
        try:
            return self.keys.index(key)
        except ValueError:
            raise EnrichError(f"model {self.version} has no class {key!r}") from None


def model_classes(session: Session) -> dict[str, ModelClasses]:
    """Every registered model version's classes, by version."""
    rows = session.execute(
        sa.select(ModelRow.version, ModelRow.classes, ModelRow.thresholds, ModelRow.top_k_fallback)
    )
    return {
        version: ModelClasses(
            version,
            tuple(entry["key"] for entry in classes),
            tuple(entry.get("label") or entry["key"] for entry in classes),
            tuple(entry["concept"] for entry in classes),
            tuple(float(threshold) for threshold in thresholds),
            top_k_fallback or 0,
        )
        for version, classes, thresholds, top_k_fallback in rows
    }


def class_concepts(session: Session) -> dict[tuple[str, str], str]:
    """(model version, class key) -> concept URI, of every registered version: labels store
    their class's concept as "" (`schema.label_concept`)."""
    return {
        (model.version, key): concept
        for model in model_classes(session).values()
        for key, concept in zip(model.keys, model.concepts, strict=True)
    }
