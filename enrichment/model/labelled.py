"""Labelled image sets for training, calibration and evaluation, and reading their images.

A labelled set is a CSV or JSON Lines file with one image per row: where the
image is (a path relative to the file, or an http/https URL), its label keys,
and optionally the object or record the image shows, so that training keeps
all images of one object on the same side of its train/validation split.
Column names are matched case-insensitively and include the pilot's own
(`URL`, `category`, `ID`), so its evaluation list can be used as it is.

Images are decoded exactly as inference decodes them; URLs go through the
SSRF-safe `Fetcher`, because a labelled set is often someone else's metadata.
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from enrichment.errors import EnrichError, InputFileError
from enrichment.media.decode import ImageError, Preprocessing, decode
from enrichment.media.fetch import Fetcher
from enrichment.sources.tabular import check_regular_file, read_rows, table_format

DEFAULT_VOCABULARY = Path(__file__).parent.parent / "data" / "vocabulary.json"
IMAGE_FIELDS = ("image", "image_url", "image_path", "url", "path", "file")
LABEL_FIELDS = ("labels", "label", "category", "categories")
GROUP_FIELDS = ("object_id", "record_id", "record", "id", "group")
LABEL_SEPARATOR = re.compile(r"[\s,;|]+")


@dataclass(frozen=True)
class LabelledImage:
    """One row: the image as written in the file, its label keys and its object."""

    image: str
    labels: frozenset[str]
    group: str
    line: int


@dataclass(frozen=True)
class LabelledSet:
    path: Path
    images: tuple[LabelledImage, ...]
    group_field: str | None

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def label_keys(self) -> set[str]:
        return {key for image in self.images for key in image.labels}

    def targets(self, keys: Sequence[str]) -> np.ndarray:
        """A (images, keys) 0/1 float32 matrix in the order of `keys`.

        Labels outside `keys` are left out: the model has no output for them.
        """
        column = {key: index for index, key in enumerate(keys)}
        matrix = np.zeros((len(self.images), len(keys)), dtype=np.float32)
        for row, image in enumerate(self.images):
            for key in image.labels & column.keys():
                matrix[row, column[key]] = 1.0
        return matrix

    def select(self, indices: Sequence[int]) -> LabelledSet:
        return LabelledSet(self.path, tuple(self.images[i] for i in indices), self.group_field)


@dataclass(frozen=True)
class Skipped:
    """An image that could not be used, and why (the reasons inference would give)."""

    line: int
    image: str
    reason: str
    message: str

    def as_json(self) -> dict[str, Any]:
        return {"line": self.line, "image": self.image, "reason": self.reason}


@dataclass(frozen=True)
class Loaded:
    """One image of a set, read and decoded, or the error that stopped it."""

    index: int
    data: bytes | None
    inputs: np.ndarray | None
    error: ImageError | None


def read_vocabulary(path: Path = DEFAULT_VOCABULARY) -> dict[str, str]:
    """A `{key: concept URI}` JSON object, in file order (which becomes the model's order).

    Harvest and train both read it here, so a key that a labelled set could not hold is
    refused before a harvest writes it: labelled sets separate their label keys with
    `LABEL_SEPARATOR`, and a key "old map" would come back as the two labels old and map.
    """
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise EnrichError(f"cannot read vocabulary {path}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise EnrichError(
            f"vocabulary {path} is not UTF-8 text: byte 0x{error.object[error.start]:02x} "
            f"at offset {error.start}"
        ) from None
    except json.JSONDecodeError as error:
        raise EnrichError(f"vocabulary {path} is not valid JSON: {error}") from None
    if not isinstance(document, dict) or not document:
        raise EnrichError(f"vocabulary {path} must be a non-empty {{key: concept URI}} object")
    for key, concept in document.items():
        if not key or LABEL_SEPARATOR.search(key):
            raise EnrichError(
                f"vocabulary {path}: key {key!r} must be a non-empty word without whitespace, "
                "',', ';' or '|' (labelled sets separate label keys with them)"
            )
        if not isinstance(concept, str) or "://" not in concept:
            raise EnrichError(f"vocabulary {path}: {key!r} must map to a concept URI")
    return dict(document)


def read_labelled(path: Path, known: Mapping[str, str]) -> LabelledSet:
    """Read a labelled set; every label key must be one of `known` (a typo is an error)."""
    fmt = table_format(path)
    if fmt is None:
        check_regular_file(path, "labelled set")
        raise InputFileError(
            f"{path}: a labelled set is a .csv or .jsonl file, not {path.suffix.lower()!r}"
        )
    images: list[LabelledImage] = []
    group_field: str | None = None
    for row in read_rows(path, fmt, "labelled set"):
        line = row.line
        fields = {name.strip().lower(): value for name, value in row.fields.items() if name}
        image = _first(fields, IMAGE_FIELDS)
        if not image:
            raise EnrichError(
                f"{path}:{line}: no image (a column named {' or '.join(IMAGE_FIELDS)})"
            )
        label_field = _field(fields, LABEL_FIELDS)
        if label_field is None:
            raise EnrichError(
                f"{path}:{line}: no labels (a column named {' or '.join(LABEL_FIELDS)})"
            )
        labels = _labels(fields[label_field] or "", path, line)
        unknown = sorted(labels - known.keys())
        if unknown:
            raise EnrichError(
                f"{path}:{line}: unknown label {', '.join(map(repr, unknown))} "
                f"(known: {', '.join(known)})"
            )
        group_field = group_field or _field(fields, GROUP_FIELDS)
        group = _first(fields, GROUP_FIELDS) or f"line {line}"
        images.append(LabelledImage(str(image).strip(), frozenset(labels), str(group), line))
    if not images:
        raise EnrichError(f"labelled set {path} has no rows")
    return LabelledSet(path.resolve(), tuple(images), group_field)


def _field(fields: Mapping[str, Any], names: Sequence[str]) -> str | None:
    return next((name for name in names if name in fields), None)


def _first(fields: Mapping[str, Any], names: Sequence[str]) -> Any:
    return next((fields[name] for name in names if fields.get(name) not in (None, "")), None)


def _labels(value: Any, path: Path, line: int) -> set[str]:
    """Label keys from a list or from one string separated by spaces, commas, ; or |."""
    if isinstance(value, list):
        items = value
    elif isinstance(value, str):
        items = LABEL_SEPARATOR.split(value)
    else:
        raise EnrichError(f"{path}:{line}: labels must be a list or a string")
    return {str(item).strip() for item in items if str(item).strip()}


def is_url(image: str) -> bool:
    return "://" in image


def read_image(image: str, base_dir: Path, fetcher: Fetcher) -> bytes:
    """The bytes of a local file (relative to the set's file) or of a URL (via the fetcher)."""
    if is_url(image):
        fetched = fetcher.fetch(image)
        if fetched.content is None:
            raise ImageError(fetched.error_reason or "fetch_error", fetched.error_message or "")
        return fetched.content
    path = base_dir / image
    try:
        return path.read_bytes()
    except OSError as error:
        raise ImageError("missing_file", f"cannot read {path}: {error.strerror}") from None


def load_images(
    labelled: LabelledSet, preprocessing: Preprocessing, fetcher: Fetcher, ahead: int = 64
) -> Iterator[Loaded]:
    """Each image read and decoded as inference would, in order.

    Reading and decoding run on the fetcher's threads, at most `ahead` images in
    front of the consumer, so a large set never sits decoded in memory at once.
    """

    def load(index: int) -> Loaded:
        try:
            data = read_image(labelled.images[index].image, labelled.base_dir, fetcher)
        except ImageError as error:
            return Loaded(index, None, None, error)
        try:
            return Loaded(index, data, decode(data, preprocessing), None)
        except ImageError as error:
            return Loaded(index, data, None, error)

    pending: deque[Future[Loaded]] = deque()
    for index in range(len(labelled.images)):
        pending.append(fetcher.submit(load, index))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def skipped(labelled: LabelledSet, loaded: Loaded) -> Skipped:
    assert loaded.error is not None
    image = labelled.images[loaded.index]
    return Skipped(image.line, image.image, loaded.error.reason, loaded.error.message)
