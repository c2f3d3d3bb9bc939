"""Decisions out and in: a labelled set for training, and Label Studio tasks and exports.

The labelled set (JSON Lines, as `enrich model train`/`calibrate` read it) has
one row per reviewed record: its image URL, its labels, and its record id as
the group, so training keeps a record on one side of its split. A record's
labels are those decided positive (accepted or added) plus the model's own
labels that nobody decided on: a row lists every positive label, so leaving
an unreviewed machine label out would teach the model it was wrong.

Label Studio (labelstud.io/guide/tasks, /guide/predictions, /guide/export):
tasks carry `data.image` and one prediction per task with `model_version`,
a `score` (the least confident of its labels, so sorting by it puts the
doubtful first) and one `choices` result per label above threshold. Its JSON
export carries each task's `annotations[].result`; the last annotation that
was not cancelled is read back as decisions on the task's record: a machine
label kept is accepted, one removed is rejected, a class chosen that the
model did not give is added.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import IO, Any

from enrichment.errors import InvalidValue
from enrichment.store.database import Database
from enrichment.store.decisions import (
    NewDecision,
    record_decisions,
    results_and_labels,
    standing_decisions,
)
from enrichment.store.review_queue import QueueFilter, items_by_record, registered_models
from enrichment.store.reviews import Decision

FROM_NAME = "labels"
TO_NAME = "image"


def write_labelled_set(db: Database, filters: QueueFilter, out: IO[str]) -> int:
    """The reviewed records as JSON Lines rows {image, labels, record_id}; returns the count."""
    written = 0
    for record in items_by_record(db, filters.everything("any"), decided=True):
        if not record.image_url:
            continue
        labels = sorted(
            item.label_key
            for item in record.items
            if item.decision in Decision.POSITIVE or (item.decision is None and item.labelled)
        )
        row = {"image": record.image_url, "labels": labels, "record_id": record.record_id}
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
        written += 1
    return written


def label_config(names: dict[str, str]) -> str:
    """A Label Studio labelling config: the image and one multiple-choice list of classes."""
    choices = "\n".join(
        f'    <Choice value="{escape(key)}" alias="{escape(key)}" hint="{escape(name)}"/>'
        for key, name in names.items()
    )
    return (
        "<View>\n"
        f'  <Image name="{TO_NAME}" value="$image"/>\n'
        '  <Header value="$title"/>\n'
        f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="multiple" showInline="true">\n'
        f"{choices}\n"
        "  </Choices>\n"
        "</View>\n"
    )


def label_studio_tasks(db: Database, filters: QueueFilter) -> Iterator[dict[str, Any]]:
    """One task per (record, model version) of the chosen results, with the model's prediction
    (only the records nobody decided on, when `filters.state` is pending)."""
    decided = False if filters.state == "pending" else None
    for record in items_by_record(db, filters.everything("any"), decided):
        if not record.image_url:
            continue
        first = record.items[0]
        url = record.image_url
        labelled = [item for item in record.items if item.labelled]
        if filters.classes and not any(item.label_key in filters.classes for item in labelled):
            continue
        result = [
            {
                "id": uuid.uuid5(uuid.NAMESPACE_URL, f"{first.record_id} {item.label_key}").hex[
                    :10
                ],
                "from_name": FROM_NAME,
                "to_name": TO_NAME,
                "type": "choices",
                "value": {"choices": [item.label_key]},
                "score": item.confidence,
            }
            for item in labelled
        ]
        yield {
            "data": {
                "image": url,
                "record_id": first.record_id,
                "model_version": first.model_version,
                "title": first.title or first.record_id,
                "item_page": first.item_page,
            },
            "predictions": [
                {
                    "model_version": first.model_version,
                    "score": min((item.confidence or 0.0 for item in labelled), default=0.0),
                    "result": result,
                }
            ],
        }


def write_label_studio(
    db: Database, filters: QueueFilter, tasks_path: Path, config_path: Path
) -> int:
    """Write the tasks (a JSON list) and the labelling config; returns the number of tasks."""
    names: dict[str, str] = {}
    for model in registered_models(db).values():
        if filters.model_version is None or model.version == filters.model_version:
            names.update(zip(model.keys, model.names, strict=True))
    tasks = list(label_studio_tasks(db, filters))
    tasks_path.write_text(json.dumps(tasks, indent=1, ensure_ascii=False), encoding="utf-8")
    config_path.write_text(label_config(names), encoding="utf-8")
    return len(tasks)


@dataclass(frozen=True)
class ImportReport:
    tasks: int
    decisions: int
    unchanged: int
    skipped: list[str]


def _reviewer(annotation: dict[str, Any], default: str) -> str:
    who = annotation.get("completed_by")
    if isinstance(who, dict):
        return str(who.get("email") or who.get("id") or default)[:200]
    if who is not None:
        return f"{default}:{who}"[:200]
    return default


def _last_annotation(task: dict[str, Any]) -> dict[str, Any] | None:
    # `completions` is what Label Studio before 1.0 called annotations.
    annotations = task.get("annotations") or task.get("completions") or []
    kept = [a for a in annotations if isinstance(a, dict) and not a.get("was_cancelled")]
    if not kept:
        return None
    return max(kept, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""),))


def import_label_studio(db: Database, path: Path, reviewer: str) -> ImportReport:
    """Read a Label Studio JSON export as decisions; a decision already standing is not repeated."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise InvalidValue("path", f"cannot read {path}: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise InvalidValue("path", f"{path} is not valid JSON: {error}") from None
    if not isinstance(document, list):
        raise InvalidValue("path", f"{path}: a Label Studio JSON export is a list of tasks")
    models = registered_models(db)
    standing = standing_decisions(db)
    skipped: list[str] = []
    annotated: list[tuple[int, str, str, set[str], str]] = []
    for number, task in enumerate(document, 1):
        data = task.get("data") if isinstance(task, dict) else None
        record_id = data.get("record_id") if isinstance(data, dict) else None
        annotation = _last_annotation(task) if isinstance(task, dict) else None
        if not record_id or annotation is None:
            skipped.append(f"task {number}: no record_id in its data, or no annotation")
            continue
        version = data.get("model_version") or next(
            (
                p.get("model_version")
                for p in task.get("predictions") or []
                if isinstance(p, dict)  # the export may list predictions by id only
            ),
            None,
        )
        if version not in models:
            skipped.append(f"task {number}: unknown model version {version!r}")
            continue
        chosen = {
            choice
            for result in annotation.get("result") or []
            if result.get("type") == "choices" and result.get("from_name") == FROM_NAME
            for choice in (result.get("value") or {}).get("choices") or []
        }
        unknown = sorted(chosen - set(models[version].keys))
        if unknown:
            skipped.append(f"task {number}: unknown classes {', '.join(unknown)}")
            continue
        annotated.append((number, str(record_id), version, chosen, _reviewer(annotation, reviewer)))
    known = results_and_labels(
        db, [(record_id, version) for _, record_id, version, _, _ in annotated]
    )
    decisions: list[NewDecision] = []
    unchanged = 0
    for number, record_id, version, chosen, who in annotated:
        if (record_id, version) not in known.results:
            skipped.append(f"task {number}: record {record_id} has no result of model {version}")
            continue
        for key in models[version].keys:
            if (record_id, version, key) in known.labels:
                decision = Decision.ACCEPT if key in chosen else Decision.REJECT
            elif key in chosen:
                decision = Decision.ADD
            else:
                continue
            if standing.get((record_id, key)) == decision:
                unchanged += 1
                continue
            decisions.append(NewDecision(record_id, key, version, decision, who))
    record_decisions(db, decisions)
    return ImportReport(len(document), len(decisions), unchanged, skipped)
