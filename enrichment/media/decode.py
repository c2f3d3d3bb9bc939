"""Decoding third-party image bytes into exactly the model's input.

Any real-world file becomes either a normalised CHW float32 array or an
`ImageError` with a short machine-readable reason: `not_an_image`,
`decode_error`, `truncated` or `bomb`. Only a few well-worn formats are
parsed at all. Large JPEGs are decoded at reduced scale (DCT scaling), so a
4000 px scan is never fully decoded to make a 224 px input.
"""

from __future__ import annotations

import functools
import io
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from enrichment.config import Settings
from enrichment.media.cpus import usable_cpus

P = ParamSpec("P")
T = TypeVar("T")
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "TIFF", "WEBP", "BMP")
DEFAULT_MAX_PIXELS = Settings.max_image_pixels  # ENRICH_MAX_IMAGE_PIXELS
# The first bytes of the allowed formats: an unreadable file that starts like
# one of them is a broken image (`decode_error`), anything else `not_an_image`.
SIGNATURES = (
    b"\xff\xd8\xff",
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"II*\x00",
    b"MM\x00*",
    b"II+\x00",
    b"MM\x00+",
    b"BM",
)
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class DecodeSlots:
    """How many decodes this process runs at once: its share of the CPUs it may use.

    Decoding is CPU-bound and runs on the fetcher's threads (a handler thread per
    CPU, and the threads of work that fetches: harvests, labelled sets), which
    together are more than CPUs: more decodes at once than CPUs would only
    multiply the peak memory (a full-size RGBA decode of an 80 MP PNG is 320 MB). Where several
    processes of one machine decode (a Celery worker's pool), each takes its
    share of the usable CPUs, so that together they hold no more than there are.
    """

    def __init__(self) -> None:
        self.size = usable_cpus()
        self._semaphore = threading.BoundedSemaphore(self.size)

    def share_with(self, processes: int) -> None:
        """Size the slots for `processes` decoding processes on this machine (this one included).

        Called once as a process starts; decodes already running finish on the
        slots they took.
        """
        self.size = max(1, usable_cpus() // max(1, processes))
        self._semaphore = threading.BoundedSemaphore(self.size)

    def slot(self) -> threading.BoundedSemaphore:
        """The semaphore one decode holds while it runs (the one in force when it began)."""
        return self._semaphore


# A process-wide limit, like the CPUs it stands for (see `share_cpus`).
DECODE_SLOTS = DecodeSlots()


def share_cpus(processes: int) -> None:
    """This process is one of `processes` on this machine that decode: take a share of the CPUs."""
    DECODE_SLOTS.share_with(processes)


class ImageError(Exception):
    """An image that cannot become model input; `reason` is stored with the record."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Preprocessing:
    """How the model directory says inputs are made; training and inference share it."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def decode(
    data: bytes,
    preprocessing: Preprocessing,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Bytes to a normalised (3, size, size) float32 array, or an ImageError.

    With `out` (a feeder's shared-memory slot) the input is written there and no
    array is allocated.
    """
    size = preprocessing.input_size
    with DECODE_SLOTS.slot():
        image = load_rgb(data, size, max_pixels)
        image = _guarded(image.resize, (size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return normalise(image, preprocessing, out)


def load_rgb(data: bytes, min_side: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The first frame, upright and in 8-bit RGB.

    JPEGs are decoded at the smallest DCT scale (1/8, 1/4, 1/2) that still
    leaves both sides at least `min_side` pixels, which is most of the speed:
    the resize that follows then averages over the same area either way.
    """
    return _guarded(_upright_rgb, open_image(data, max_pixels), min_side)


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open (header only) with the format allow-list and the pixel cap."""
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError("bomb", f"decompression bomb refused: {error}") from None
    except UnidentifiedImageError:
        if _looks_like_allowed_format(data):
            raise ImageError("decode_error", "broken image: its header cannot be read") from None
        raise ImageError(
            "not_an_image", f"not an image in an allowed format ({', '.join(ALLOWED_FORMATS)})"
        ) from None
    except Exception as error:  # a parser's own failure on hostile bytes
        raise ImageError("decode_error", f"cannot read image header: {error}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            "bomb", f"{width}x{height} pixels is over the limit of {max_pixels} pixels"
        )
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode to 8-bit RGB; transparency is composited on white, as a page would show it."""
    if image.mode in SIXTEEN_BIT_MODES:
        # Pillow's own conversion clips at 255, turning most 16-bit scans white;
        # keep the high byte instead, as Pillow does for 16-bit RGB.
        wide = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        return Image.fromarray((wide >> 8).astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "F":
        # Float images have no declared range; 0..1 is the common convention.
        array = np.asarray(image, dtype=np.float64)
        scale = 255.0 if array.max(initial=0.0) <= 1.0 else 1.0
        grey = np.clip(np.rint(array * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def normalise(
    image: Image.Image, preprocessing: Preprocessing, out: np.ndarray | None = None
) -> np.ndarray:
    """An RGB image to the model's (3, H, W) float32 input, with its mean and std.

    `(x / 255 - mean) / std` is computed as `x * scale - shift` straight into the
    output, channels first: two passes over one array instead of five temporary
    arrays and a transposing copy, about 7x less CPU (a fifth of a decode, before),
    equal to the textbook form within float32 rounding (5e-7). `out`, if given, is
    a float32 array of that shape to write into.
    """
    pixels = np.asarray(image).transpose(2, 0, 1)  # a view: (3, H, W) uint8
    scale, shift = _affine(tuple(preprocessing.mean), tuple(preprocessing.std))
    if out is None:
        out = np.empty(pixels.shape, dtype=np.float32)
    np.multiply(pixels, scale, out=out)
    np.subtract(out, shift, out=out)
    return out


@functools.lru_cache(maxsize=8)
def _affine(
    mean: tuple[float, float, float], std: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (scale, shift), shaped (3, 1, 1), so that input = pixel * scale - shift."""
    mean_array = np.asarray(mean, dtype=np.float64)
    std_array = np.asarray(std, dtype=np.float64)
    scale = (1.0 / (255.0 * std_array)).astype(np.float32).reshape(3, 1, 1)
    shift = (mean_array / std_array).astype(np.float32).reshape(3, 1, 1)
    return scale, shift


def _upright_rgb(image: Image.Image, min_side: int) -> Image.Image:
    if image.format == "JPEG":
        image.draft(None, (min_side, min_side))
    image.load()
    ImageOps.exif_transpose(image, in_place=True)
    return to_rgb(image)


def _guarded(step: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run one decoding step; whatever a decoder raises on hostile bytes becomes an ImageError.

    Pillow's plugins raise OSError, ValueError, SyntaxError, EOFError, struct
    and zlib errors and more, so the net is wide on purpose: one bad file must
    never fail its batch.
    """
    try:
        return step(*args, **kwargs)
    except ImageError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageError("bomb", f"decompression bomb refused: {error}") from None
    except OSError as error:
        if "truncated" in str(error) or "broken data stream" in str(error):
            raise ImageError("truncated", f"image file is cut short: {error}") from None
        raise ImageError("decode_error", f"cannot decode image: {error}") from None
    except Exception as error:
        raise ImageError("decode_error", f"cannot decode image: {error}") from None


def _looks_like_allowed_format(data: bytes) -> bool:
    return data.startswith(SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")
