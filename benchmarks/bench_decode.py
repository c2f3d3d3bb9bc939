"""Preprocessing multi-megapixel JPEGs: `enrichment.media.decode.decode` against a naive baseline.

The naive baseline is what most loaders do: decode the whole file, convert to
RGB, resize to the model's input. `decode` asks libjpeg for the smallest DCT
scale that still covers the input size, so a 4000x3000 scan is decoded at
500x375. Both paths end in the same resize and normalisation; the outputs
must agree within `TOLERANCE` (mean absolute difference, in 0..255 pixel units)
and `decode` must be at least `TARGET` times faster.

    python benchmarks/bench_decode.py [--quick]

Not a test: it measures time, which the tests never do. `run(quick)` returns
the figures for `benchmarks/run_all.py`.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from enrichment.media.decode import Preprocessing, decode, normalise

WIDTH, HEIGHT = 4000, 3000
INPUT_SIZE = 224
TARGET = 2.5
TOLERANCE = 2.0  # mean |difference| in pixel units; the 99th percentile is printed too
PLAIN = Preprocessing(INPUT_SIZE, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def scan(seed: int) -> Image.Image:
    """A photograph-like 4000x3000 picture: smooth light, hard-edged shapes, fine grain.

    Pure noise or flat colour would flatter one side: real scans have structure
    at every scale, and JPEG's cost depends on it.
    """
    rng = np.random.default_rng(seed)
    light = rng.normal(128, 45, (12, 16, 3)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(light).resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(60):
        x, y = rng.integers(0, WIDTH), rng.integers(0, HEIGHT)
        w, h = rng.integers(40, 900, size=2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x, y, x + w, y + h), fill=colour, outline=(20, 20, 20), width=6)
    for _ in range(400):
        x, y = rng.integers(0, WIDTH, size=2), rng.integers(0, HEIGHT, size=2)
        draw.line((x[0], y[0], x[1], y[1]), fill=(230, 225, 210), width=int(rng.integers(1, 5)))
    image = image.filter(ImageFilter.GaussianBlur(1.2))
    grain = rng.normal(0, 7, (HEIGHT, WIDTH, 1))
    pixels = np.asarray(image, dtype=np.float32) + grain
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def naive(data: bytes, preprocessing: Preprocessing) -> np.ndarray:
    """Full decode, then resize: the baseline."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    size = preprocessing.input_size
    return normalise(image.resize((size, size), Image.Resampling.BILINEAR), preprocessing)


def fastest_of(function: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` timings, in seconds: other processes only ever add time."""
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        timings.append(time.perf_counter() - start)
    return min(timings)


def run(quick: bool) -> dict:
    count, repeats = (2, 3) if quick else (6, 5)
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as directory:
        paths = []
        for seed in range(count):
            path = Path(directory) / f"scan{seed}.jpg"
            scan(seed).save(path, "JPEG", quality=90)
            paths.append(path)
        files = [path.read_bytes() for path in paths]
    naive_s = [fastest_of(lambda d=data: naive(d, PLAIN), repeats) for data in files]
    decode_s = [fastest_of(lambda d=data: decode(d, PLAIN), repeats) for data in files]
    differences = np.concatenate(
        [np.abs(naive(data, PLAIN) - decode(data, PLAIN)).ravel() * 255.0 for data in files]
    )
    figures = {
        "images": count,
        "image_size": f"{WIDTH}x{HEIGHT}",
        "mean_file_mb": round(sum(map(len, files)) / count / 1e6, 2),
        "input_size": INPUT_SIZE,
        "naive_ms": round(1000 * statistics.mean(naive_s), 1),
        "decode_ms": round(1000 * statistics.mean(decode_s), 1),
        "mean_abs_diff": round(float(differences.mean()), 3),
        "p99_abs_diff": round(float(np.percentile(differences, 99)), 2),
        "max_abs_diff": round(float(differences.max()), 2),
        "tolerance_mean_abs_diff": TOLERANCE,
        "target": TARGET,
    }
    figures["decode_over_naive"] = round(figures["naive_ms"] / figures["decode_ms"], 2)
    figures["within_tolerance"] = figures["mean_abs_diff"] <= TOLERANCE
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 images, 3 repeats")
    figures = run(parser.parse_args(argv).quick)
    print(
        f"{figures['images']} JPEGs of {figures['image_size']} "
        f"({figures['mean_file_mb']} MB each) to {INPUT_SIZE}x{INPUT_SIZE} model input, "
        "one thread, fastest of repeats"
    )
    print(f"  naive (full decode, then resize): {figures['naive_ms']:8.1f} ms per image")
    print(f"  enrichment.media.decode.decode:         {figures['decode_ms']:8.1f} ms per image")
    print(
        f"  outputs differ by {figures['mean_abs_diff']} on average, "
        f"{figures['p99_abs_diff']} at the 99th percentile, {figures['max_abs_diff']} at most "
        f"(0..255 pixel units; tolerance: mean <= {TOLERANCE}) -> "
        + ("within tolerance" if figures["within_tolerance"] else "OUT OF TOLERANCE")
    )
    print(f"decode_over_naive: {figures['decode_over_naive']:.1f}x (target >= {TARGET}x)")
    met = figures["decode_over_naive"] >= TARGET and figures["within_tolerance"]
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
