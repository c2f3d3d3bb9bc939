"""`make demo`: the whole job on the embedded default (SQLite, in-process), end to end.

It serves a small generated sample collection from a local HTTP server, makes
a placeholder model directory (random weights: it shows the plumbing, not
useful labels), then runs the real `enrich` commands a user would type and
prints where the JSON-LD went.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from enrichment.model import LabelSpec, ModelSpec, build_network, save_model_dir

OUT = Path("demo-output")
VOCABULARY = Path(__file__).resolve().parent.parent / "enrichment" / "data" / "vocabulary.json"


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def sample_images(directory: Path) -> list[str]:
    """Twelve small pictures: line drawings and colour fields."""
    directory.mkdir(parents=True)
    names = []
    for index in range(12):
        image = Image.new(
            "RGB", (320, 240), (250, 248, 240) if index % 2 else (40 + 15 * index, 90, 160)
        )
        draw = ImageDraw.Draw(image)
        for step in range(index + 2):
            offset = 12 * step
            draw.line((offset, 20, 300 - offset, 220), fill=(20, 20, 20), width=3)
            draw.ellipse(
                (100 + offset // 2, 60, 200, 160 - offset // 3), outline=(120, 30, 30), width=2
            )
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        name = f"object_{index:02d}.jpg"
        (directory / name).write_bytes(buffer.getvalue())
        names.append(name)
    return names


def placeholder_model(directory: Path) -> str:
    vocabulary = json.loads(VOCABULARY.read_text())
    keys = ["photograph", "drawing", "map"]
    labels = tuple(LabelSpec(key, key.capitalize(), vocabulary[key], 0.5) for key in keys)
    torch.manual_seed(7)
    network = build_network("resnet18", len(labels))
    spec = ModelSpec(
        name="demo-placeholder",
        architecture="resnet18",
        input_size=64,
        labels=labels,
        metrics={
            "note": "random weights: a placeholder that shows the pipeline, not a trained model"
        },
    )
    return save_model_dir(directory, spec, network)


def enrich(*args: str, env: dict[str, str]) -> None:
    print(f"\n$ enrich {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "enrichment", *args], env=env, check=True)


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    names = sample_images(OUT / "images")
    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(QuietHandler, directory=str(OUT / "images"))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    records = OUT / "records.jsonl"
    with records.open("w") as handle:
        for name in names:
            record = {
                "id": f"/demo/{name.removesuffix('.jpg')}",
                "image_url": f"{base}/{name}",
                "provider": "Demo",
            }
            handle.write(json.dumps(record) + "\n")
    version = placeholder_model(OUT / "model")
    print(f"sample: {len(names)} records in {records}, images served at {base}; model {version}")

    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{OUT / 'enrich.sqlite3'}",
        "ENRICH_MODEL": str(OUT / "model"),
        "ENRICH_FETCH_ALLOW": "127.0.0.1",  # the demo's image host is local
    }
    try:
        enrich("run", "--records", str(records), "--batch-size", "4", env=env)
        enrich("status", env=env)
        enrich("results", env=env)
        enrich("export", "--out", str(OUT / "annotations.jsonld"), env=env)
    finally:
        server.shutdown()
    print(f"\nW3C JSON-LD written to {OUT / 'annotations.jsonld'}")


if __name__ == "__main__":
    main()
