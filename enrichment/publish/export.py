"""Exporting labels as Web Annotations: which labels, and the export as a whole.

By default every record contributes the labels of its latest classification
(the newest result that is not an error, so a failed fetch by a newer model
does not withdraw what an older one found); `model_version` or `run_id` pick a
model version or a run instead (`store.current`). Labels come as stored, or,
with new thresholds, are decided again from the stored score vectors by the
classifier's own rule (`thresholds.decide`) without running the model. The
reads are the store's (`store.selection`), streamed: memory does not grow with
the size of the export.

`reviewed` brings curators' decisions in (the last decision per record and
label): `any` ignores them, `not-rejected` leaves out labels a curator
rejected, `accepted` keeps only labels a curator accepted. Labels a curator
added below threshold are not exported: they are not the model's, and
`enrich review export` hands them to training instead.

A thresholds file is a JSON object mapping class keys to thresholds in [0, 1],
`{"photograph": 0.7, "map": 0.35}`; a class it does not name keeps its model's
own threshold.

`export` ties the stages together: rows -> annotations of a profile
(`annotations`), each checked -> a layout on disk or stdout (`pages`).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import numpy as np

from enrichment.errors import InvalidValue
from enrichment.files import output_target
from enrichment.publish.annotations import ANNOTATION_ID_NAMESPACE, PROFILES, CheckedAnnotations
from enrichment.publish.pages import AtomicFiles, Layout, write_document, write_split
from enrichment.store.database import Database
from enrichment.store.models import ModelClasses
from enrichment.store.relabel import finish_relabelling
from enrichment.store.retire import retired_version_message, retired_versions
from enrichment.store.reviews import REVIEWED
from enrichment.store.selection import (
    LabelRow,
    ScoredResult,
    Selection,
    classified_scores,
    known_models,
    last_decisions,
    review_keeps,
    run_exists,
    run_versions,
    stored_labels,
    unknown_datasets,
)
from enrichment.thresholds import decide


class ExportError(InvalidValue):
    """An export's options name something that does not exist, or cannot work together.

    `field` names the option as `ExportFilter`/`Output` (and the CLI's parameters) do.
    """


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

    def selection(self) -> Selection:
        """The store's selection: everything but the thresholds, which only this package applies."""
        return Selection(
            tuple(self.datasets),
            self.run_id,
            self.model_version,
            self.since,
            self.min_confidence,
            tuple(self.labels),
            self.reviewed,
        )


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
    output = check_output(output)
    refuse_the_database(db, output.path)
    check_filter(db, filters)
    finish_relabelling(db)  # no label of a recalibrated version by its old thresholds
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


def refuse_the_database(db: Database, path: Path | None) -> None:
    """Refuse `--out` naming the SQLite database being read (or its journal): the export
    would replace it with its own annotations, and every result with it."""
    database = db.sqlite_file
    if path is None or database is None:
        return
    target = output_target(path)[0].resolve()
    files = [Path(f"{database}{suffix}").resolve() for suffix in ("", "-wal", "-shm", "-journal")]
    if target in files:
        raise ExportError("out", f"{path} is the database being exported from: choose another file")


def check_output(output: Output) -> Output:
    """Refuse output options that cannot work together; the base URL made to end in `/`.

    Checked before anything is read or written, so a refused export leaves no file.
    """
    if output.split is not None and output.path is None:
        raise ExportError("split", "writes one file per page: it needs an output file")
    if output.base_url is None:
        return output
    if output.path is None:
        raise ExportError("base_url", "names the published files: it needs an output file")
    if (output.profile, output.format) != ("w3c", "jsonld"):
        raise ExportError(
            "base_url",
            "names the collection and its pages, which only the W3C profile's JSON-LD has "
            f"(not --profile {output.profile} --format {output.format})",
        )
    return replace(output, base_url=published_base(output.base_url))


def published_base(base_url: str) -> str:
    """The URL the exported files will be published under, ending in `/`, or refused.

    The collection and page ids are this URL with a file name appended, and a
    consumer resolves them: only an absolute http(s) URL with a host makes
    them usable ids. `notaurl`, `javascript:...` or `ftp://...` would be
    written into every id without a word, a query or fragment would swallow
    the file name, and a character that IRIs forbid breaks the id.
    """
    example = "(e.g. https://example.org/annotations/)"
    try:
        parts = urlsplit(base_url)
        host, _port = parts.hostname, parts.port  # reading the port refuses `host:99999`
    except ValueError as error:
        raise ExportError("base_url", f"{base_url!r} is not a URL: {error}") from None
    if parts.scheme.lower() not in ("http", "https") or not host:
        raise ExportError(
            "base_url", f"{base_url!r} is not an absolute http(s) URL with a host {example}"
        )
    if parts.query or parts.fragment or base_url.endswith(("?", "#")):
        raise ExportError(
            "base_url",
            f"{base_url!r} has a query or fragment: the file names appended to it would "
            f"end up inside it {example}",
        )
    if _IRI_FORBIDDEN.search(base_url):
        raise ExportError(
            "base_url",
            f"{base_url!r} holds a space or a character that IRIs forbid (encode it as %XX)",
        )
    return base_url if base_url.endswith("/") else base_url + "/"


# What may not appear in an IRI (RFC 3987): controls, space, and <>"{}|\^`.
_IRI_FORBIDDEN = re.compile(r'[\x00-\x20\x7f-\x9f<>"{}|\\^`]')


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
    """Parse a thresholds file: a JSON object of class key -> threshold in [0, 1]."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ExportError(
            "thresholds", f"cannot read thresholds file {path}: {error.strerror}"
        ) from None
    except UnicodeDecodeError as error:
        raise ExportError(
            "thresholds",
            f"thresholds file {path} is not UTF-8 text (byte 0x{error.object[error.start]:02x} "
            f"at offset {error.start}): save it as UTF-8",
        ) from None
    except json.JSONDecodeError as error:
        raise ExportError(
            "thresholds", f"thresholds file {path} is not valid JSON: {error}"
        ) from None
    if not isinstance(document, dict) or not document:
        raise ExportError(
            "thresholds",
            f'thresholds file {path} must be a JSON object such as {{"photograph": 0.7}}',
        )
    thresholds = {}
    for key, value in document.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise ExportError(
                "thresholds", f"thresholds file {path}: {key!r} must be a number in [0, 1]"
            )
        thresholds[key] = float(value)
    return thresholds


def check_filter(db: Database, filters: ExportFilter) -> None:
    """Refuse filters that name a dataset, run, model version or class the database does not know.

    Each would otherwise select nothing and write an empty file (or, for a
    publish, withdraw nothing) without a word.
    """
    if filters.reviewed not in REVIEWED:
        raise ExportError(
            "reviewed", f"reviewed must be one of {', '.join(REVIEWED)}, not {filters.reviewed!r}"
        )
    missing = unknown_datasets(db, filters.datasets)
    if missing:
        raise ExportError("datasets", f"no record belongs to dataset {', '.join(missing)}")
    if filters.run_id is not None and not run_exists(db, filters.run_id):
        raise ExportError("run_id", f"run {filters.run_id} does not exist")
    models = known_models(db)
    if filters.model_version is not None and filters.model_version not in models:
        known = ", ".join(sorted(models)) or "none yet"
        raise ExportError(
            "model_version", f"unknown model version {filters.model_version} (known: {known})"
        )
    retired = retired_versions(db)
    if filters.model_version in retired:
        raise ExportError(
            "model_version",
            retired_version_message(filters.model_version, retired[filters.model_version]),
        )
    if filters.run_id is not None:
        versions = run_versions(db, filters.run_id)
        if versions and all(version in retired for version in versions):
            # Its results went with its version: an empty file would say nothing of why.
            raise ExportError(
                "run_id",
                f"run {filters.run_id}'s "
                + retired_version_message(versions[0], retired[versions[0]]),
            )
    keys = {key for model in models.values() for key in model.keys}
    for field, named in (("labels", filters.labels), ("thresholds", filters.thresholds or {})):
        unknown = sorted(set(named) - keys)
        if unknown:
            raise ExportError(
                field,
                f"names classes no model has: {', '.join(unknown)} "
                f"(known: {', '.join(sorted(keys)) or 'none yet'})",
            )


def iter_label_rows(db: Database, filters: ExportFilter) -> Iterator[LabelRow]:
    """The selected labels, ordered by record, model version and label key."""
    if filters.thresholds is None:
        yield from stored_labels(db, filters.selection())
        return
    models = {
        version: _Rethreshold.of(classes, filters.thresholds)
        for version, classes in known_models(db).items()
    }
    decisions = last_decisions(db) if filters.reviewed != "any" else {}
    for result in classified_scores(db, filters.selection()):
        yield from models[result.model_version].labels(result, filters, decisions)


@dataclass(frozen=True)
class _Rethreshold:
    """A model version's classes in score order, with the thresholds an export applies."""

    classes: ModelClasses
    thresholds: np.ndarray

    @classmethod
    def of(cls, classes: ModelClasses, overrides: Mapping[str, float]) -> _Rethreshold:
        applied = [
            overrides.get(key, own)
            for key, own in zip(classes.keys, classes.thresholds, strict=True)
        ]
        return cls(classes, np.asarray(applied, dtype=np.float64))

    def labels(
        self,
        result: ScoredResult,
        filters: ExportFilter,
        decisions: Mapping[tuple[str, str], str],
    ) -> Iterator[LabelRow]:
        """The labels one stored score vector yields under these thresholds, by key."""
        if not result.scores:
            return
        scores = np.asarray(result.scores, dtype=np.float64)[np.newaxis, :]
        chosen = decide(scores, self.thresholds, self.classes.top_k_fallback)[0]
        keys, concepts = self.classes.keys, self.classes.concepts
        kept = sorted(
            (keys[i], concepts[i], float(result.scores[i])) for i in np.flatnonzero(chosen)
        )
        for key, concept, confidence in kept:
            if filters.labels and key not in filters.labels:
                continue
            if filters.min_confidence is not None and confidence < filters.min_confidence:
                continue
            if not review_keeps(decisions.get((result.record_id, key)), filters.reviewed):
                continue
            yield LabelRow(
                result.record_id,
                result.item_uri,
                result.image_url,
                result.model_version,
                key,
                concept,
                confidence,
                result.classified_at,
            )
