"""A labelled collection for harvest tests: Search API items with concepts, and their images.

Three concepts a small CNN can learn from pixels: `photograph` is a green
ground (against grey, blue and yellow ones), `drawing` a white circle, `map` a
white bar across. Records carry any combination of them, spread over eight
datasets, with a CC0, CC BY-NC or In Copyright rights statement in turn.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from tests.search_api import SearchAPI, generated_item

VOCABULARY = {
    "photograph": "http://data.europeana.eu/concept/base/48",
    "drawing": "http://data.europeana.eu/concept/base/35",
    "map": "http://data.europeana.eu/concept/base/43",
}
GREEN = (50, 170, 60)
OTHER_GROUNDS = [(128, 128, 128), (50, 70, 190), (210, 190, 60)]
RIGHTS = (
    "http://creativecommons.org/publicdomain/zero/1.0/",
    "http://creativecommons.org/licenses/by-nc/4.0/",
    "http://rightsstatements.org/vocab/InC/1.0/",
)


def picture(rng: np.random.Generator, labels: set[str], fmt: str = "PNG") -> bytes:
    ground = GREEN if "photograph" in labels else OTHER_GROUNDS[rng.integers(len(OTHER_GROUNDS))]
    colour = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in ground)
    image = Image.new("RGB", (48, 40), colour)
    draw = ImageDraw.Draw(image)
    if "drawing" in labels:
        r = int(rng.integers(7, 11))
        x, y = int(rng.integers(r, 48 - r)), int(rng.integers(r, 40 - r))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(255, 255, 255))
    if "map" in labels:
        y = int(rng.integers(6, 34))
        draw.rectangle((3, y - 2, 45, y + 2), fill=(255, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@dataclass
class Fixture:
    """What the local Search API serves: item id -> its true labels, its image path, its rights."""

    labels: dict[str, set[str]]
    paths: dict[str, str]
    rights: dict[str, str]


def fill(
    api: SearchAPI,
    add_image: Callable[[str, bytes], str],
    count: int,
    seed: int = 0,
    prefix: str = "h",
    first_dataset: int = 900,
    datasets: int = 8,
) -> Fixture:
    """`count` records with at least one label each, over `datasets` datasets; every
    third one multilabel."""
    rng = np.random.default_rng(seed)
    keys = list(VOCABULARY)
    fixture = Fixture({}, {}, {})
    for index in range(count):
        if index % 3 == 0:
            labels = {str(k) for k in rng.choice(keys, size=int(rng.integers(2, 4)), replace=False)}
        else:
            labels = {keys[int(rng.integers(len(keys)))]}
        path = f"/{prefix}/{index:04d}.png"
        url = add_image(path, picture(rng, labels))
        dataset = str(first_dataset + index % datasets)
        rights = RIGHTS[index % len(RIGHTS)]
        item = generated_item(
            dataset,
            index,
            url,
            concepts=tuple(VOCABULARY[key] for key in keys if key in labels),
            rights=rights,
        )
        api.items.append(item)
        fixture.labels[item["id"]] = labels
        fixture.paths[item["id"]] = path
        fixture.rights[item["id"]] = rights
    return fixture
