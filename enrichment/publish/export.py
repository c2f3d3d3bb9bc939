"""Exporting labels as Web Annotations: which labels, and the export as a whole.

By default every record contributes the labels of its latest classification
(the newest result that is not an error, so a failed fetch by a newer model
does not withdraw what an older one found); `--model` or `--run` pick a model
version or a run instead. Labels come from the `labels` table, or, with new
thresholds, are recomputed from the stored score vectors without running the
model. Rows are read through a server-side cursor and handed on one by one:
memory does not grow with the size of the export.

`--reviewed` brings curators' decisions in (`enrichment.store.reviews`, the
last decision per record and label): `any` ignores them, `not-rejected`
leaves out labels a curator rejected, `accepted` keeps only labels a curator
accepted. Labels a curator added below threshold are not exported: they are
not the model's, and `enrich review export` hands them to training instead.

A thresholds file is a JSON object mapping label keys to thresholds in [0, 1],
`{"photograph": 0.7, "map": 0.35}`; a label it does not name keeps its model's
own threshold.

`export` ties the stages together: rows -> annotations of a profile
(`annotations`), each checked -> a layout on disk or stdout (`pages`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import numpy as np
import sqlalchemy as sa

from enrichment.errors import EnrichError
from enrichment.model.spec import decide
from enrichment.publish.annotations import (
    ANNOTATION_ID_NAMESPACE,
    PROFILES,
    CheckedAnnotations,
    LabelRow,
)
from enrichment.publish.pages import AtomicFiles, Layout, write_document, write_split
from enrichment.store.current import current_results
from enrichment.store.database import Database
from enrichment.store.reviews import REVIEWED, Decision, latest_decisions
from enrichment.store.schema import Label, ModelRow, RecordRow, Result, Run

STREAM_ROWS = 2000


class ExportError(EnrichError):
    """An export's options name something that does not exist, or cannot be written."""


@dataclass(frozen=True)
class ExportFilter:
    """What to export; every field narrows the selection, the defaults select everything."""

    datasets: Sequence[str] = ()
    run_id: int | None = None
    model_version: str | None = None
    since: datetime | None = None
    min_confidence: float | None = None
    labels: Sequence[str] = ()
    thresholds: Mapping[str, float] | None = None
    reviewed: str = "any"

    def describe(self) -> str:
        """The filters in words, for the collection's label."""
        parts = []
        if self.datasets:
            parts.append("dataset " + ", ".join(self.datasets))
        if self.run_id is not None:
            parts.append(f"run {self.run_id}")
        parts.append(f"model {self.model_version}" if self.model_version else "latest model")
        if self.since is not None:
            parts.append(f"since {self.since.isoformat()}Z")
        if self.labels:
            parts.append("label " + ", ".join(self.labels))
        if self.min_confidence is not None:
            parts.append(f"confidence >= {self.min_confidence:g}")
        if self.thresholds:
            parts.append(
                "thresholds " + ", ".join(f"{k}={v:g}" for k, v in sorted(self.thresholds.items()))
            )
        if self.reviewed != "any":
            parts.append(f"reviewed {self.reviewed}")
        return "; ".join(parts)


@dataclass(frozen=True)
class Output:
    """Where and how to write: profile, format, file (None: a stream), pages per file."""

    profile: str = "w3c"
    format: str = "jsonld"
    path: Path | None = None
    split: int | None = None
    base_url: str | None = None


@dataclass(frozen=True)
class ExportReport:
    written: int
    skipped: int
    problems: list[str]
    files: list[Path]


def export(
    db: Database, filters: ExportFilter, output: Output, stream: IO[str] | None = None
) -> ExportReport:
    """Write the selected labels as annotations to `output.path`, or to `stream` without one."""
    check_filter(db, filters)
    if output.split is not None and output.path is None:
        raise ExportError("--split writes one file per page: it needs --out")
    if output.base_url is not None and output.path is None:
        raise ExportError("--base-url names the published files: it needs --out")
    if output.base_url is not None and not output.base_url.endswith("/"):
        output = replace(output, base_url=output.base_url + "/")
    checked = CheckedAnnotations(PROFILES[output.profile])
    layout = Layout(
        checked.profile,
        output.format,
        collection_id(filters, output),
        "Image classification labels: " + filters.describe(),
        output.base_url,
    )
    annotations = checked.build(iter_label_rows(db, filters))
    if output.path is None:
        assert stream is not None, "export to a stream needs the stream"
        write_document(annotations, stream, layout)
        files = []
    elif output.split is None:
        with AtomicFiles() as atomic, atomic.create(output.path) as out:
            write_document(annotations, out, layout)
        files = [output.path]
    else:
        files = write_split(annotations, output.path, output.split, layout)
    return ExportReport(checked.written, checked.skipped, checked.problems, files)


def collection_id(filters: ExportFilter, output: Output) -> str:
    """The published file's URL, or a URN derived from the filters.

    The same filters name the same collection on every export, so a nightly
    export of a dataset is one collection whose content changes over time.
    """
    if output.base_url is not None and output.path is not None:
        return output.base_url + output.path.name
    key = {
        **asdict(filters),
        "datasets": sorted(filters.datasets),
        "labels": sorted(filters.labels),
        "thresholds": dict(filters.thresholds or {}),
    }
    if filters.reviewed == "any":  # as before reviews existed: the same filters, the same id
        del key["reviewed"]
    name = "collection\n" + json.dumps(key, sort_keys=True, default=str)
    return f"urn:uuid:{uuid.uuid5(ANNOTATION_ID_NAMESPACE, name)}"


def read_thresholds(path: Path) -> dict[str, float]:
    """Parse a thresholds file: a JSON object of label key -> threshold in [0, 1]."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ExportError(f"cannot read thresholds file {path}: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise ExportError(f"thresholds file {path} is not valid JSON: {error}") from None
    if not isinstance(document, dict) or not document:
        raise ExportError(
            f'thresholds file {path} must be a JSON object such as {{"photograph": 0.7}}'
        )
    thresholds = {}
    for key, value in document.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise ExportError(f"thresholds file {path}: {key!r} must be a number in [0, 1]")
        thresholds[key] = float(value)
    return thresholds


@dataclass(frozen=True)
class _ModelLabels:
    """A model version's labels in score order, with the thresholds an export applies."""

    keys: list[str]
    concepts: list[str]
    thresholds: np.ndarray
    top_k_fallback: int


def check_filter(db: Database, filters: ExportFilter) -> None:
    """Refuse filters that name a run, model version or label key the database does not know."""
    if filters.reviewed not in REVIEWED:
        raise ExportError(
            f"reviewed must be one of {', '.join(REVIEWED)}, not {filters.reviewed!r}"
        )
    with db.engine.connect() as connection:
        run = sa.select(Run.id).where(Run.id == filters.run_id)
        if filters.run_id is not None and connection.execute(run).first() is None:
            raise ExportError(f"run {filters.run_id} does not exist")
        models = _model_labels(connection, None)
    if filters.model_version is not None and filters.model_version not in models:
        known = ", ".join(sorted(models)) or "none yet"
        raise ExportError(f"unknown model version {filters.model_version} (known: {known})")
    keys = {key for model in models.values() for key in model.keys}
    for option, named in (("--label", filters.labels), ("--thresholds", filters.thresholds or {})):
        unknown = sorted(set(named) - keys)
        if unknown:
            raise ExportError(
                f"{option} names label keys no model has: {', '.join(unknown)} "
                f"(known: {', '.join(sorted(keys)) or 'none yet'})"
            )


def iter_label_rows(db: Database, filters: ExportFilter) -> Iterator[LabelRow]:
    """The selected labels, ordered by record, model version and label key."""
    with db.engine.connect() as connection:
        if filters.thresholds is None:
            rows = _stream(connection, _stored_labels(filters))
            yield from (LabelRow(*row) for row in rows)
        else:
            models = _model_labels(connection, filters.thresholds)
            decisions = _decisions(connection) if filters.reviewed != "any" else {}
            for row in _stream(connection, _classified_results(filters)):
                yield from _rethreshold(row, models[row.model_version], filters, decisions)


def _stream(connection: sa.Connection, query: sa.Select) -> sa.CursorResult[Any]:
    """Rows fetched in chunks through a server-side cursor (PostgreSQL) or SQLite's cursor."""
    return connection.execution_options(stream_results=True, yield_per=STREAM_ROWS).execute(query)


def _model_labels(
    connection: sa.Connection, overrides: Mapping[str, float] | None
) -> dict[str, _ModelLabels]:
    models = {}
    for version, labels, thresholds, top_k_fallback in connection.execute(
        sa.select(ModelRow.version, ModelRow.labels, ModelRow.thresholds, ModelRow.top_k_fallback)
    ):
        keys = [label["key"] for label in labels]
        applied = [
            (overrides or {}).get(key, own) for key, own in zip(keys, thresholds, strict=True)
        ]
        models[version] = _ModelLabels(
            keys,
            [label["concept"] for label in labels],
            np.asarray(applied, dtype=np.float64),
            top_k_fallback,
        )
    return models


def _stored_labels(filters: ExportFilter) -> sa.Select:
    chosen = current_results(filters.datasets, filters.run_id, filters.model_version)
    query = (
        sa.select(
            Label.record_id,
            RecordRow.item_uri,
            chosen.c.image_url,
            Label.model_version,
            Label.label_key,
            Label.concept,
            Label.confidence,
            chosen.c.classified_at,
        )
        .join(
            chosen,
            (chosen.c.record_id == Label.record_id)
            & (chosen.c.model_version == Label.model_version),
        )
        .join(RecordRow, RecordRow.id == Label.record_id)
        .order_by(Label.record_id, Label.model_version, Label.label_key)
    )
    if filters.since is not None:
        query = query.where(chosen.c.classified_at >= filters.since)
    if filters.labels:
        query = query.where(Label.label_key.in_(filters.labels))
    if filters.min_confidence is not None:
        query = query.where(Label.confidence >= filters.min_confidence)
    if filters.reviewed != "any":
        query = query.where(reviewed_condition(Label.record_id, Label.label_key, filters.reviewed))
    return query


def reviewed_condition(
    record_id: sa.ColumnElement[str], label_key: sa.ColumnElement[str], reviewed: str
) -> sa.ColumnElement[bool]:
    """SQL for `--reviewed`: the label's last decision is positive, or is not a rejection."""
    decisions = latest_decisions()
    decided = sa.select(decisions.c.id).where(
        decisions.c.record_id == record_id, decisions.c.label_key == label_key
    )
    if reviewed == "accepted":
        return decided.where(decisions.c.decision.in_(Decision.POSITIVE)).exists()
    return ~decided.where(decisions.c.decision == Decision.REJECT).exists()


def _decisions(connection: sa.Connection) -> dict[tuple[str, str], str]:
    """(record, label key) -> last decision; curators' decisions are few enough to hold."""
    decisions = latest_decisions()
    query = sa.select(decisions.c.record_id, decisions.c.label_key, decisions.c.decision)
    return {(record, key): decision for record, key, decision in connection.execute(query)}


def _review_keeps(decision: str | None, reviewed: str) -> bool:
    """The same rule as `reviewed_condition`, for labels recomputed from scores."""
    if reviewed == "accepted":
        return decision in Decision.POSITIVE
    return reviewed == "any" or decision != Decision.REJECT


def _classified_results(filters: ExportFilter) -> sa.Select:
    chosen = current_results(filters.datasets, filters.run_id, filters.model_version)
    query = (
        sa.select(
            chosen.c.record_id,
            RecordRow.item_uri,
            chosen.c.image_url,
            chosen.c.model_version,
            chosen.c.classified_at,
            Result.scores,
        )
        .join(RecordRow, RecordRow.id == chosen.c.record_id)
        .join(
            Result,
            (Result.record_id == chosen.c.record_id)
            & (Result.model_version == chosen.c.model_version),
        )
        .order_by(chosen.c.record_id, chosen.c.model_version)
    )
    if filters.since is not None:
        query = query.where(chosen.c.classified_at >= filters.since)
    return query


def _rethreshold(
    row: Any,
    model: _ModelLabels,
    filters: ExportFilter,
    decisions: Mapping[tuple[str, str], str],
) -> Iterator[LabelRow]:
    """The labels one stored score vector yields under the export's thresholds, by key."""
    if not row.scores:
        return
    scores = np.asarray(row.scores, dtype=np.float64)[np.newaxis, :]
    chosen = decide(scores, model.thresholds, model.top_k_fallback)[0]
    kept = sorted(
        (model.keys[i], model.concepts[i], float(row.scores[i])) for i in np.flatnonzero(chosen)
    )
    for key, concept, confidence in kept:
        if filters.labels and key not in filters.labels:
            continue
        if filters.min_confidence is not None and confidence < filters.min_confidence:
            continue
        if not _review_keeps(decisions.get((row.record_id, key)), filters.reviewed):
            continue
        yield LabelRow(
            row.record_id,
            row.item_uri,
            row.image_url,
            row.model_version,
            key,
            concept,
            confidence,
            row.classified_at,
        )
