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
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from enrichment.errors import ModelError
from enrichment.media.decode import Preprocessing

MODEL_JSON = "model.json"
WEIGHTS_FILE = "weights.safetensors"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class LabelSpec:
    """One output of the model: its key, human label, concept URI and threshold."""

    key: str
    label: str
    concept: str
    threshold: float = 0.5

    def as_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "label": self.label,
            "concept": self.concept,
            "threshold": self.threshold,
        }


@dataclass(frozen=True)
class ModelSpec:
    """What `model.json` holds, less the weights' hash."""

    name: str
    architecture: str
    input_size: int
    labels: tuple[LabelSpec, ...]
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
        return [label.key for label in self.labels]


def decide(scores: np.ndarray, thresholds: np.ndarray, top_k_fallback: int = 0) -> np.ndarray:
    """Which labels each row of a (batch, labels) score matrix gets, as booleans.

    The one rule that the classifier and every re-thresholding (exports) apply,
    so stored scores always give the labels a worker would. A label is given at
    or above its own class threshold. With `top_k_fallback` = k, a row where no
    class reaches its threshold gets its k best-scoring classes instead of
    none; ties go to the earlier label.
    """
    chosen = scores >= thresholds
    if top_k_fallback:
        empty = ~chosen.any(axis=1)
        best = np.argsort(-scores[empty], axis=1, kind="stable")[:, :top_k_fallback]
        fallback = np.zeros_like(chosen[empty])
        np.put_along_axis(fallback, best, True, axis=1)
        chosen[empty] = fallback
    return chosen


@dataclass(frozen=True)
class LabelScore:
    """One label a record gets from a model, with its confidence."""

    key: str
    concept: str
    confidence: float


def weights_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_version(name: str, sha256: str) -> str:
    return f"{name}@{sha256[:12]}"


def write_model_json(directory: Path, spec: ModelSpec, sha256: str) -> str:
    """Write model.json for weights with this hash; returns the model version.

    Written to a temporary file and renamed, so a worker loading the model while
    thresholds are recalibrated reads the old or the new file, never half of one.
    """
    document = {
        "format": 1,
        "name": spec.name,
        "version": model_version(spec.name, sha256),
        "weights_sha256": sha256,
        "architecture": spec.architecture,
        "input_size": spec.input_size,
        "normalization": {"mean": list(spec.mean), "std": list(spec.std)},
        "labels": [label.as_json() for label in spec.labels],
        "top_k_fallback": spec.top_k_fallback,
        "thresholds_version": spec.thresholds_version,
        "calibration": spec.calibration,
        "metrics": spec.metrics,
        "training": spec.training,
    }
    temporary = directory / f".{MODEL_JSON}.tmp"
    temporary.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, directory / MODEL_JSON)
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
    """Parse and check model.json; returns the spec, the recorded version and hash."""
    if not directory.is_dir():
        raise ModelError(f"model directory {directory} does not exist")
    path = directory / MODEL_JSON
    if not path.is_file():
        raise ModelError(f"{directory} has no {MODEL_JSON}: not a model directory")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        labels = tuple(
            LabelSpec(
                key=str(item["key"]),
                label=str(item.get("label", item["key"])),
                concept=str(item["concept"]),
                threshold=float(item.get("threshold", 0.5)),
            )
            for item in document["labels"]
        )
        normalization = document.get("normalization", {})
        spec = ModelSpec(
            name=str(document["name"]),
            architecture=str(document["architecture"]),
            input_size=int(document["input_size"]),
            labels=labels,
            mean=tuple(normalization.get("mean", IMAGENET_MEAN)),
            std=tuple(normalization.get("std", IMAGENET_STD)),
            metrics=dict(document.get("metrics", {})),
            top_k_fallback=int(document.get("top_k_fallback", 0)),
            thresholds_version=int(document.get("thresholds_version", 1)),
            calibration=dict(document.get("calibration", {})),
            training=dict(document.get("training", {})),
        )
        sha256 = str(document["weights_sha256"])
    except json.JSONDecodeError as error:
        raise ModelError(f"{path} is not valid JSON: {error}") from None
    except (KeyError, TypeError, ValueError) as error:
        raise ModelError(f"{path} is missing or has an invalid field: {error}") from None
    if not labels:
        raise ModelError(f"{path} lists no labels")
    if len({label.key for label in labels}) != len(labels):
        raise ModelError(f"{path} lists a label key twice")
    if not 0 <= spec.top_k_fallback <= len(labels):
        raise ModelError(
            f"{path}: top_k_fallback must be between 0 (off) and the number of labels "
            f"({len(labels)}), not {spec.top_k_fallback}"
        )
    return spec, model_version(spec.name, sha256), sha256
