"""The model directory (`model.json` + `weights.safetensors`) and batched multilabel inference.

A model's identity is `name@` + the first 12 hex digits of its weights'
SHA-256, checked on every load, so a result row always names the exact
weights that produced it. Weights are read with safetensors only: a checkpoint
is never unpickled.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from enrichment.errors import ModelError
from enrichment.images import Preprocessing
from enrichment.store import LabelScore

MODEL_JSON = "model.json"
WEIGHTS_FILE = "weights.safetensors"
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")
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

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(self.input_size, self.mean, self.std)


def classification_architectures() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def build_network(architecture: str, num_labels: int) -> torch.nn.Module:
    """A torchvision classification network with one output per label, untrained."""
    if architecture not in classification_architectures():
        raise ModelError(
            f"unknown architecture {architecture!r}: expected a torchvision classification "
            f"model such as resnet50, mobilenet_v3_large or efficientnet_b0"
        )
    return torchvision.models.get_model(architecture, weights=None, num_classes=num_labels)


def weights_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_version(name: str, sha256: str) -> str:
    return f"{name}@{sha256[:12]}"


def save_model_dir(directory: Path, spec: ModelSpec, network: torch.nn.Module) -> str:
    """Write weights and model.json; returns the model version."""
    directory.mkdir(parents=True, exist_ok=True)
    weights_path = directory / WEIGHTS_FILE
    state = {
        name: tensor.detach().cpu().contiguous() for name, tensor in network.state_dict().items()
    }
    save_file(state, str(weights_path))
    sha256 = weights_sha256(weights_path)
    document = {
        "format": 1,
        "name": spec.name,
        "version": model_version(spec.name, sha256),
        "weights_sha256": sha256,
        "architecture": spec.architecture,
        "input_size": spec.input_size,
        "normalization": {"mean": list(spec.mean), "std": list(spec.std)},
        "labels": [label.as_json() for label in spec.labels],
        "metrics": spec.metrics,
    }
    (directory / MODEL_JSON).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return document["version"]


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
    return spec, model_version(spec.name, sha256), sha256


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class Classifier:
    """A loaded model: sigmoid scores for batches of inputs, and per-class thresholds."""

    def __init__(
        self, spec: ModelSpec, version: str, network: torch.nn.Module, device: torch.device
    ) -> None:
        self.spec = spec
        self.version = version
        self.network = network
        self.device = device
        self.thresholds = np.asarray([label.threshold for label in spec.labels], dtype=np.float32)

    @classmethod
    def load(cls, directory: Path, device: torch.device | None = None) -> Classifier:
        """Load and verify a model directory: files present, hash matching, shapes matching."""
        spec, version, expected_sha256 = read_model_json(directory)
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
        try:
            state = load_file(str(weights_path))
        except (SafetensorError, OSError) as error:
            raise ModelError(f"{weights_path} is not a safetensors file: {error}") from None
        network = build_network(spec.architecture, len(spec.labels))
        _check_shapes(network, state, len(spec.labels), weights_path)
        network.load_state_dict(state)
        device = device or pick_device()
        network.eval().to(device)
        if device.type == "cuda":
            network = network.to(memory_format=torch.channels_last)
        return cls(spec, version, network, device)

    def scores(self, inputs: np.ndarray) -> np.ndarray:
        """Sigmoid scores, shape (batch, labels), for normalised (batch, 3, H, W) inputs."""
        with torch.inference_mode():
            tensor = torch.from_numpy(inputs).to(self.device, non_blocking=True)
            if self.device.type == "cuda":
                tensor = tensor.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logits = self.network(tensor)
            else:
                logits = self.network(tensor)
            return torch.sigmoid(logits.float()).cpu().numpy()

    def labels_above_threshold(self, scores: np.ndarray) -> list[LabelScore]:
        """The labels of one score vector at or above their own class threshold."""
        return [
            LabelScore(label.key, label.concept, float(score))
            for label, score, threshold in zip(
                self.spec.labels, scores, self.thresholds, strict=True
            )
            if score >= threshold
        ]


def _check_shapes(
    network: torch.nn.Module, state: dict[str, torch.Tensor], num_labels: int, path: Path
) -> None:
    expected = {name: tuple(tensor.shape) for name, tensor in network.state_dict().items()}
    actual = {name: tuple(tensor.shape) for name, tensor in state.items()}
    if expected.keys() != actual.keys():
        missing = sorted(expected.keys() - actual.keys())[:3]
        raise ModelError(
            f"{path} does not hold the weights of this architecture (missing e.g. {missing})"
        )
    wrong = [name for name in expected if expected[name] != actual[name]]
    if wrong:
        head = wrong[-1]
        outputs = actual[head][0] if actual[head] else "?"
        raise ModelError(
            f"{path}: model.json lists {num_labels} labels but the weights' head has "
            f"{outputs} outputs ({head} is {actual[head]}, expected {expected[head]})"
        )
