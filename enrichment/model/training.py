"""Fine-tuning a torchvision network into a multilabel model directory.

Flat and explicit, after torchvision's reference scripts, with the choices that
matter for heritage collections:

- one sigmoid output per class and BCEWithLogitsLoss, with `pos_weight` =
  negatives / positives per class, so a class on 2 % of the images still pulls
  its weight;
- the validation images are whole objects: all images of one object (the
  group column) fall on the same side of the split, or validation would
  measure how well the model recognises an object it has seen;
- early stopping on validation mAP (validation loss breaking ties), and the best
  epoch's weights are saved;
- training and inference see the same input: images are decoded by
  `enrichment.media.decode.decode` with the model's `Preprocessing` (validation
  exactly as inference; training at a slightly larger size and then cropped
  back, see `Augmentation`), so the seed's 128 px training / 224 px inference
  mismatch cannot recur;
- a model is usable as soon as it is written: training ends by choosing each
  class's threshold on its validation split by best F1, as `enrich model
  calibrate` does (thresholds_version 1); calibrating on a separate set later
  refines them. A flat 0.5 suits no class: rare classes score low.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import pickle
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from tqdm import tqdm

from enrichment.errors import EnrichError, InvalidValue, ModelError
from enrichment.media.decode import Preprocessing, decode
from enrichment.media.fetch import Fetcher
from enrichment.model.calibration import ClassThreshold, best_f1_thresholds, calibrated_spec
from enrichment.model.classifier import (
    Classifier,
    autocast_dtype,
    build_network,
    head_parameter_names,
    load_weights,
    pick_device,
    save_model_dir,
    set_cpu_threads,
)
from enrichment.model.evaluation import Metrics, compute_metrics
from enrichment.model.labelled import LabelledSet, Skipped, is_url, load_images, skipped
from enrichment.model.spec import IMAGENET_MEAN, IMAGENET_STD, ClassSpec, ModelSpec
from enrichment.model.split import split_groups_or_rows
from enrichment.thresholds import decide

DEFAULT_ARCHITECTURE = "resnet50"
DEFAULT_INPUT_SIZE = 224
# A class with very few positives would otherwise get a weight in the thousands
# and make the loss, and the gradients, unstable.
MAX_POS_WEIGHT = 100.0
AUGMENTATION = (
    "torchvision.transforms.v2: decode at 8/7 of the input size, RandomResizedCrop "
    "80-100 % of the area at the image's proportions, RandomHorizontalFlip, ColorJitter "
    "brightness/contrast/saturation 0.2; hue kept, never flipped upside down"
)


@dataclass(frozen=True)
class TrainingOptions:
    """Every knob of a training run; each is recorded in the model's model.json."""

    name: str
    architecture: str | None = None  # default: the `init` model's, else DEFAULT_ARCHITECTURE
    input_size: int | None = None  # default: the `init` model's, else DEFAULT_INPUT_SIZE
    epochs: int = 20
    train_batch: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 3
    validation_fraction: float = 0.2
    seed: int = 0
    pretrained: bool = False
    init: Path | None = None
    workers: int = 0
    progress: bool = True


@dataclass(frozen=True)
class TrainingResult:
    version: str
    spec: ModelSpec
    best_epoch: int
    epochs_run: int
    validation: Metrics  # at a flat 0.5
    seconds: float
    skipped: list[Skipped]
    thresholds: list[ClassThreshold]  # chosen on the validation split, by best F1
    calibrated: Metrics  # on the validation split at those thresholds
    split_fallback: str | None = None  # why validation was split by image, not by group
    interrupted_in: int | None = None  # the epoch a Ctrl-C stopped (the best before is kept)


@dataclass(frozen=True)
class _Start:
    """Where training starts: the network, its input conventions, and how to say it."""

    network: torch.nn.Module
    architecture: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    description: str


class Augmentation:
    """Changes a heritage photograph or scan could plausibly show, and no others.

    A slightly different framing (a crop keeping 80-100 % of the area, at the
    image's own proportions), a left-right mirror, and small shifts of exposure,
    contrast and saturation, as between two photographers. Hue stays, since
    colour carries meaning (a red chalk drawing, a blue textile), and nothing
    is turned upside down: a document, a building or a map turned over is not
    the same picture.
    """

    def __init__(self, preprocessing: Preprocessing) -> None:
        self.preprocessing = preprocessing
        working = round(preprocessing.input_size * 8 / 7)
        # Decoded square, unnormalised, in [0, 1]: the crop keeps that 1:1 proportion.
        self.working = Preprocessing(working, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        size = preprocessing.input_size
        self.transform = v2.Compose(
            [
                v2.RandomResizedCrop((size, size), scale=(0.8, 1.0), ratio=(1.0, 1.0)),
                v2.RandomHorizontalFlip(p=0.5),
                v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
                v2.Normalize(list(preprocessing.mean), list(preprocessing.std)),
            ]
        )

    def __call__(self, data: bytes) -> torch.Tensor:
        image = tv_tensors.Image(torch.from_numpy(decode(data, self.working)))
        return self.transform(image).as_subclass(torch.Tensor)


class InferenceView:
    """An image exactly as the deployed model will see it."""

    def __init__(self, preprocessing: Preprocessing) -> None:
        self.preprocessing = preprocessing

    def __call__(self, data: bytes) -> torch.Tensor:
        return torch.from_numpy(decode(data, self.preprocessing))


class _Images(Dataset):
    """Images as (input, target) pairs; local files are re-read, fetched ones kept as bytes."""

    def __init__(
        self,
        sources: Sequence[bytes | Path],
        targets: np.ndarray,
        view: Callable[[bytes], torch.Tensor],
    ) -> None:
        self.sources = sources
        self.targets = torch.from_numpy(targets)
        self.view = view

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        source = self.sources[index]
        data = source if isinstance(source, bytes) else source.read_bytes()
        return self.view(data), self.targets[index]


def positive_weights(targets: np.ndarray) -> np.ndarray:
    """negatives / positives per class, capped at MAX_POS_WEIGHT (1 where there is no positive)."""
    positives = targets.sum(axis=0)
    negatives = len(targets) - positives
    weights = np.where(positives > 0, negatives / np.maximum(positives, 1), 1.0)
    return np.clip(weights, 1.0 / MAX_POS_WEIGHT, MAX_POS_WEIGHT).astype(np.float32)


def imagenet_state(architecture: str) -> tuple[dict[str, torch.Tensor], str]:
    """torchvision's ImageNet weights for `architecture`, downloaded into torch's cache.

    This is the one step that uses the network: download.pytorch.org, once per
    architecture, into $TORCH_HOME/hub/checkpoints (put the file there by hand on
    an offline machine). torchvision publishes them only as .pth, so they are
    read with torch's weights-only loader, which builds tensors and nothing
    else, after the SHA-256 prefix in the file name is checked.
    """
    try:
        weights = torchvision.models.get_model_weights(architecture).DEFAULT
    except ValueError:
        raise ModelError(f"torchvision has no ImageNet weights for {architecture}") from None
    try:
        with contextlib.redirect_stdout(sys.stderr):  # torch announces downloads on stdout
            state = torch.hub.load_state_dict_from_url(
                weights.url, progress=True, check_hash=True, weights_only=True
            )
    except (OSError, RuntimeError, pickle.UnpicklingError) as error:
        raise ModelError(
            f"starting from ImageNet needs the weights {weights.url}, cached in "
            f"{torch.hub.get_dir()}/checkpoints, and they could not be fetched or read "
            f"({error}); copy the file there, or start from scratch or from a model directory"
        ) from None
    return state, f"torchvision {weights}"


def starting_point(options: TrainingOptions, keys: Sequence[str]) -> _Start:
    """The network to fine-tune: from scratch, from ImageNet weights or from a model directory.

    Everything but the head is carried over; the head too when the `init` model
    has exactly the same classes in the same order.
    """
    if options.pretrained and options.init is not None:
        raise InvalidValue(
            "init", "start from ImageNet weights or from a model directory, not from both"
        )
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if options.init is not None:
        source = Classifier.load(options.init, torch.device("cpu"))
        if options.architecture not in (None, source.spec.architecture):
            raise InvalidValue(
                "init",
                f"{options.init} is a {source.spec.architecture}, not a {options.architecture}",
            )
        architecture = source.spec.architecture
        input_size = options.input_size or source.spec.input_size
        mean, std = source.spec.mean, source.spec.std
        state = source.network.state_dict()
        same_classes = source.spec.keys == list(keys)
        description = f"model {source.version}"
    else:
        architecture = options.architecture or DEFAULT_ARCHITECTURE
        input_size = options.input_size or DEFAULT_INPUT_SIZE
        state, same_classes, description = {}, False, "scratch (random weights)"
    network = build_network(architecture, len(keys))
    if options.pretrained:
        state, description = imagenet_state(architecture)
    if state:
        head = set() if same_classes else head_parameter_names(architecture)
        body = {name: tensor for name, tensor in state.items() if name not in head}
        missing, unexpected = network.load_state_dict(body, strict=False)
        if set(missing) - head or unexpected:
            raise ModelError(f"the {description} weights do not fit {architecture}")
    return _Start(network, architecture, input_size, mean, std, description)


@dataclass(frozen=True)
class _Split:
    """The usable images on each side, as (row in its set, where its bytes are)."""

    train: list[tuple[int, bytes | Path]]
    validation: list[tuple[int, bytes | Path]]
    validation_set: LabelledSet
    skipped: list[Skipped]
    description: str
    fallback: str | None = None  # why it is split by image and not by group


@dataclass(frozen=True)
class _Best:
    rank: tuple[float, float]  # (validation mAP, -validation loss)
    epoch: int
    state: dict[str, torch.Tensor]
    metrics: Metrics
    scores: np.ndarray  # on the validation images, for choosing the thresholds


def train(
    data: LabelledSet,
    vocabulary: dict[str, str],
    options: TrainingOptions,
    out: Path,
    fetcher: Fetcher,
    validation: LabelledSet | None = None,
) -> TrainingResult:
    """Train on `data` (validating on `validation`, else on a split of it) and write `out`."""
    if (out / "model.json").exists():
        raise InvalidValue("out", f"{out} already holds a model; choose a new directory")
    present = data.label_keys()
    keys = [key for key in vocabulary if key in present]
    if not keys:
        raise EnrichError(f"{data.path} has no labelled image")
    torch.manual_seed(options.seed)
    start = starting_point(options, keys)
    preprocessing = Preprocessing(start.input_size, start.mean, start.std)
    split = _split(data, validation, preprocessing, fetcher, options)
    train_targets = data.targets(keys)[[row for row, _ in split.train]]
    val_targets = split.validation_set.targets(keys)[[row for row, _ in split.validation]]
    if not val_targets.any():
        raise EnrichError("the validation images have no labels: nothing to stop early on")

    device = pick_device()
    if device.type == "cpu":
        set_cpu_threads()
    network = start.network.to(device)
    if device.type == "cuda":
        network = network.to(memory_format=torch.channels_last)
    train_loader = DataLoader(
        _Images([source for _, source in split.train], train_targets, Augmentation(preprocessing)),
        batch_size=options.train_batch,
        shuffle=True,
        drop_last=len(split.train) > options.train_batch,  # BatchNorm cannot take one image
        num_workers=options.workers,
        persistent_workers=options.workers > 0,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(options.seed),
    )
    val_loader = DataLoader(
        _Images(
            [source for _, source in split.validation], val_targets, InferenceView(preprocessing)
        ),
        batch_size=options.train_batch,
        num_workers=options.workers,
        persistent_workers=options.workers > 0,
    )
    pos_weight = positive_weights(train_targets)
    started = time.monotonic()
    best, history, interrupted_in = _fit(
        network, train_loader, val_loader, val_targets, keys, pos_weight, options, device
    )
    seconds = time.monotonic() - started
    load_weights(network, best.state)
    chosen, calibrated = best_f1_thresholds(keys, val_targets > 0.5, best.scores)

    spec = ModelSpec(
        name=options.name,
        architecture=start.architecture,
        input_size=start.input_size,
        classes=tuple(ClassSpec(key, _human(key), vocabulary[key], 0.5) for key in keys),
        mean=start.mean,
        std=start.std,
        metrics={
            "validation": {"thresholds": "calibrated", **calibrated.as_json()},
            "validation_at_0.5": {"threshold": 0.5, **best.metrics.as_json()},
        },
        training={
            "data": str(data.path),
            "data_sha256": hashlib.sha256(data.path.read_bytes()).hexdigest(),
            "validation": split.description,
            "validation_fallback": split.fallback,
            "images": {
                "train": len(split.train),
                "validation": len(split.validation),
                "skipped": len(split.skipped),
            },
            "skipped": [item.as_json() for item in split.skipped[:20]],
            "unused_vocabulary": [key for key in vocabulary if key not in present],
            "start": start.description,
            "epochs": options.epochs,
            "epochs_run": len(history),
            "best_epoch": best.epoch,
            "interrupted_in_epoch": interrupted_in,
            "patience": options.patience,
            "train_batch": options.train_batch,
            "learning_rate": options.learning_rate,
            "weight_decay": options.weight_decay,
            "seed": options.seed,
            "loss": "BCEWithLogitsLoss",
            "pos_weight": dict(zip(keys, (round(float(w), 4) for w in pos_weight), strict=True)),
            "augmentation": AUGMENTATION,
            "history": history,
            "device": device.type,
            "seconds": round(seconds, 1),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    )
    spec = calibrated_spec(
        spec,
        chosen,
        f"the validation split of training ({split.description})",
        len(split.validation),
        0,
        thresholds_version=1,
    )
    version = save_model_dir(out, spec, network.cpu())
    return TrainingResult(
        version, spec, best.epoch, len(history), best.metrics, seconds, split.skipped, chosen,
        calibrated, split.fallback, interrupted_in,
    )  # fmt: skip


def _split(
    data: LabelledSet,
    validation: LabelledSet | None,
    preprocessing: Preprocessing,
    fetcher: Fetcher,
    options: TrainingOptions,
) -> _Split:
    images, skipped_images = _usable(data, preprocessing, fetcher)
    if validation is not None:
        held_out, skipped_held_out = _usable(validation, preprocessing, fetcher)
        return _Split(
            images, held_out, validation, skipped_images + skipped_held_out, str(validation.path)
        )
    rows = [data.images[row] for row, _ in images]
    groups, files = [row.group for row in rows], [row.image for row in rows]
    split = split_groups_or_rows(groups, options.validation_fraction, options.seed, files)
    by = "image" if split.fallback else data.group_field or "row"
    return _Split(
        [images[i] for i in split.train],
        [images[i] for i in split.validation],
        data,
        skipped_images,
        f"{options.validation_fraction:.0%} of {data.path.name}, by {by}, seed {options.seed}",
        split.fallback,
    )


def _fit(
    network: torch.nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    val_targets: np.ndarray,
    keys: Sequence[str],
    pos_weight: np.ndarray,
    options: TrainingOptions,
    device: torch.device,
) -> tuple[_Best, list[dict[str, Any]], int | None]:
    """Epochs until validation stops improving for `patience` epochs; the best one's state,
    each epoch's figures, and the epoch a Ctrl-C stopped, if one did after an epoch was
    done (before, it ends the training)."""
    loss_function = torch.nn.BCEWithLogitsLoss(pos_weight=torch.from_numpy(pos_weight).to(device))
    optimiser = torch.optim.AdamW(
        network.parameters(), lr=options.learning_rate, weight_decay=options.weight_decay
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=options.epochs)
    half = device.type == "cuda" and autocast_dtype() == torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=half)
    best: _Best | None = None
    history: list[dict[str, Any]] = []
    for epoch in range(1, options.epochs + 1):
        try:
            with tqdm(
                total=len(train_loader),
                desc=f"epoch {epoch}/{options.epochs}",
                unit=" batches",
                disable=None if options.progress else True,  # None: on a terminal only
                file=sys.stderr,
            ) as bar:
                loss = _train_one_epoch(
                    network, train_loader, loss_function, optimiser, scaler, device, bar
                )
                if not math.isfinite(loss):  # diverged: NaN thresholds would break model.json
                    raise ModelError(
                        f"training diverged: the loss became {loss} in epoch {epoch}; try a "
                        f"lower --lr than {options.learning_rate:g} (nothing was written)"
                    )
                schedule.step()
                metrics, val_loss, scores = _validate(
                    network, val_loader, val_targets, keys, pos_weight, device
                )
                mean_ap = metrics.mean_average_precision or 0.0
                bar.set_postfix(
                    loss=f"{loss:.4f}", val_loss=f"{val_loss:.4f}", val_mAP=f"{mean_ap:.4f}"
                )
            # Better mAP wins; at equal mAP (it often reaches 1.0 on easy classes), lower loss.
            rank = (mean_ap, -val_loss)
            better = best is None or rank > best.rank
            state = (
                {name: t.detach().cpu().clone() for name, t in network.state_dict().items()}
                if better
                else None
            )
        except KeyboardInterrupt:
            if best is None:
                raise  # no epoch to keep
            # The operator stops it: the best epoch so far is the model, as if validation
            # had stopped improving. (Everything an epoch takes is above, in the `try`.)
            return best, history, epoch
        history.append(
            {
                "epoch": epoch,
                "loss": round(loss, 6),
                "val_loss": round(val_loss, 6),
                "val_mAP": mean_ap,
            }
        )
        if state is not None:
            best = _Best(rank, epoch, state, metrics, scores)
        elif best is not None and epoch - best.epoch >= options.patience:
            break
    assert best is not None
    return best, history, None


def _train_one_epoch(
    network: torch.nn.Module,
    loader: DataLoader,
    loss_function: torch.nn.Module,
    optimiser: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    bar: tqdm,
) -> float:
    """One pass over the training images; returns the mean loss."""
    network.train()
    losses: list[float] = []
    for inputs, targets in loader:
        with _autocast(device):
            logits = _logits(network(_to_device(inputs, device)))
        loss = loss_function(logits.float(), targets.to(device))
        optimiser.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimiser)
        scaler.update()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses):.4f}")
        bar.update()
    return float(np.mean(losses))


def _validate(
    network: torch.nn.Module,
    loader: DataLoader,
    targets: np.ndarray,
    keys: Sequence[str],
    pos_weight: np.ndarray,
    device: torch.device,
) -> tuple[Metrics, float, np.ndarray]:
    """Metrics at a flat 0.5, the loss and the scores, on the validation images."""
    network.eval()
    chunks: list[torch.Tensor] = []
    with torch.inference_mode(), _autocast(device):
        for inputs, _ in loader:
            chunks.append(network(_to_device(inputs, device)).float().cpu())
    logits = torch.cat(chunks)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, torch.from_numpy(targets), pos_weight=torch.from_numpy(pos_weight)
    )
    scores = torch.sigmoid(logits).numpy()
    flat = [0.5] * len(keys)
    metrics = compute_metrics(keys, flat, targets > 0.5, scores, decide(scores, flat))
    return metrics, float(loss), scores


def _usable(
    data: LabelledSet, preprocessing: Preprocessing, fetcher: Fetcher
) -> tuple[list[tuple[int, bytes | Path]], list[Skipped]]:
    """Each readable image once, decoded to prove it, as (row, where its bytes are).

    Fetched images are kept as bytes (they are fetched once, not every epoch);
    local files are re-read when needed, so a large set is not held in memory.
    """
    images: list[tuple[int, bytes | Path]] = []
    failures: list[Skipped] = []
    for loaded in load_images(data, preprocessing, fetcher):
        if loaded.inputs is None or loaded.data is None:
            failures.append(skipped(data, loaded))
            continue
        image = data.images[loaded.index].image
        source = loaded.data if is_url(image) else data.base_dir / image
        images.append((loaded.index, source))
    if not images:
        first = failures[0]
        raise EnrichError(
            f"none of the {len(failures)} images of {data.path} could be read "
            f"(line {first.line}: {first.reason}: {first.message})"
        )
    return images, failures


def _to_device(inputs: torch.Tensor, device: torch.device) -> torch.Tensor:
    inputs = inputs.to(device, non_blocking=True)
    if device.type == "cuda":
        return inputs.contiguous(memory_format=torch.channels_last)
    return inputs


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=autocast_dtype())
    return contextlib.nullcontext()


def _logits(output: Any) -> torch.Tensor:
    """The main output; Inception and GoogLeNet add auxiliary ones while training."""
    return output if isinstance(output, torch.Tensor) else output[0]


def _human(key: str) -> str:
    return key.replace("_", " ").capitalize()
