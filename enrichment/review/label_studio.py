"""Reading a Label Studio JSON export: every value checked before anything is taken from it.

An export is a file someone hands us, possibly edited by hand or written by
another tool, so nothing in it is trusted to have the shape Label Studio's
guide documents (labelstud.io/guide/export). A file that is not an export at
all (not UTF-8, not JSON, nested past what the parser takes, not a list) is
one error for the whole file; a task that cannot be read (`annotations: 7`,
`result: "abc"`, `choices: "map"`, a `model_version` that is a list) is
skipped with a reason that names it, and the other tasks still count. Values
from the file are never printed raw: a long or unprintable one is shortened
and quoted, so a message stays one line on the terminal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from enrichment.errors import InvalidValue

FROM_NAME = "labels"
TO_NAME = "image"
SHOWN_LENGTH = 100  # characters of a value from the file shown in a message


class TaskSkipped(Exception):
    """A task that cannot be read as an annotated task; the message names it and says why."""


@dataclass(frozen=True)
class AnnotatedTask:
    """What one task says: the classes its last annotation chose for a record's result."""

    name: str
    record_id: str
    model_version: str | None
    chosen: frozenset[str]
    reviewer: str
    annotated_at: datetime  # UTC; the earliest time when the annotation says none


def read_export(path: Path) -> list[Any]:
    """The tasks of an export, or an `InvalidValue` for the path saying why it is not one."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as error:
        raise InvalidValue("path", f"cannot read {path}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise InvalidValue(
            "path",
            f"{path} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
            f"{error.start}): export the project from Label Studio as JSON",
        ) from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidValue("path", f"{path} is not valid JSON: {error}") from None
    except RecursionError:
        raise InvalidValue(
            "path", f"{path} is nested too deeply to be a Label Studio export"
        ) from None
    if not isinstance(document, list):
        raise InvalidValue(
            "path", f"{path}: a Label Studio JSON export is a list of tasks, not {kind(document)}"
        )
    return document


def read_task(number: int, task: Any, default_reviewer: str) -> AnnotatedTask:
    """Task `number` (from 1) of an export, or `TaskSkipped` saying why it cannot count."""
    if not isinstance(task, dict):
        raise TaskSkipped(f"task {number} is {kind(task)}, not an object")
    name = _task_name(number, task.get("id"))
    data = task.get("data")
    if not isinstance(data, dict):
        raise TaskSkipped(f"{name}: its data is {kind(data)}, not an object")
    record_id = data.get("record_id")
    if not isinstance(record_id, str) or not record_id:
        raise TaskSkipped(f"{name}: no record_id in its data ({kind(record_id)})")
    annotation = _last_annotation(name, task)
    if annotation is None:
        raise TaskSkipped(f"{name}: no annotation that was not cancelled")
    return AnnotatedTask(
        name=name,
        record_id=record_id,
        model_version=_model_version(name, data, task),
        chosen=_chosen(name, annotation),
        reviewer=_reviewer(annotation, default_reviewer),
        annotated_at=_annotated_at(annotation),
    )


def kind(value: Any) -> str:
    """What a JSON value is, in words, for a message that must not print the value itself."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def shown(text: str) -> str:
    """A string from the file as a message may show it: short, and quoted if not printable."""
    short = text if len(text) <= SHOWN_LENGTH else text[:SHOWN_LENGTH] + "..."
    return short if short.isprintable() and short.strip() == short else repr(short)


def _task_name(number: int, task_id: Any) -> str:
    """`task 3`, with Label Studio's own id when it has one, so the task can be found there."""
    if isinstance(task_id, int) and not isinstance(task_id, bool):
        return f"task {number} (id {task_id})"
    if isinstance(task_id, str) and task_id:
        return f"task {number} (id {shown(task_id)})"
    return f"task {number}"


def _last_annotation(name: str, task: dict[str, Any]) -> dict[str, Any] | None:
    # `completions` is what Label Studio before 1.0 called annotations.
    for field in ("annotations", "completions"):
        annotations = task.get(field)
        if annotations is None:
            continue
        if not isinstance(annotations, list):
            raise TaskSkipped(f"{name}: its {field} are {kind(annotations)}, not a list")
        for position, annotation in enumerate(annotations, 1):
            if not isinstance(annotation, dict):
                raise TaskSkipped(
                    f"{name}: its annotation {position} is {kind(annotation)}, not an object"
                )
        kept = [a for a in annotations if not a.get("was_cancelled")]
        if kept:
            return max(kept, key=_annotated_at)
    return None


NEVER = datetime.min.replace(tzinfo=UTC)


def _annotated_at(annotation: dict[str, Any]) -> datetime:
    """When it was last changed, as a time: Label Studio's ISO 8601 text does not sort as
    time (`10:00:00Z` came after `10:00:00.500000Z`); none, or one that is no time, is the
    earliest."""
    for field in ("updated_at", "created_at"):
        value = annotation.get(field)
        if isinstance(value, str) and value:
            try:
                when = datetime.fromisoformat(value)
            except ValueError:
                continue
            return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    return NEVER


def _model_version(name: str, data: dict[str, Any], task: dict[str, Any]) -> str | None:
    """The version our export put in the data, or else the first prediction's."""
    version = data.get("model_version")
    if version is not None and version != "":
        if not isinstance(version, str):
            raise TaskSkipped(f"{name}: its data's model_version is {kind(version)}, not a string")
        return version
    predictions = task.get("predictions")
    if predictions is None:
        return None
    if not isinstance(predictions, list):
        raise TaskSkipped(f"{name}: its predictions are {kind(predictions)}, not a list")
    for prediction in predictions:
        if not isinstance(prediction, dict):
            continue  # the export may list predictions by id only
        version = prediction.get("model_version")
        if version is None or version == "":
            continue
        if not isinstance(version, str):
            raise TaskSkipped(
                f"{name}: its prediction's model_version is {kind(version)}, not a string"
            )
        return version
    return None


def _chosen(name: str, annotation: dict[str, Any]) -> frozenset[str]:
    """The class keys chosen in the annotation's `choices` results on our list of classes."""
    result = annotation.get("result")
    if result is None:
        return frozenset()
    if not isinstance(result, list):
        raise TaskSkipped(f"{name}: its annotation's result is {kind(result)}, not a list")
    chosen: set[str] = set()
    for position, region in enumerate(result, 1):
        where = f"{name}: result {position} of its annotation"
        if not isinstance(region, dict):
            raise TaskSkipped(f"{where} is {kind(region)}, not an object")
        if region.get("type") != "choices" or region.get("from_name") != FROM_NAME:
            continue  # another control of the labelling config
        value = region.get("value")
        if not isinstance(value, dict):
            raise TaskSkipped(f"{where} has a value that is {kind(value)}, not an object")
        choices = value.get("choices")
        if not isinstance(choices, list):
            raise TaskSkipped(f"{where} has choices that are {kind(choices)}, not a list")
        for choice in choices:
            if not isinstance(choice, str):
                raise TaskSkipped(f"{where} has a choice that is {kind(choice)}, not a class key")
        chosen.update(choices)
    return frozenset(chosen)


def _reviewer(annotation: dict[str, Any], default: str) -> str:
    """The annotator's e-mail when the export names it, else `default:ID`, else `default`."""
    who = annotation.get("completed_by")
    if isinstance(who, dict):
        email = who.get("email")
        if isinstance(email, str) and email.strip():
            return email.strip()[:200]
        who = who.get("id")
    if isinstance(who, (int, str)) and not isinstance(who, bool) and str(who).strip():
        return f"{default}:{str(who).strip()}"[:200]
    return default
