"""Benchmark: streaming a large PostgreSQL label table to JSON-LD in constant memory.

Bulk-loads N labels (1,000,000; 100,000 with --quick) with COPY, then runs the
real `enrich export` in a child process twice: over a tenth of the labels and
over all of them. Memory must not grow with the number of annotations (peak RSS
of the child: its own VmHWM, read as it exits), and the marginal export rate
(extra labels over extra seconds, which cancels interpreter start-up) says how
fast it streams.

    BENCH_DATABASE_URL=postgresql+psycopg2://... python benchmarks/bench_export.py [--quick]

Without BENCH_DATABASE_URL a throwaway PostgreSQL server is started (tests/services).
A fresh database is created for the run and dropped afterwards. Not a test: it
measures time and memory, which the tests never do. `run(quick)` returns the figures.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from enrichment.store.database import Database  # noqa: E402
from enrichment.store.writes import register_model  # noqa: E402
from tests.services import PostgresServer  # noqa: E402

VERSION = "bench@000000000000"
LABELS = [
    {"key": "photograph", "label": "Photograph", "concept": "http://data.europeana.eu/concept/48"},
    {"key": "drawing", "label": "Drawing", "concept": "http://data.europeana.eu/concept/35"},
    {"key": "map", "label": "Map", "concept": "http://data.europeana.eu/concept/51"},
]
LABELS_PER_RECORD = 2
SMALL_DATASET, LARGE_DATASET = "9200001", "9200002"
COPY_CHUNK = 50_000
RSS_TARGET = 1.2


@contextmanager
def server_url() -> Iterator[str]:
    """BENCH_DATABASE_URL, or a throwaway local server."""
    if os.environ.get("BENCH_DATABASE_URL"):
        yield os.environ["BENCH_DATABASE_URL"]
        return
    server = PostgresServer()
    try:
        yield server.url
    finally:
        server.close()


@contextmanager
def fresh_database(base_url: str) -> Iterator[str]:
    name = f"bench_export_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(base_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sa.engine.make_url(base_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _copy(cursor, table: str, columns: str, lines: Iterator[str]) -> None:
    """COPY rows in chunks, so the loader's own memory stays small too."""
    buffer = io.StringIO()
    for count, line in enumerate(lines, 1):
        buffer.write(line)
        if count % COPY_CHUNK == 0:
            buffer.seek(0)
            cursor.copy_expert(f"COPY {table} ({columns}) FROM STDIN WITH (FORMAT csv)", buffer)
            buffer = io.StringIO()
    buffer.seek(0)
    cursor.copy_expert(f"COPY {table} ({columns}) FROM STDIN WITH (FORMAT csv)", buffer)


def load(url: str, labels: int) -> dict[str, int]:
    """Migrate, then COPY records, results and labels: a tenth in the small dataset."""
    db = Database(url)
    db.upgrade()
    with db.transaction() as session:
        register_model(session, VERSION, "bench", "resnet18", LABELS, [0.5, 0.5, 0.5])
    db.dispose()
    records = labels // LABELS_PER_RECORD
    small = records // 10

    def record_id(n: int) -> str:
        return f"/{SMALL_DATASET if n < small else LARGE_DATASET}/item_{n:08d}"

    raw = sa.create_engine(url).raw_connection()
    try:
        cursor = raw.cursor()
        _copy(
            cursor,
            "records",
            "id, dataset, item_uri, image_url, first_seen, last_seen",
            (
                # No item URI: the one its id gives, stored NULL as `upsert_records` does.
                f"{rid},{rid.split('/')[1]},,"
                f"https://images.example.org{rid}.jpg,2024-05-01 12:00:00,2024-05-01 12:00:00\n"
                for rid in map(record_id, range(records))
            ),
        )
        _copy(
            cursor,
            "results",
            # Each result flagged as the one that counts for its record, as `save_outcomes`
            # flags it (one version here, so its own); the export reads the flag.
            "record_id, model_version, status, scores, image_url, classified_at, is_current",
            (
                f'{rid},{VERSION},labelled,"{{0.{n % 9000 + 1000},0.{n % 7000 + 2000},0.1}}",'
                f"https://images.example.org{rid}.jpg,2024-05-01 12:00:00,t\n"
                for n, rid in enumerate(map(record_id, range(records)))
            ),
        )
        _copy(
            cursor,
            "labels",
            "record_id, model_version, label_key, concept, confidence",
            (
                f"{record_id(n)},{VERSION},{label['key']},{label['concept']},0.{n % 9000 + 1000}\n"
                for n in range(records)
                for label in LABELS[:LABELS_PER_RECORD]
            ),
        )
        cursor.execute("ANALYZE")
        raw.commit()
    finally:
        raw.close()
    return {"small": small * LABELS_PER_RECORD, "large": records * LABELS_PER_RECORD}


# The child's own high-water mark, written as it exits. wait4's ru_maxrss will not do:
# Linux carries the parent's size at fork across exec, so from a large parent
# (run_all.py, with torch loaded) both exports would report the parent's size.
PEAK_RSS_CHILD = """
import atexit, pathlib, runpy, sys
peak = pathlib.Path(sys.argv.pop(1))

def record() -> None:
    status = pathlib.Path("/proc/self/status").read_text()
    peak.write_text(status.split("VmHWM:")[1].split()[0])

atexit.register(record)
runpy.run_module("enrichment", run_name="__main__", alter_sys=True)
"""


def export_child(url: str, out: Path, *options: str) -> dict[str, float]:
    """Run `enrich export` as a child process; its wall time, peak RSS and annotation count."""
    log, peak = out.with_suffix(".log"), out.with_suffix(".peak")
    started = time.perf_counter()
    with log.open("w") as stderr:
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                PEAK_RSS_CHILD,
                str(peak),
                "export",
                "--out",
                str(out),
                *options,
            ],
            cwd=REPO,
            env={**os.environ, "DATABASE_URL": url},
            stderr=stderr,
        )
        code = child.wait()
    seconds = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"enrich export failed: {log.read_text()}")
    with out.open("rb") as handle:
        handle.seek(max(0, out.stat().st_size - 200))
        total = json.loads('{"last"' + handle.read().decode().rsplit(', "last"', 1)[1])["total"]
    peak_mb = int(peak.read_text()) / 1024  # VmHWM is in kB
    return {"seconds": seconds, "peak_rss_mb": peak_mb, "annotations": total}


def run(quick: bool) -> dict:
    """Load, export a tenth and the whole, and compare; returns the figures."""
    labels = 100_000 if quick else 1_000_000
    with server_url() as base, fresh_database(base) as url, tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        sizes = load(url, labels)
        load_seconds = time.perf_counter() - started
        small = export_child(url, Path(tmp) / "small.jsonld", "--dataset", SMALL_DATASET)
        large = export_child(url, Path(tmp) / "large.jsonld")
        size_mb = (Path(tmp) / "large.jsonld").stat().st_size / 1e6
    assert small["annotations"] == sizes["small"], (small, sizes)
    assert large["annotations"] == sizes["large"], (large, sizes)
    return {
        "labels": labels,
        "load_seconds": round(load_seconds, 1),
        "load_rate": round(labels / load_seconds),
        "small": small,
        "large": large,
        "large_file_mb": round(size_mb, 1),
        "export_rss_growth": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
        "rss_target": RSS_TARGET,
        "export_rate": round(
            (large["annotations"] - small["annotations"]) / (large["seconds"] - small["seconds"])
        ),
        "export_rate_overall": round(large["annotations"] / large["seconds"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100,000 labels instead of 1,000,000")
    figures = run(parser.parse_args(argv).quick)
    small, large = figures["small"], figures["large"]
    print(f"labels loaded:      {figures['labels']:,} in {figures['load_seconds']} s (COPY)")
    for name, part in (("small", small), ("large", large)):
        print(
            f"export {name:<5}       {part['annotations']:>9,} annotations in "
            f"{part['seconds']:6.1f} s, peak RSS {part['peak_rss_mb']:.1f} MB"
        )
    print(f"large file:         {figures['large_file_mb']} MB")
    print(f"overall rate:       {figures['export_rate_overall']} labels/s (incl. start-up)")
    print(f"export_rss_growth: {figures['export_rss_growth']:.2f} (target <= {RSS_TARGET})")
    print(f"export_rate: {figures['export_rate']} labels/s")
    return 0 if figures["export_rss_growth"] <= RSS_TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
