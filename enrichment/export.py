"""Exporting labels as W3C Web Annotations in JSON-LD, streamed.

Each annotation's id is derived from (record, concept, model version), so
re-exporting gives the same ids and a consumer can update rather than
duplicate. Rows are read page by page and written as they come: memory does
not grow with the size of the export.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any

import sqlalchemy as sa

from enrichment import PROJECT_NAME
from enrichment.schema import Label, RecordRow, Result
from enrichment.store import Database

ANNO_CONTEXT = "http://www.w3.org/ns/anno.jsonld"
PROJECT_NAMESPACE = "https://w3id.org/heritage-enrichment/ns#"
PROJECT_CONTEXT = {
    "henr": PROJECT_NAMESPACE,
    "confidence": {"@id": "henr:confidence", "@type": "xsd:double"},
    "version": {"@id": "schema:softwareVersion"},
}
ANNOTATION_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, PROJECT_NAMESPACE + "annotation")
PAGE_ROWS = 1000


@dataclass(frozen=True)
class ExportFilter:
    run_id: int | None = None
    datasets: Sequence[str] = ()


@dataclass(frozen=True)
class LabelRow:
    record_id: str
    item_uri: str
    image_url: str | None
    model_version: str
    concept_uri: str
    confidence: float
    classified_at: datetime


def annotation_id(record_id: str, concept_uri: str, model_version: str) -> str:
    return "urn:uuid:" + str(
        uuid.uuid5(ANNOTATION_ID_NAMESPACE, f"{record_id}\n{concept_uri}\n{model_version}")
    )


def w3c_annotation(row: LabelRow) -> dict[str, Any]:
    """One label as a W3C Annotation; the confidence is a project term of the added context."""
    target: dict[str, Any] | str = (
        {"source": row.image_url, "scope": row.item_uri} if row.image_url else row.item_uri
    )
    return {
        "id": annotation_id(row.record_id, row.concept_uri, row.model_version),
        "type": "Annotation",
        "motivation": "classifying",
        "body": row.concept_uri,
        "target": target,
        "generator": {"type": "Software", "name": PROJECT_NAME, "version": row.model_version},
        "created": row.classified_at.replace(microsecond=0).isoformat() + "Z",
        "confidence": round(row.confidence, 6),
    }


def _selection(filters: ExportFilter) -> sa.Select:
    """Labels of each record's latest result (by classification time), filtered."""
    latest = (
        sa.select(Result.record_id, sa.func.max(Result.classified_at).label("classified_at"))
        .group_by(Result.record_id)
        .subquery()
    )
    query = (
        sa.select(
            Label.record_id,
            RecordRow.item_uri,
            Result.image_url,
            Label.model_version,
            Label.concept_uri,
            Label.confidence,
            Result.classified_at,
        )
        .join(
            Result,
            (Result.record_id == Label.record_id) & (Result.model_version == Label.model_version),
        )
        .join(
            latest,
            (latest.c.record_id == Result.record_id)
            & (latest.c.classified_at == Result.classified_at),
        )
        .join(RecordRow, RecordRow.id == Label.record_id)
    )
    if filters.run_id is not None:
        query = query.where(Result.run_id == filters.run_id)
    if filters.datasets:
        query = query.where(RecordRow.dataset.in_(filters.datasets))
    return query


def iter_label_rows(db: Database, filters: ExportFilter) -> Iterator[LabelRow]:
    query = _selection(filters).order_by(Label.record_id, Label.concept_uri)
    with db.engine.connect() as connection:
        result = connection.execution_options(stream_results=True, yield_per=PAGE_ROWS).execute(
            query
        )
        for row in result:
            yield LabelRow(*row)


def count_labels(db: Database, filters: ExportFilter) -> int:
    with db.engine.connect() as connection:
        return connection.execute(
            sa.select(sa.func.count()).select_from(_selection(filters).subquery())
        ).scalar_one()


def write_collection(db: Database, filters: ExportFilter, out: IO[str], label: str) -> int:
    """Write one AnnotationCollection with its annotations in a single page; returns the count."""
    total = count_labels(db, filters)
    collection_id = f"urn:{PROJECT_NAME}:export:{uuid.uuid4()}"
    head = {
        "@context": [ANNO_CONTEXT, PROJECT_CONTEXT],
        "id": collection_id,
        "type": "AnnotationCollection",
        "label": label,
        "total": total,
    }
    page = {
        "id": collection_id + "#page-0",
        "type": "AnnotationPage",
        "partOf": collection_id,
        "startIndex": 0,
    }
    out.write(
        json.dumps(head, indent=1)[:-2] + ',\n "first": ' + json.dumps(page)[:-1] + ', "items": [\n'
    )
    written = 0
    for row in iter_label_rows(db, filters):
        out.write((",\n" if written else "") + json.dumps(w3c_annotation(row), ensure_ascii=False))
        written += 1
    out.write("\n]}\n}\n")
    return written
