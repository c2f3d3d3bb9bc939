"""Grad-CAM heatmaps: which regions of an image drove each label, drawn over the image.

Grad-CAM (Selvaraju et al., 2017) weights a convolutional layer's feature maps
by the mean gradient of one class's logit over each map and keeps the positive
part of their sum: where the map is hot, the features that raised that class's
score were found. It is a forward hook and one `torch.autograd.grad` per label,
written here in a few lines rather than taken from the `grad-cam` package, which
brings OpenCV and more along for the same few tensor operations.

Images are read as inference reads them (`enrichment.media.decode.decode` with the
model directory's preprocessing), so the heatmap explains the score the run
stored; URLs and records' image URLs go through the SSRF-safe `Fetcher`.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from enrichment.config import Settings
from enrichment.errors import EnrichError, InvalidValue, OutputError
from enrichment.files import make_directory
from enrichment.media.decode import ImageError, decode, load_rgb
from enrichment.media.fetch import Fetcher
from enrichment.model.classifier import Classifier
from enrichment.sources.records_file import normalise_id
from enrichment.store.database import Database
from enrichment.store.reporting import record_image
from enrichment.thresholds import confidence_text, threshold_text

# The last convolutional stage of each supported torchvision family: the
# deepest layer that still has a spatial layout. Matched on the name's prefix.
TARGET_LAYERS = (
    ("resnet", "layer4"),
    ("resnext", "layer4"),
    ("wide_resnet", "layer4"),
    ("mobilenet_v2", "features"),
    ("mobilenet_v3", "features"),
    ("efficientnet", "features"),
    ("convnext", "features"),
    ("densenet", "features"),
    ("regnet", "trunk_output"),
    ("shufflenet_v2", "conv5"),
)
DISPLAY_SIDE = 448  # the overlay's longer side, in pixels
HEAT_WEIGHT = 0.5  # how much of the overlay is heatmap colour


@dataclass(frozen=True)
class ImageSource:
    """The bytes to explain, and a short name for the files written about them."""

    name: str
    data: bytes


@dataclass(frozen=True)
class Explanation:
    """One class's heatmap over the model's input, in [0, 1], with the score it explains."""

    key: str
    name: str  # the class's human name
    confidence: float
    threshold: float
    heatmap: np.ndarray


def from_file(path: Path) -> ImageSource:
    try:
        return ImageSource(path.stem, path.read_bytes())
    except OSError as error:
        raise EnrichError(f"cannot read {path}: {error.strerror or error}") from None


def from_url(url: str, settings: Settings) -> ImageSource:
    """Fetch with the project's Fetcher: the same address policy, caps and deadline as a run."""
    fetcher = Fetcher(settings)
    try:
        fetched = fetcher.fetch(url)
    finally:
        fetcher.close()
    if fetched.content is None:
        raise EnrichError(f"cannot fetch {url}: {fetched.error_reason}: {fetched.error_message}")
    stem = url.split("?")[0].rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return ImageSource(stem or "image", fetched.content)


class NoSuchRecord(EnrichError):
    """The target named no record: not an id, or none the database holds."""


def from_record(db: Database, record_id: str, settings: Settings) -> ImageSource:
    """The image of a record already in the database, fetched from its image URL."""
    try:
        wanted = normalise_id(record_id)
    except ValueError as error:
        raise NoSuchRecord(f"{error}; nor is it an existing file or an http(s) URL") from None
    stored = record_image(db, wanted)
    if stored is None:
        raise NoSuchRecord(
            f"{record_id} is no file here, no http(s) URL, and no record in the database"
        )
    if not stored.image_url:
        raise EnrichError(f"record {wanted} has no image URL")
    return ImageSource(wanted, from_url(stored.image_url, settings).data)


def target_layer_name(architecture: str) -> str:
    for prefix, layer in TARGET_LAYERS:
        if architecture.startswith(prefix):
            return layer
    families = ", ".join(prefix for prefix, _ in TARGET_LAYERS)
    raise InvalidValue(
        "layer",
        f"no default Grad-CAM layer for {architecture} (known families: {families}): "
        f"name a convolutional layer",
    )


def find_layer(network: torch.nn.Module, name: str) -> torch.nn.Module:
    try:
        return network.get_submodule(name)
    except AttributeError:
        children = ", ".join(child for child, _ in network.named_children())
        raise InvalidValue(
            "layer",
            f"the network has no layer {name!r}; its top-level layers are {children} "
            f"(nested ones are written like layer4.1.conv2)",
        ) from None


def forward_with_features(
    network: torch.nn.Module, layer: torch.nn.Module, inputs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits for `inputs`, and `layer`'s output kept in the autograd graph."""
    captured: list[torch.Tensor] = []

    def keep(_module: torch.nn.Module, _inputs: object, output: object) -> torch.Tensor:
        if not isinstance(output, torch.Tensor) or output.dim() != 4:
            raise EnrichError("the Grad-CAM layer must output (batch, channels, height, width)")
        captured.append(output)
        # What follows may work in place (DenseNet applies ReLU in place to its
        # features): hand it a copy, so the kept tensor stays differentiable.
        return output.clone()

    handle = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = network(inputs.requires_grad_(True))
    finally:
        handle.remove()
    if not captured:
        raise EnrichError("the Grad-CAM layer is not used in the network's forward pass")
    return logits, captured[-1]


def class_activation_map(
    logits: torch.Tensor, features: torch.Tensor, index: int, size: tuple[int, int]
) -> np.ndarray:
    """Grad-CAM for output `index` of the first input, upsampled to `size` and scaled to [0, 1]."""
    (gradients,) = torch.autograd.grad(logits[0, index], features, retain_graph=True)
    weights = gradients[:1].mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * features[:1]).sum(dim=1, keepdim=True)).float()
    cam = torch.nn.functional.interpolate(cam, size=size, mode="bilinear", align_corners=False)
    peak = cam.max()
    return (cam / peak if peak > 0 else cam)[0, 0].detach().cpu().numpy()


def explain(
    classifier: Classifier,
    data: bytes,
    label_keys: Sequence[str] = (),
    layer_name: str | None = None,
    max_pixels: int = Settings.max_image_pixels,
) -> list[Explanation]:
    """Heatmaps for the given classes, or for the labels the image gets (above threshold)."""
    spec = classifier.spec
    unknown = sorted(set(label_keys) - set(spec.keys))
    if unknown:
        raise InvalidValue(
            "label_keys",
            f"this model has no class {', '.join(unknown)} (its classes: {', '.join(spec.keys)})",
        )
    try:
        array = decode(data, spec.preprocessing, max_pixels)
    except ImageError as error:
        raise EnrichError(f"cannot use the image: {error.reason}: {error.message}") from None
    network = classifier.network
    layer = find_layer(network, layer_name or target_layer_name(spec.architecture))
    inputs = torch.from_numpy(array[np.newaxis]).to(classifier.device)
    logits, features = forward_with_features(network, layer, inputs)
    scores = torch.sigmoid(logits[0].detach().float()).cpu().numpy()
    keys = list(dict.fromkeys(label_keys)) or [
        given.key for given in classifier.labels_above_threshold(scores)
    ]
    if not keys:
        best = int(np.argmax(scores))
        raise InvalidValue(
            "label_keys",
            f"no class reaches its threshold (best: {spec.keys[best]} "
            f"{confidence_text(float(scores[best]))}): "
            f"name a class to explain it anyway",
        )
    size = (spec.input_size, spec.input_size)
    explanations = []
    for key in keys:
        index = spec.keys.index(key)
        chosen = spec.classes[index]
        heatmap = class_activation_map(logits, features, index, size)
        explanations.append(
            Explanation(key, chosen.label, float(scores[index]), chosen.threshold, heatmap)
        )
    return explanations


def overlay(image: Image.Image, explanation: Explanation) -> Image.Image:
    """The heatmap in colour over the image, with the label and its confidence drawn in.

    The model sees the image squeezed to a square; stretching the square
    heatmap back to the image's own shape undoes exactly that.
    """
    from matplotlib import colormaps

    heat = Image.fromarray(explanation.heatmap.astype(np.float32), mode="F")
    heat = np.asarray(heat.resize(image.size, Image.Resampling.BILINEAR))
    colours = colormaps["jet"](np.clip(heat, 0.0, 1.0))[..., :3]
    base = np.asarray(image, dtype=np.float32) / 255.0
    blended = (1 - HEAT_WEIGHT) * base + HEAT_WEIGHT * colours
    result = Image.fromarray(np.rint(blended * 255).astype(np.uint8), mode="RGB")
    return _draw_caption(result, caption(explanation))


def caption(explanation: Explanation) -> str:
    """`Photograph  0.4349  (threshold 0.435)`: written as the report writes a label's
    confidence beside its threshold (`thresholds.confidence_text`, `threshold_text`)."""
    confidence = confidence_text(explanation.confidence)
    return f"{explanation.name}  {confidence}  (threshold {threshold_text(explanation.threshold)})"


def _draw_caption(image: Image.Image, caption: str) -> Image.Image:
    """White text on a translucent band along the bottom, shrunk to fit the width."""
    size = max(12, image.width // 26)
    font = ImageFont.load_default(size=size)
    band = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(band)
    width = draw.textlength(caption, font=font)
    if width > image.width - 16:
        font = ImageFont.load_default(size=max(8, int(size * (image.width - 16) / width)))
    _, top, _, bottom = draw.textbbox((0, 0), caption, font=font)
    height = bottom - top + 12
    draw.rectangle((0, image.height - height, image.width, image.height), fill=(0, 0, 0, 170))
    draw.text((8, image.height - height + 6 - top), caption, font=font, fill=(255, 255, 255, 255))
    return Image.alpha_composite(image.convert("RGBA"), band).convert("RGB")


def display_image(data: bytes, max_pixels: int = Settings.max_image_pixels) -> Image.Image:
    """The image upright, in RGB, its longer side scaled to DISPLAY_SIDE."""
    try:
        image = load_rgb(data, DISPLAY_SIDE, max_pixels)
    except ImageError as error:
        raise EnrichError(f"cannot use the image: {error.reason}: {error.message}") from None
    scale = DISPLAY_SIDE / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


# An id whose file name (`/9/a_b` -> `9_a_b`) no other name gives: an alphanumeric
# dataset, then one segment of letters, digits, `.`, `_` and `-`, at most 80 in all.
PLAIN_RECORD_ID = re.compile(r"/[A-Za-z0-9]+/[A-Za-z0-9_-][A-Za-z0-9._-]{0,77}")


def write_overlays(
    source: ImageSource,
    explanations: Sequence[Explanation],
    out_dir: Path,
    max_pixels: int = Settings.max_image_pixels,
) -> list[Path]:
    """One PNG per explanation, named after the source and the label key.

    Every PNG is written under a temporary name before any is renamed into
    place, so a path that cannot be made or written (a full disk, a directory
    under /proc) leaves no partial file behind: one line naming the path instead.
    """
    image = display_image(source.data, max_pixels)
    make_directory(out_dir)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", source.name).strip("._")[:80] or "image"
    if stem != source.name and not PLAIN_RECORD_ID.fullmatch(source.name):
        # Made safe for a file name, two names could become one (`/9/a b`, `/9/a/b` and
        # `/9/a_b`, or ids alike in their first 80 characters), and one's overlays replace
        # the other's: the name's hash keeps them apart.
        stem += "-" + hashlib.sha256(source.name.encode()).hexdigest()[:8]
    staged: list[tuple[Path, Path]] = []
    try:
        for explanation in explanations:
            path = out_dir / f"{stem}-{re.sub(r'[^A-Za-z0-9._-]+', '_', explanation.key)}.png"
            # A unique name, opened exclusively, with the permissions of any new file.
            temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
            staged.append((temporary, path))
            with open(temporary, "xb") as file:
                overlay(image, explanation).save(file, format="PNG")
        for temporary, path in staged:
            os.replace(temporary, path)
    except OSError as error:
        for temporary, _ in staged:
            temporary.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {error.strerror or error}") from None
    return [path for _, path in staged]
