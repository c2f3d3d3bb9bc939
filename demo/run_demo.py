"""`make demo`: the whole mission on real images, on the embedded default (SQLite, in-process).

1. A local Europeana Search API serves the demo collection (31 real images from
   Debian and PyPI packages, never used in training; see demo/sample/manifest.csv)
   in Europeana's response format with cursor paging, and an image host serves
   the images.
2. The real commands a user types: `enrich run --dataset demo` with the demo
   model the project trained itself (demo/model, see demo/train_model.sh),
   `enrich status`, `enrich export` as W3C JSON-LD and as Europeana-profile
   pages, and `enrich report`.
3. A table of labels per record next to the labels the manifest gives, and the
   paths written.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from demo.search_api import SearchAPI, generated_item

HERE = Path(__file__).resolve().parent
SAMPLE = HERE / "sample"
MODEL = HERE / "model"
OUT = Path("demo-output")
DATASET = "demo"
KEY = "demo-key"
REVIEW_CACHE = OUT / "review-cache"


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def collection() -> list[dict[str, str]]:
    with (SAMPLE / "manifest.csv").open(newline="") as handle:
        return [row for row in csv.DictReader(handle) if row["split"] == "collection"]


def enrich(*args: str, env: dict[str, str]) -> None:
    print(f"\n$ enrich {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "enrichment", *args], env=env, check=True)


def labels_table(env: dict[str, str], expected: dict[str, set[str]]) -> None:
    """Predicted labels next to the manifest's, with per-class agreement on this collection."""
    listing = subprocess.run(
        [sys.executable, "-m", "enrichment", "results", "--json"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    print(f"\n{'record':<46} {'labels (confidence)':<40} manifest")
    hits = {key: [0, 0, 0] for key in ("drawing", "map", "photograph")}  # tp, fp, fn
    for line in listing:
        result = json.loads(line)
        predicted = {label["key"]: label["confidence"] for label in result["labels"]}
        truth = expected[result["record_id"]]
        shown = (
            ", ".join(f"{key} {conf:.2f}" for key, conf in predicted.items()) or result["status"]
        )
        print(f"{result['record_id']:<46} {shown:<40} {' '.join(sorted(truth))}")
        for key, counts in hits.items():
            counts[0] += key in predicted and key in truth
            counts[1] += key in predicted and key not in truth
            counts[2] += key not in predicted and key in truth
    print(
        "\nagreement with the manifest on this collection (the model's test-set scores are in "
        "demo/model/EVALUATION.txt):"
    )
    for key, (tp, fp, fn) in hits.items():
        print(f"  {key:<11} {tp} right, {fp} wrongly added, {fn} missed")


def fill_review_cache(env: dict[str, str]) -> None:
    """Shrink every record's image into the review app's cache while the demo's image host
    still serves them, so that `enrich review` shows the demo's images after the demo."""
    from enrichment.bootstrap import open_database, read_settings
    from enrichment.review.images import SIZES, ImageCache
    from enrichment.store.review_queue import QueueFilter, items_by_record

    settings = read_settings(env)
    db = open_database(settings)
    cache = ImageCache(settings, REVIEW_CACHE)
    try:
        everything = QueueFilter(state="any", limit=500)
        for record in items_by_record(db, everything):
            if record.image_url:
                cache.get(record.image_url, next(iter(SIZES)))
    finally:
        cache.close()
        db.dispose()
    print(
        "\nreview the demo's labels (its images are cached, the image host is gone):\n"
        f"  DATABASE_URL={env['DATABASE_URL']} enrich review --cache-dir {REVIEW_CACHE}"
    )


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    images = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(SAMPLE)))
    threading.Thread(target=images.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{images.server_port}"
    api = SearchAPI(key=KEY)
    expected: dict[str, set[str]] = {}
    for index, row in enumerate(collection()):
        item = generated_item(DATASET, index, f"{base}/{row['image']}")
        item["id"] = f"/{DATASET}/{Path(row['image']).stem}"
        item["title"] = [row["source"]]
        item["dataProvider"] = [row["package"]]
        api.items.append(item)
        expected[item["id"]] = set(row["labels"].split())
    print(
        f"demo collection: {len(api.items)} records served as Europeana dataset '{DATASET}' "
        f"by a local Search API at {api.url}; images at {base}"
    )
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{OUT / 'enrich.sqlite3'}",
        "EUROPEANA_API_URL": api.url,
        "EUROPEANA_API_KEY": KEY,
        "ENRICH_MODEL": str(MODEL),
        "ENRICH_FETCH_ALLOW": "127.0.0.1",  # the demo's image host is local
        "ENRICH_BATCH_SIZE": "8",
    }
    try:
        enrich("model", "info", str(MODEL), env=env)
        enrich("run", "--dataset", DATASET, env=env)
        enrich("status", env=env)
        enrich("export", "--out", str(OUT / "annotations.jsonld"), env=env)
        enrich(
            "export",
            "--profile",
            "europeana",
            "--split",
            "10",
            "--out",
            str(OUT / "europeana" / "annotations.jsonld"),
            env=env,
        )
        enrich("report", "--out", str(OUT / "report"), env=env)
        fill_review_cache(env)
        labels_table(env, expected)
    finally:
        api.close()
        images.shutdown()
    print("\nwritten:")
    for path in sorted(OUT.rglob("*")):
        if path.is_file() and path.suffix in (".jsonld", ".html"):
            print(f"  {path}")


if __name__ == "__main__":
    main()
