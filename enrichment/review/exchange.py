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
model did not give is added. The export is read, and each value checked, by
`enrichment.review.label_studio`; what it cannot use is skipped with a reason.
"""

from __future__ import annotations

import json
import os
import stat
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import IO, Any

from enrichment.errors import InvalidValue, OutputError
from enrichment.files import write_atomically
from enrichment.review.label_studio import (
    FROM_NAME,
    TO_NAME,
    AnnotatedTask,
    TaskSkipped,
    read_export,
    read_task,
    shown,
)
from enrichment.store.database import Database
from enrichment.store.decisions import (
    NewDecision,
    record_decisions,
    results_and_labels,
    standing_decisions,
)
from enrichment.store.review_queue import QueueFilter, items_by_record, registered_models
from enrichment.store.reviews import Decision


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
    """Write the tasks (a JSON list) and the labelling config; returns the number of tasks.

    Both are made in memory first, so a database that fails leaves the files as
    they were. A regular file (or a new one) is written to a temporary file and
    renamed, so a full disk leaves the previous good file in place; a device or
    a pipe (`/dev/stdout`) is written through, and first, since it cannot be
    taken back: a failure there leaves the regular files untouched. A failure
    is one `OutputError` naming the path.
    """
    names: dict[str, str] = {}
    for model in registered_models(db).values():
        if filters.model_version is None or model.version == filters.model_version:
            names.update(zip(model.keys, model.names, strict=True))
    # The tasks are read over every class (a task shows all its record's labels), so the
    # store's filter check never sees these: a mistyped class wrote no task, exit 0.
    unknown = sorted(set(filters.classes) - set(names))
    if unknown:
        known = ", ".join(sorted(names)) or "no model is registered yet"
        raise InvalidValue("classes", f"no model has the class {', '.join(unknown)} ({known})")
    tasks = list(label_studio_tasks(db, filters))
    outputs = [
        (tasks_path, json.dumps(tasks, indent=1, ensure_ascii=False)),
        (config_path, label_config(names)),
    ]
    outputs.sort(key=lambda output: not _written_through(output[0]))
    for path, text in outputs:
        if _written_through(path):
            _write_through(path, text)
        else:
            _write_file(path, text)
    return len(tasks)


def _written_through(path: Path) -> bool:
    """Whether `path` names something a rename must not replace: a device, a FIFO, a socket."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False  # a new file, or a path `write_atomically` will say is unusable
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _write_file(path: Path, text: str) -> None:
    """`write_atomically` at the file `path` names (through a symlink, so the link stays)."""
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    try:
        write_atomically(target, text)
    except NotADirectoryError as error:
        # A path under a file: write_atomically's cleanup (unlink, missing_ok) meets it again.
        raise OutputError(f"cannot write {path}: {error.strerror}") from None


def _write_through(path: Path, text: str) -> None:
    try:
        with open(path, "w", encoding="utf-8") as file:
            file.write(text)  # a full device says so when the file is closed
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error.strerror or error}") from None


@dataclass(frozen=True)
class ImportReport:
    tasks: int
    decisions: int
    unchanged: int
    skipped: list[str]


def import_label_studio(db: Database, path: Path, reviewer: str) -> ImportReport:
    """Read a Label Studio JSON export as decisions; a decision already standing is not repeated.

    A task that cannot be read is skipped with its reason. A record annotated in several
    tasks (of one model version or of several: decisions are a record's, whatever the
    version) counts once, by the latest annotation (the later task on a tie), so one file
    never records a decision twice. A class the annotation leaves out is rejected where
    the model gave it or a decision standing on it says it is there (an earlier add).
    """
    document = read_export(path)
    models = registered_models(db)
    skipped: list[str] = []
    latest: dict[str, AnnotatedTask] = {}
    for number, entry in enumerate(document, 1):
        try:
            task = read_task(number, entry, reviewer)
        except TaskSkipped as problem:
            skipped.append(str(problem))
            continue
        if task.model_version not in models:
            version = shown(task.model_version) if task.model_version else "none"
            skipped.append(f"{task.name}: unknown model version {version}")
            continue
        unknown = sorted(task.chosen - set(models[task.model_version].keys))
        if unknown:
            skipped.append(f"{task.name}: unknown classes {', '.join(map(shown, unknown))}")
            continue
        earlier = latest.get(task.record_id)
        if earlier is not None:
            kept, dropped = (
                (earlier, task) if earlier.annotated_at > task.annotated_at else (task, earlier)
            )
            skipped.append(
                f"{dropped.name}: the same record as {kept.name}, whose annotation counts"
            )
            task = kept
        latest[task.record_id] = task
    known = results_and_labels(db, [(t.record_id, str(t.model_version)) for t in latest.values()])
    standing = standing_decisions(db)
    decisions: list[NewDecision] = []
    unchanged = 0
    for record_id, task in latest.items():
        version = str(task.model_version)
        if (record_id, version) not in known.results:
            skipped.append(
                f"{task.name}: record {shown(record_id)} has no result of model {version}"
            )
            continue
        for key in models[version].keys:
            if (record_id, version, key) in known.labels:
                decision = Decision.ACCEPT if key in task.chosen else Decision.REJECT
            elif key in task.chosen:
                decision = Decision.ADD
            elif standing.get((record_id, key)) in Decision.POSITIVE:
                decision = Decision.REJECT  # an earlier add (or accept) the annotation undoes
            else:
                continue
            if standing.get((record_id, key)) == decision:
                unchanged += 1
                continue
            decisions.append(NewDecision(record_id, key, version, decision, task.reviewer))
    record_decisions(db, decisions)
    return ImportReport(len(document), len(decisions), unchanged, skipped)
