"""The review app's screenshots in docs/ (review-grid.png, review-record.png, review-stats.png),
made from the real pages, so that they can be made again whenever the pages change.

After `make demo`: `.venv/bin/python -m tests.review_screenshots` (Debian's chromium on the
PATH). It serves a copy of the demo's database with the demo's image cache, adds four
decisions of a reviewer "ada" on the class map (an add, two rejects, an accept), and shoots
headless Chromium at 1280x800, driven as the browser tests drive it: the queue for "map" with
two tiles selected, the record view of the rejected map, and the stats.
"""

from __future__ import annotations

import argparse
import base64
import io
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import waitress.server
from PIL import Image

from enrichment.config import Settings
from enrichment.review.app import create_app
from enrichment.store.database import Database
from enrichment.store.decisions import NewDecision, record_decisions
from enrichment.store.review_queue import registered_models
from tests.test_report import DevTools

REPO = Path(__file__).resolve().parent.parent
WIDTH, HEIGHT = 1280, 800
# (record, decision) on the class map: as a curator's first minutes leave the queue.
DECISIONS = [
    ("/demo/clipart_blue_stamper_orbu_", "add"),
    ("/demo/clipart_as_carreau_jean_victor_b_", "reject"),
    ("/demo/clipart_world_map_02", "accept"),
    ("/demo/clipart_bottle_jean_victor_balin_", "reject"),
]


def settle(browser: DevTools, tab: str, condition: str) -> None:
    """Wait until the page's `condition` (a JavaScript expression) is true."""
    deadline = time.monotonic() + 60
    while not browser.evaluate(tab, condition):
        assert time.monotonic() < deadline, f"the page never got to {condition}"
        time.sleep(0.1)


def shoot(browser: DevTools, tab: str, height: int) -> bytes:
    """The page from its top, `height` pixels of it, as a PNG."""
    shot = browser.call(
        "Page.captureScreenshot",
        tab,
        format="png",
        clip={"x": 0, "y": 0, "width": WIDTH, "height": height, "scale": 1},
        captureBeyondViewport=True,
    )
    image = Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB")
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, default=Path("demo-output"))
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    args = parser.parse_args()
    if not (args.demo / "enrich.sqlite3").is_file():
        sys.exit(f"no {args.demo}/enrich.sqlite3: run `make demo` first")
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / "enrich.sqlite3"
        shutil.copyfile(args.demo / "enrich.sqlite3", copy)
        db = Database(f"sqlite:///{copy}")
        (version,) = registered_models(db)
        record_decisions(db, [NewDecision(r, "map", version, d, "ada") for r, d in DECISIONS])
        settings = Settings(database_url=db.url)
        app = create_app(db, settings, args.demo / "review-cache")
        server = waitress.server.create_server(app, host="127.0.0.1", port=0, threads=4)
        threading.Thread(target=server.run, daemon=True).start()
        url = f"http://127.0.0.1:{server.effective_port}"
        browser = DevTools(args.chromium, Path(scratch) / "profile")
        images = "Array.from(document.images).every(i => i.complete)"
        try:
            tab, _ = browser.load(f"{url}/queue?label=map&state=any", WIDTH)
            browser.evaluate(tab, "localStorage.setItem('enrichReviewer', 'ada'), true")
            tab, _ = browser.load(f"{url}/queue?label=map&state=any", WIDTH)
            settle(browser, tab, images)
            browser.evaluate(
                tab,
                "(() => { const t = document.querySelectorAll('.tile');"
                " t[5].click(); t[6].click(); window.scrollTo(0, 0); return true; })()",
            )
            grid = shoot(browser, tab, 1100)
            record, _ = browser.load(
                f"{url}/record?id={DECISIONS[1][0]}&model_version={version}", WIDTH
            )
            settle(browser, record, images)
            record_png = shoot(browser, record, HEIGHT)
            stats, _ = browser.load(f"{url}/stats", WIDTH)
            stats_png = shoot(browser, stats, HEIGHT)
        finally:
            browser.close()
            server.close()
            db.dispose()
    for name, png in (("grid", grid), ("record", record_png), ("stats", stats_png)):
        path = args.out / f"review-{name}.png"
        path.write_bytes(png)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
