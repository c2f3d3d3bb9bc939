"""Decoding real edge-case files (tests/data/images, see SOURCES.md there) into model input.

Pixels are checked against conversions computed here independently (palette
lookups, alpha compositing, raw 16-bit samples), not just shapes: an image that
comes out inverted, half-grey, sideways or white must fail.
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from enrichment.media.decode import ImageError, Preprocessing, decode, load_rgb

IMAGES = Path(__file__).resolve().parent / "data" / "images"
# mean 0, std 1: the model input is then exactly the RGB pixels divided by 255.
PLAIN = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def read(name: str) -> bytes:
    return (IMAGES / name).read_bytes()


def pixels(data: bytes, size: int | None = None) -> np.ndarray:
    """The model input as 0..255 HWC pixels.

    `size` None skips the resize and keeps the file's own size (for non-JPEG
    files: a JPEG would be decoded at reduced scale).
    """
    if size is None:
        return np.asarray(load_rgb(data, 1), dtype=np.int64)
    inputs = decode(data, Preprocessing(size, *PLAIN))
    assert inputs.shape == (3, size, size) and inputs.dtype == np.float32
    return np.rint(inputs.transpose(1, 2, 0) * 255.0).astype(np.int64)


def reason(data: bytes, **kwargs: int) -> str:
    with pytest.raises(ImageError) as caught:
        decode(data, Preprocessing(32, *PLAIN), **kwargs)
    assert caught.value.message
    return caught.value.reason


def composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None].astype(np.float64) / 255.0
    return np.rint(rgb * a + 255.0 * (1.0 - a)).astype(np.int64)


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def test_normalisation_uses_the_model_directory_mean_and_std() -> None:
    data = read("hopper.jpg")
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    inputs = decode(data, Preprocessing(128, mean, std))
    expected = np.asarray(Image.open(io.BytesIO(data)), dtype=np.float32) / 255.0
    expected = ((expected - mean) / std).transpose(2, 0, 1)
    assert inputs.shape == (3, 128, 128) and inputs.flags.c_contiguous
    assert np.allclose(inputs, expected, atol=1e-5)


def test_cmyk_jpeg_becomes_rgb_not_inverted() -> None:
    # Pillow's own test: red pixels in the top-left corner, black in the bottom-right.
    rgb = pixels(read("pil_sample_cmyk.jpg"), 100)
    red, black = rgb[0, 0], rgb[-1, -1]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    assert black.max() < 40


def test_exif_orientation_is_applied() -> None:
    upright = pixels(read("hopper.jpg"), 128)
    rotated = pixels(read("hopper_orientation_6.jpg"), 128)
    stored = np.asarray(Image.open(IMAGES / "hopper_orientation_6.jpg"), dtype=np.int64)
    # Same picture up to JPEG noise once turned; far apart as stored.
    assert np.abs(rotated - upright).mean() < 8
    assert np.abs(stored - upright).mean() > 50


def test_grey_jpeg_is_replicated_into_three_equal_channels() -> None:
    data = read("hopper_gray.jpg")
    grey = np.asarray(Image.open(io.BytesIO(data)), dtype=np.int64)
    rgb = pixels(data, 128)
    for channel in range(3):
        assert np.array_equal(rgb[..., channel], grey)


def test_progressive_jpeg_at_reduced_scale_matches_a_full_decode() -> None:
    data = read("app13-multiple.jpg")  # 256x160, progressive
    assert load_rgb(data, 64).size == (128, 80)  # decoded at 1/2 scale
    full = Image.open(io.BytesIO(data)).convert("RGB")
    reference = np.asarray(full.resize((64, 64), Image.Resampling.BILINEAR), dtype=np.int64)
    difference = np.abs(pixels(data, 64) - reference)
    assert difference.mean() < 2.0 and difference.max() < 40


def test_large_jpeg_is_not_decoded_at_full_size() -> None:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
    scan = Image.fromarray(noise).resize((2000, 1600), Image.Resampling.BICUBIC)
    data = encode(scan, "JPEG", quality=85)
    assert load_rgb(data, 224).size == (500, 400)  # 1/4 scale, both sides still >= 224
    reference = np.asarray(scan.resize((224, 224), Image.Resampling.BILINEAR), dtype=np.int64)
    assert np.abs(pixels(data, 224) - reference).mean() < 3.0


def test_rgba_png_is_composited_on_white() -> None:
    data = read("pil123rgba.png")
    rgba = np.asarray(Image.open(io.BytesIO(data)), dtype=np.int64)
    rgb = pixels(data)
    expected = composite_on_white(rgba[..., :3], rgba[..., 3])
    assert np.abs(rgb - expected).max() <= 1
    clear = rgba[..., 3] == 0
    assert clear.any() and (rgb[clear] == 255).all()


def test_palette_png_with_transparency_is_composited_on_white() -> None:
    image = Image.open(IMAGES / "pil123p.png")
    indices = np.asarray(image, dtype=np.int64)
    palette = np.asarray(image.getpalette("RGB"), dtype=np.int64).reshape(-1, 3)
    alphas = np.frombuffer(image.info["transparency"], dtype=np.uint8).astype(np.int64)
    expected = composite_on_white(palette[indices], alphas[indices])
    rgb = pixels(read("pil123p.png"))
    assert np.abs(rgb - expected).max() <= 1
    clear = alphas[indices] == 0
    assert clear.any() and (rgb[clear] == 255).all()


def test_palette_png_without_transparency_is_a_palette_lookup() -> None:
    image = Image.open(IMAGES / "hopper_wal.png")
    palette = np.asarray(image.getpalette("RGB"), dtype=np.int64).reshape(-1, 3)
    expected = palette[np.asarray(image, dtype=np.int64)]
    assert np.array_equal(pixels(read("hopper_wal.png"), 128), expected)


def test_16_bit_rgb_tiff_keeps_the_high_byte_of_the_raw_samples() -> None:
    data = read("tiff_16bit_RGB.tiff")
    # One 256x256 deflate tile (no predictor) at offset 293, 23952 bytes, little-endian.
    tile = np.frombuffer(zlib.decompress(data[293 : 293 + 23952]), dtype="<u2")
    raw = tile.reshape(256, 256, 3)[:40, :100].astype(np.int64)
    assert np.array_equal(pixels(data), raw >> 8)


def test_16_bit_grey_tiff_is_scaled_not_clipped_to_white() -> None:
    data = read("16bit.cropped.tif")
    # Uncompressed 64x64 strip at offset 110, little-endian.
    raw = np.frombuffer(data[110 : 110 + 8192], dtype="<u2").reshape(64, 64).astype(np.int64)
    rgb = pixels(data, 64)
    for channel in range(3):
        assert np.array_equal(rgb[..., channel], raw >> 8)


def test_16_bit_grey_png_uses_the_whole_range() -> None:
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    rgb = pixels(encode(Image.fromarray(ramp), "PNG"), 64)
    assert np.array_equal(rgb[..., 1], ramp.astype(np.int64) >> 8)
    assert rgb.min() == 0 and rgb.max() == 255


def test_animated_gif_uses_its_first_frame() -> None:
    image = Image.open(IMAGES / "dispose_bgnd.gif")
    palette = np.asarray(image.getpalette("RGB"), dtype=np.int64).reshape(-1, 3)
    first = palette[np.asarray(image, dtype=np.int64)]
    image.seek(image.n_frames - 1)
    last = np.asarray(image.convert("RGB"), dtype=np.int64)
    rgb = pixels(read("dispose_bgnd.gif"), 100)
    assert np.array_equal(rgb, first)
    assert not np.array_equal(rgb, last)


def test_bomb_in_a_later_gif_frame_is_never_reached() -> None:
    assert pixels(read("decompression_bomb_extents.gif"), 100).shape == (100, 100, 3)


@pytest.mark.parametrize("fmt", ["WEBP", "BMP", "TIFF", "PNG"])
def test_every_allowed_format_decodes_losslessly(fmt: str) -> None:
    original = Image.open(IMAGES / "hopper.jpg").convert("RGB")
    options = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(original, fmt, **options)
    assert np.array_equal(pixels(data, 128), np.asarray(original, dtype=np.int64))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("truncated_jpeg.jpg", "truncated"),
        ("truncated_image.png", "truncated"),
        ("broken.png", "decode_error"),
        ("zero_width.gif", "decode_error"),
        ("decompression_bomb.gif", "bomb"),
    ],
)
def test_broken_files_give_their_reason(name: str, expected: str) -> None:
    assert reason(read(name)) == expected


def test_a_baseline_jpeg_cut_in_half_is_an_error_not_grey_input() -> None:
    data = read("hopper.jpg")
    assert reason(data[: len(data) // 2]) == "truncated"


def test_pixel_cap_refuses_before_decoding() -> None:
    assert reason(read("hopper.jpg"), max_pixels=128 * 127) == "bomb"
    assert pixels(read("hopper.jpg"), 32).shape == (32, 32, 3)


@pytest.mark.parametrize(
    "data",
    [
        b"<!doctype html><html><body>Not found</body></html>",
        b"",
        b"%PDF-1.4\n",
        encode(Image.new("RGB", (8, 8)), "PPM"),
        encode(Image.new("RGB", (8, 8)), "ICO"),
        encode(Image.new("RGB", (8, 8)), "TGA"),
    ],
    ids=["html", "empty", "pdf", "ppm", "ico", "tga"],
)
def test_formats_outside_the_allow_list_are_not_images(data: bytes) -> None:
    assert reason(data) == "not_an_image"


@pytest.mark.parametrize("seed", range(6))
def test_garbage_after_a_valid_signature_is_an_image_error(seed: int) -> None:
    rng = np.random.default_rng(seed)
    header = read("hopper.jpg" if seed % 2 else "hopper_wal.png")[: 20 + 40 * seed]
    garbage = rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()
    assert reason(header + garbage) in {"decode_error", "truncated", "not_an_image"}
