"""Decoding third-party image bytes into exactly the model's input.

Any real-world file becomes either a normalised CHW float32 array or an
`ImageError` with a short machine-readable reason. Large JPEGs are decoded at
reduced scale (draft mode), so a 4000 px scan is never fully decoded to make a
224 px input.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "TIFF", "WEBP", "BMP")
DEFAULT_MAX_PIXELS = 100_000_000


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


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open (header only) with the format allow-list and the pixel cap."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError("bomb", f"decompression bomb refused: {error}") from None
    except UnidentifiedImageError:
        raise ImageError(
            "not_an_image", f"not an image in an allowed format ({', '.join(ALLOWED_FORMATS)})"
        ) from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError("decode_error", f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(
            "bomb", f"{width}x{height} pixels is over the limit of {max_pixels} pixels"
        )
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode to 8-bit RGB; transparency is composited on white, as a page would show it."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max(initial=0) > 255 else 255.0
        grey = np.clip(np.rint(array * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        scale = 255.0 if array.max(initial=0) <= 1.0 else 1.0
        grey = np.clip(np.rint(array * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


def decode(
    data: bytes, preprocessing: Preprocessing, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Bytes to a normalised (3, size, size) float32 array, or an ImageError."""
    image = open_image(data, max_pixels)
    size = preprocessing.input_size
    try:
        if image.format == "JPEG":
            # DCT scaling to the smallest size still at least `size` on each side.
            image.draft("RGB", (size, size))
        image.seek(0)
        image.load()
        image = ImageOps.exif_transpose(image)
        image = to_rgb(image)
        image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    except Image.DecompressionBombError as error:
        raise ImageError("bomb", f"decompression bomb refused: {error}") from None
    except OSError as error:
        text = str(error)
        reason = (
            "truncated" if "truncated" in text or "broken data stream" in text else "decode_error"
        )
        raise ImageError(reason, f"cannot decode image: {text}") from None
    except (ValueError, SyntaxError, EOFError) as error:
        raise ImageError("decode_error", f"cannot decode image: {error}") from None
    return normalise(image, preprocessing)


def normalise(image: Image.Image, preprocessing: Preprocessing) -> np.ndarray:
    array = np.asarray(image, dtype=np.float32) / 255.0
    mean = np.asarray(preprocessing.mean, dtype=np.float32)
    std = np.asarray(preprocessing.std, dtype=np.float32)
    return np.ascontiguousarray(((array - mean) / std).transpose(2, 0, 1))
