"""The model directory's description: `model.json`, the weights' hash and the model version.

Everything a process needs to know about a model without running it (the
scheduler, exports, reports) lives here, with no torch import, so those
processes start fast and stay small. A model's identity is `name@` + the first
12 hex digits of its weights' SHA-256, checked on every load, so a result row
always names the exact weights that produced it.

Thresholds are not part of that identity: calibration rewrites them in
model.json (counting up `thresholds_version`) without touching the weights,
and stored score vectors stay valid because they are kept whole.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from enrichment.errors import ModelError
from enrichment.files import write_atomically
from enrichment.media.decode import Preprocessing

MODEL_JSON = "model.json"
WEIGHTS_FILE = "weights.safetensors"
SCHEMA = Path(__file__).parent.parent / "data" / "model.schema.json"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ClassSpec:
    """One class (one output) of the model: its key, human label, concept URI and threshold.

    A *class* is what the model can say; a *label* is a class given to a record.
    """

    key: str
    label: str
    concept: str
    threshold: float = 0.5

    def as_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "label": self.label,
            "concept": self.concept,
            "threshold": float(self.threshold),  # a plain float, whatever computed it
        }


@dataclass(frozen=True)
class ModelSpec:
    """What `model.json` holds, less the weights' hash."""

    name: str
    architecture: str
    input_size: int
    classes: tuple[ClassSpec, ...]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    metrics: dict[str, Any] = field(default_factory=dict)
    # When no class reaches its threshold, label the k best-scoring ones anyway (0: never).
    top_k_fallback: int = 0
    thresholds_version: int = 1
    calibration: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(self.input_size, self.mean, self.std)

    @property
    def keys(self) -> list[str]:
        return [item.key for item in self.classes]

    @property
    def thresholds(self) -> list[float]:
        """Each class's threshold, in score order (plain floats, as model.json holds them)."""
        return [item.threshold for item in self.classes]


def weights_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")


def checked_weights(directory: Path, expected_sha256: str) -> Path:
    """The weights file, present and hashing as model.json records, or a ModelError saying
    what is wrong. Without torch: `enrich worker` checks it before it takes any batch (a
    worker whose weights did not load took each batch message and dropped it)."""
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        hint = (
            f" (found {', '.join(pickles)}: pickled checkpoints are never loaded)"
            if pickles
            else ""
        )
        raise ModelError(f"{directory} has no {WEIGHTS_FILE}{hint}")
    actual = weights_sha256(weights_path)
    if actual != expected_sha256:
        raise ModelError(
            f"{weights_path} has SHA-256 {actual[:12]}…, but model.json records "
            f"{expected_sha256[:12]}…: the weights do not belong to this model.json"
        )
    return weights_path


def model_version(name: str, sha256: str) -> str:
    return f"{name}@{sha256[:12]}"


def write_model_json(directory: Path, spec: ModelSpec, sha256: str) -> str:
    """Write model.json for weights with this hash; returns the model version.

    Written to a temporary file and renamed, so a worker loading the model while
    thresholds are recalibrated reads the old or the new file, never half of one.
    Checked as `read_model_json` checks it first, so nothing writes a file that
    would then be refused.
    """
    document = {
        "format": 1,
        "name": spec.name,
        "version": model_version(spec.name, sha256),
        "weights_sha256": sha256,
        "architecture": spec.architecture,
        "input_size": spec.input_size,
        "normalization": {"mean": list(spec.mean), "std": list(spec.std)},
        # The model's classes under the key "labels", as model.json has always named them:
        # every model directory written before the rename still loads.
        "labels": [item.as_json() for item in spec.classes],
        "top_k_fallback": spec.top_k_fallback,
        "thresholds_version": spec.thresholds_version,
        "calibration": spec.calibration,
        "metrics": spec.metrics,
        "training": spec.training,
    }
    check_model_document(json.loads(json.dumps(document)), directory / MODEL_JSON)
    write_atomically(directory / MODEL_JSON, json.dumps(document, indent=2) + "\n")
    return document["version"]


def update_model_json(directory: Path, spec: ModelSpec) -> str:
    """Rewrite model.json (thresholds, calibration) for the weights already in the directory.

    The weights are hashed again first: if they were replaced since model.json
    was read, the new thresholds would be attached to weights they were not
    chosen for.
    """
    _, _, recorded = read_model_json(directory)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file() or weights_sha256(weights_path) != recorded:
        raise ModelError(f"{weights_path} no longer matches model.json: not updating it")
    return write_model_json(directory, spec, recorded)


def read_model_json(directory: Path) -> tuple[ModelSpec, str, str]:
    """Parse and check model.json; returns the spec, the recorded version and hash.

    The whole file is checked before anything uses it (the schema in
    `enrichment/data/model.schema.json`, then `check_model_document`): a wrong
    value is refused with one line naming its field, instead of an OOM-killed
    worker (a huge `input_size`), NaN scores (a zero `std`) or labels silently
    changed (a threshold of 1.5).
    """
    if not directory.is_dir():
        raise ModelError(f"model directory {directory} does not exist")
    path = directory / MODEL_JSON
    if not path.is_file():
        raise ModelError(f"{directory} has no {MODEL_JSON}: not a model directory")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ModelError(f"cannot read {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ModelError(f"{path} is not UTF-8 text") from None
    except (json.JSONDecodeError, RecursionError) as error:
        raise ModelError(f"{path} is not valid JSON: {error}") from None
    check_model_document(document, path)
    classes = tuple(
        ClassSpec(
            key=item["key"],
            label=item.get("label", item["key"]),
            concept=item["concept"],
            threshold=float(item.get("threshold", 0.5)),
        )
        for item in document["labels"]  # the classes' on-disk key (see write_model_json)
    )
    normalization = document.get("normalization", {})
    spec = ModelSpec(
        name=document["name"],
        architecture=document["architecture"],
        input_size=int(document["input_size"]),
        classes=classes,
        mean=tuple(float(value) for value in normalization.get("mean", IMAGENET_MEAN)),
        std=tuple(float(value) for value in normalization.get("std", IMAGENET_STD)),
        metrics=dict(document.get("metrics", {})),
        top_k_fallback=int(document.get("top_k_fallback", 0)),
        thresholds_version=int(document.get("thresholds_version", 1)),
        calibration=dict(document.get("calibration", {})),
        training=dict(document.get("training", {})),
    )
    sha256 = document["weights_sha256"]
    return spec, model_version(spec.name, sha256), sha256


def check_model_document(document: Any, path: Path) -> None:
    """Refuse a model.json that breaks the schema or a rule a schema cannot state."""
    # Imported here: jsonschema costs 0.1 s, and exports and reports import this module.
    from jsonschema.exceptions import best_match

    if not isinstance(document, dict):
        raise ModelError(f"{path} must hold a JSON object, not {type(document).__name__}")
    error = best_match(_validator().iter_errors(document))
    if error is not None:
        where = _field_name(error.absolute_path)
        hint = error.schema.get("description") if error.absolute_path else None
        if error.validator in ("required", "additionalProperties"):
            hint = None
        message = error.message
        if error.validator == "const":
            message = f"is {json.dumps(error.instance)}, {error.message}"
        raise ModelError(f"{path}: {where}: {message}" + (f" ({hint})" if hint else ""))
    numbers: list[tuple[str, Any]] = [
        (f"labels[{index}].threshold", item.get("threshold", 0.5))
        for index, item in enumerate(document["labels"])
    ]
    for name, values in document.get("normalization", {}).items():
        numbers += [(f"normalization.{name}[{index}]", value) for index, value in enumerate(values)]
    for where, value in numbers:
        if not math.isfinite(value):
            raise ModelError(f"{path}: {where}: {value} is not a finite number")
    keys = [item["key"] for item in document["labels"]]
    for index, key in enumerate(keys):
        if key in keys[:index]:
            raise ModelError(f"{path}: labels[{index}].key: {key!r} is listed twice")
    top_k = document.get("top_k_fallback", 0)
    if top_k > len(keys):
        raise ModelError(
            f"{path}: top_k_fallback must be between 0 (off) and the number of labels "
            f"({len(keys)}), not {top_k}"
        )


@cache
def _validator() -> Any:
    from jsonschema import Draft202012Validator

    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def _field_name(parts: Iterable[str | int]) -> str:
    """`labels[2].threshold` for the path jsonschema gives as ('labels', 2, 'threshold')."""
    name = ""
    for part in parts:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or "the document"
