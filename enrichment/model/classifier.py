"""Batched multilabel inference with a verified model directory, and building networks.

Weights are read with safetensors only: a checkpoint is never unpickled. Only
the processes that classify (workers, in-process runs, the model commands)
import this module, and with it torch.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torchvision
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from enrichment.errors import ModelError
from enrichment.files import make_directory
from enrichment.media.cpus import usable_cpus
from enrichment.media.decode import DEFAULT_MAX_PIXELS
from enrichment.model.batch_decode import BatchDecoder
from enrichment.model.spec import (
    WEIGHTS_FILE,
    ModelSpec,
    checked_weights,
    read_model_json,
    weights_sha256,
    write_model_json,
)
from enrichment.store.writes import LabelScore
from enrichment.thresholds import DecisionRule, decide


def classification_architectures() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def build_network(architecture: str, num_classes: int) -> torch.nn.Module:
    """A torchvision classification network with one output per class, untrained."""
    if architecture not in classification_architectures():
        raise ModelError(
            f"unknown architecture {architecture!r}: expected a torchvision classification "
            f"model such as resnet50, mobilenet_v3_large or efficientnet_b0"
        )
    return torchvision.models.get_model(architecture, weights=None, num_classes=num_classes)


def head_parameter_names(architecture: str) -> set[str]:
    """The state-dict entries whose shape depends on the number of classes: the head.

    Found by comparing the architecture built for two class counts (on the meta
    device where it can be, so nothing is allocated), which works for every
    torchvision layout (`fc`, `classifier[-1]`, `heads.head`, auxiliary heads)
    without a table to maintain.
    """
    one, two = _state_shapes(architecture, 1), _state_shapes(architecture, 2)
    return {name for name, shape in one.items() if shape != two[name]}


def _state_shapes(architecture: str, num_classes: int) -> dict[str, torch.Size]:
    try:
        with torch.device("meta"):
            network = build_network(architecture, num_classes)
    except NotImplementedError:  # RegNet's initialisation copies data, which meta cannot
        network = build_network(architecture, num_classes)
    return {name: tensor.shape for name, tensor in network.state_dict().items()}


def load_weights(network: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load plain tensors into a network built by this torchvision.

    safetensors keeps tensors only, not the per-module version metadata a
    `state_dict()` carries; some families (mnasnet) refuse a state without it.
    The network's own metadata is the right one: it was built by the same code.
    """
    weights = OrderedDict(state)
    weights._metadata = getattr(network.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
    network.load_state_dict(weights)


def save_model_dir(directory: Path, spec: ModelSpec, network: torch.nn.Module) -> str:
    """Write weights and model.json; returns the model version."""
    make_directory(directory)
    weights_path = directory / WEIGHTS_FILE
    state = {
        name: tensor.detach().cpu().contiguous() for name, tensor in network.state_dict().items()
    }
    save_file(state, str(weights_path))
    return write_model_json(directory, spec, weights_sha256(weights_path))


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def autocast_dtype() -> torch.dtype:
    """bf16 where the GPU has it (no overflow risk), fp16 on older GPUs."""
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def set_cpu_threads() -> None:
    """Size torch's CPU thread pool to the usable CPUs, unless OMP_NUM_THREADS says otherwise."""
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(usable_cpus())


class Classifier:
    """A loaded model: sigmoid scores for batches of inputs, and per-class thresholds."""

    def __init__(
        self, spec: ModelSpec, version: str, network: torch.nn.Module, device: torch.device
    ) -> None:
        self.spec = spec
        self.version = version
        self.network = network
        self.device = device
        self.thresholds = np.asarray(spec.thresholds, dtype=np.float64)
        self.rule = DecisionRule.of(spec.thresholds, spec.top_k_fallback)

    @classmethod
    def load(cls, directory: Path, device: torch.device | None = None) -> Classifier:
        """Load and verify a model directory: files present, hash matching, shapes matching."""
        spec, version, expected_sha256 = read_model_json(directory)
        weights_path = checked_weights(directory, expected_sha256)
        try:
            state = load_file(str(weights_path))
        except (SafetensorError, OSError) as error:
            raise ModelError(f"{weights_path} is not a safetensors file: {error}") from None
        network = build_network(spec.architecture, len(spec.classes))
        _check_shapes(network, state, len(spec.classes), weights_path)
        _check_finite(state, weights_path)
        load_weights(network, state)
        device = device or pick_device()
        network.eval().to(device)
        if device.type == "cuda":
            network = network.to(memory_format=torch.channels_last)
        else:
            set_cpu_threads()
        return cls(spec, version, network, device)

    def batch_decoder(self, max_pixels: int = DEFAULT_MAX_PIXELS) -> BatchDecoder:
        """Decodes image bytes into this model's input on its device: JPEGs on the GPU if any.

        Its `DecodedBatch.inputs` go straight to `scores`, without a trip through the host.
        """
        return BatchDecoder.for_device(self.spec.preprocessing, self.device, max_pixels)

    def scores(self, inputs: np.ndarray | torch.Tensor) -> np.ndarray:
        """Sigmoid scores, shape (batch, classes), for normalised (batch, 3, H, W) inputs.

        A tensor already on the device (from `batch_decoder`) is used where it is.
        """
        with torch.inference_mode():
            if isinstance(inputs, np.ndarray):
                inputs = torch.from_numpy(inputs)
            tensor = inputs.to(self.device, non_blocking=True)
            if self.device.type == "cuda":
                tensor = tensor.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=autocast_dtype()):
                    logits = self.network(tensor)
            else:
                logits = self.network(tensor)
            return torch.sigmoid(logits.float()).cpu().numpy()

    def decide(self, scores: np.ndarray) -> np.ndarray:
        """Which classes each row of a (batch, classes) score matrix gets as labels (`decide`)."""
        return decide(scores, self.thresholds, self.spec.top_k_fallback)

    def labels_above_threshold(self, scores: np.ndarray) -> list[LabelScore]:
        """The labels one score vector gets (see `decide`), with their confidence."""
        return self.labels_of(np.asarray(scores)[np.newaxis, :])[0]

    def labels_of(self, scores: np.ndarray) -> list[list[LabelScore]]:
        """The labels each row of a (batch, classes) score matrix gets, with their confidence.

        One `decide` and one conversion to Python floats for the whole matrix: done
        row by row, numpy's per-call set-up cost more than the comparisons themselves.
        """
        chosen = self.decide(scores).tolist()
        classes = self.spec.classes
        return [
            [
                LabelScore(item.key, item.concept, score)
                for item, score, given in zip(classes, row, choice, strict=True)
                if given
            ]
            for row, choice in zip(
                np.asarray(scores, dtype=np.float64).tolist(), chosen, strict=True
            )
        ]


def _check_shapes(
    network: torch.nn.Module, state: dict[str, torch.Tensor], num_classes: int, path: Path
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
            f"{path}: model.json lists {num_classes} classes but the weights' head has "
            f"{outputs} outputs ({head} is {actual[head]}, expected {expected[head]})"
        )


def _check_finite(state: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse weights holding NaN or ±inf (a diverged training): every score would be NaN."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelError(
                f"{path}: {name} holds NaN or infinite values (a training that diverged?): "
                "this model would give no usable score"
            )
