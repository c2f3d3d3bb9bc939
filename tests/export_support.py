"""A known catalogue of classified records for the export tests (this module holds no tests).

Rows go in through the library's own writes (`upsert_records`, `register_model`,
`save_outcomes`), and every label is also computed here, independently, from the
same scores and thresholds, so the tests can say exactly which annotations an
export must hold.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from enrichment.publish.export import ExportFilter, Output, export
from enrichment.sources.records_file import Record
from enrichment.store.database import Database
from enrichment.store.schema import Outcome, utc_now
from enrichment.store.writes import (
    LabelScore,
    RecordOutcome,
    register_model,
    save_outcomes,
    upsert_records,
)
from tests.conftest import VOCABULARY

KEYS = ("photograph", "drawing", "map")
OWN_THRESHOLDS = (0.5, 0.4, 0.6)
MODEL_LABELS = [{"key": key, "label": key.title(), "concept": VOCABULARY[key]} for key in KEYS]
OLD = "pilot@aaaaaaaaaaaa"
NEW = "pilot@bbbbbbbbbbbb"
DATASETS = {"1001": 12, "1002": 8}


def open_database(url: str) -> Database:
    db = Database(url)
    db.upgrade()
    return db


def record_ids(dataset: str) -> list[str]:
    return [f"/{dataset}/item_{n:02d}" for n in range(DATASETS[dataset])]


def item_uri(record_id: str) -> str:
    return "http://data.europeana.eu/item" + record_id


def image_url(record_id: str) -> str:
    return f"https://images.example.org{record_id}.jpg"


def scores_of(record_id: str, version: str) -> list[float]:
    """Stable pseudo-random scores in [0, 1), spread across the thresholds, as float32 values."""
    digest = hashlib.sha256(f"{record_id} {version}".encode()).digest()
    raw = np.frombuffer(digest[: 2 * len(KEYS)], dtype=np.uint16) / 65536.0
    return [float(value) for value in raw.astype(np.float32)]


def labels_of(scores: list[float], thresholds: dict[str, float] | None = None) -> dict[str, float]:
    """Key -> confidence of the labels at or above their threshold, compared in float64 as
    `thresholds.decide` compares (the scores are float32 values, stored as they are)."""
    applied = [
        (thresholds or {}).get(key, own) for key, own in zip(KEYS, OWN_THRESHOLDS, strict=True)
    ]
    return {
        key: score
        for key, score, threshold in zip(KEYS, scores, applied, strict=True)
        if score >= threshold
    }


@dataclass
class Catalogue:
    """What was stored: each record's results by model version, and when each was saved."""

    results: dict[str, dict[str, list[float] | None]] = field(default_factory=dict)
    saved_at: dict[str, datetime] = field(default_factory=dict)

    def classify(
        self, db: Database, version: str, record_ids: list[str], failed: tuple[str, ...] = ()
    ) -> None:
        """Store one batch of `version`: scores for `record_ids`, fetch errors for `failed`."""
        outcomes = []
        for record_id in record_ids:
            scores = scores_of(record_id, version)
            labels = labels_of(scores)
            outcomes.append(
                RecordOutcome(
                    record_id,
                    Outcome.LABELLED if labels else Outcome.BELOW_THRESHOLD,
                    scores=scores,
                    labels=[LabelScore(k, VOCABULARY[k], c) for k, c in labels.items()],
                    image_url=image_url(record_id),
                )
            )
            self.results.setdefault(record_id, {})[version] = scores
        for record_id in failed:
            outcomes.append(
                RecordOutcome.failed(record_id, "http_404", "gone", image_url=image_url(record_id))
            )
            self.results.setdefault(record_id, {})[version] = None
        self.saved_at[version] = utc_now()
        with db.transaction() as session:
            save_outcomes(session, None, version, outcomes)

    def expected(
        self,
        version: str | None = None,
        datasets: tuple[str, ...] = (),
        thresholds: dict[str, float] | None = None,
        min_confidence: float = 0.0,
        keys: tuple[str, ...] = KEYS,
        only_versions: tuple[str, ...] | None = None,
    ) -> dict[tuple[str, str, str], float]:
        """(record, version, key) -> confidence the export must hold for these filters.

        Without `version`, a record's latest non-error result counts (results are
        stored in order, so the last version in its dict that has scores).
        """
        want = {}
        for record_id, by_version in self.results.items():
            if datasets and record_id.split("/")[1] not in datasets:
                continue
            classified = [v for v, scores in by_version.items() if scores is not None]
            if version is not None:
                chosen = version if version in classified else None
            else:
                chosen = classified[-1] if classified else None
            if chosen is None or (only_versions is not None and chosen not in only_versions):
                continue
            scores = by_version[chosen]
            assert scores is not None
            for key, confidence in labels_of(scores, thresholds).items():
                if key in keys and confidence >= min_confidence:
                    want[(record_id, chosen, key)] = confidence
        return want


def build_catalogue(db: Database) -> Catalogue:
    """Twenty records in two datasets, classified by OLD; then part of dataset 1001 by NEW.

    NEW re-classifies items 0-5 of 1001 and fails on items 6-7 (which keep their
    OLD labels); the rest of the catalogue only ever saw OLD.
    """
    with db.transaction() as session:
        for version in (OLD, NEW):
            register_model(session, version, "pilot", "resnet18", MODEL_LABELS, OWN_THRESHOLDS)
        upsert_records(
            session,
            [
                Record(record_id, dataset, item_uri(record_id), image_url(record_id), "Museum")
                for dataset in DATASETS
                for record_id in record_ids(dataset)
            ],
        )
    catalogue = Catalogue()
    catalogue.classify(db, OLD, record_ids("1001") + record_ids("1002"))
    first = record_ids("1001")
    catalogue.classify(db, NEW, first[:6], failed=tuple(first[6:8]))
    return catalogue


def export_text(db: Database, filters: ExportFilter | None = None, **output: Any) -> str:
    """An export to a string, as `enrich export` without --out writes it to stdout."""
    stream = io.StringIO()
    export(db, filters or ExportFilter(), Output(**output), stream)
    return stream.getvalue()


def annotations_in(text: str, fmt: str = "jsonld", profile: str = "w3c") -> list[dict[str, Any]]:
    if fmt == "jsonl":
        return [json.loads(line) for line in text.splitlines()]
    document = json.loads(text)
    return document["first"]["items"] if profile == "w3c" else document["items"]


def exported_labels(annotations: list[dict[str, Any]]) -> dict[tuple[str, str, str], float]:
    """(record, version, key) -> confidence, read back from W3C annotations."""
    by_concept = {VOCABULARY[key]: key for key in KEYS}
    return {
        (
            annotation["target"]["scope"].removeprefix("http://data.europeana.eu/item"),
            annotation["generator"]["version"],
            by_concept[annotation["body"]],
        ): annotation["confidence"]
        for annotation in annotations
    }


def read_pages(out_path: Path) -> Iterator[dict[str, Any]]:
    """The page files of a split export, in order."""
    for path in sorted(out_path.parent.glob(f"{out_path.stem}-*{out_path.suffix}")):
        yield json.loads(path.read_text())
