"""Local stand-ins for the remote peers, run in their own process by `common.peers`.

    python benchmarks/peers.py images HOSTS PATHS LATENCY
    python benchmarks/peers.py search RECORDS LATENCY

`images`: HOSTS image providers, each an `ImageHost` (tests/services) on its
own loopback address 127.0.0.10, .11, ..., serving /img/0.jpg .. /img/PATHS-1.jpg
(400x300 JPEG previews, Europeana's thumbnail size) after LATENCY seconds.
Every path's bytes differ (see `distinct`), as a collection's images do.
`search`: the local Search API (tests/search_api) over RECORDS generated
items, answering each page after LATENCY seconds.

Prints one JSON line saying where they listen, then serves until stdin closes.
Imports no torch: it starts in a fraction of a second and takes little memory.
"""

from __future__ import annotations

import io
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.search_api import SearchAPI, generated_item
from tests.services import ImageHost

PREVIEW_SIZE = (400, 300)
PICTURES = 8  # pictures; each path serves one of them with its own bytes
FIRST_HOST = 10  # 127.0.0.10: clear of 127.0.0.1, where the databases listen


def preview_jpeg(seed: int) -> bytes:
    """A photograph-like preview: smooth light, hard-edged shapes and grain, as JPEG q85.

    Flat colour would decode faster than a real photograph and flatter the pipeline.
    """
    rng = np.random.default_rng(seed)
    width, height = PREVIEW_SIZE
    light = rng.normal(128, 45, (6, 8, 3)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(light).resize(PREVIEW_SIZE, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(25):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = (int(v) for v in rng.integers(8, 120, size=2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x, y, x + w, y + h), fill=colour, outline=(20, 20, 20), width=2)
    image = image.filter(ImageFilter.GaussianBlur(0.6))
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 6, (height, width, 1))
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def distinct(jpeg: bytes, number: int) -> bytes:
    """The same picture with a JPEG comment naming `number`: its own SHA-256, the same decode.

    The pipeline sends identical images (by SHA-256) through the model once;
    a few pictures repeated byte for byte would measure that shortcut instead.
    """
    comment = f"image {number}".encode()
    return jpeg[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + jpeg[2:]


def image_hosts(hosts: int, paths: int, latency: float) -> tuple[list[ImageHost], dict[str, Any]]:
    pictures = [preview_jpeg(seed) for seed in range(PICTURES)]
    bodies = [distinct(pictures[number % len(pictures)], number) for number in range(paths)]
    servers = [ImageHost(host=f"127.0.0.{FIRST_HOST + index}") for index in range(hosts)]
    for server in servers:
        for number, body in enumerate(bodies):
            server.add(f"/img/{number}.jpg", body, "image/jpeg", delay=latency)
    return servers, {"hosts": [server.url("") for server in servers]}


@dataclass
class PagedSearchAPI(SearchAPI):
    """The test Search API with a provider's latency per page, and its selection made once.

    The test server sorts and filters all its items on every request, which at
    100,000 items costs tens of milliseconds the real API does not spend:
    without the cache that cost, not the latency, would set the pace.
    """

    latency: float = 0.02
    selections: dict[tuple[str, tuple[str, ...]], list[dict[str, Any]]] = field(
        default_factory=dict
    )

    def answer(self, path: str, params: dict[str, list[str]]) -> tuple[int, dict[str, str], bytes]:
        time.sleep(self.latency)
        return super().answer(path, params)

    def select(self, query: str, filters: list[str]) -> list[dict[str, Any]]:
        key = (query, tuple(filters))
        if key not in self.selections:
            self.selections[key] = super().select(query, filters)
        return self.selections[key]


def search_api(records: int, latency: float) -> tuple[list[SearchAPI], dict[str, Any]]:
    items = [
        generated_item("9100001", index, f"http://127.0.0.1/{index}.jpg")
        for index in range(records)
    ]
    api = PagedSearchAPI(items=items, latency=latency)
    return [api], {"url": api.url}


def main(argv: list[str]) -> None:
    kind, *numbers = argv
    if kind == "images":
        servers, where = image_hosts(int(numbers[0]), int(numbers[1]), float(numbers[2]))
    else:
        servers, where = search_api(int(numbers[0]), float(numbers[1]))
    print(json.dumps(where), flush=True)
    sys.stdin.read()
    for server in servers:
        server.close()


if __name__ == "__main__":
    main(sys.argv[1:])
