"""Run every benchmark in one process, print the machine, the figures and the summary lines.

    python benchmarks/run_all.py [--quick] [--only e2e,decode] [--results PATH]

The machine line comes first, then each benchmark's absolute figures as it
runs, then all the summary lines together (`name: value (target)`). Results go
to benchmarks/results/latest.json as well (or PATH). Exit status: 0 when every target is
met, 1 when one is missed, 2 when a benchmark failed to run (the others still run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import bench_db
import bench_decode
import bench_e2e
import bench_export
import bench_feed
import bench_scale
import bench_schedule
import common

RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"


@dataclass(frozen=True)
class Benchmark:
    title: str
    module: ModuleType
    report: Callable[[dict[str, Any]], list[str]]
    summary: Callable[[dict[str, Any]], list[common.Figure]]


def decode_report(figures: dict[str, Any]) -> list[str]:
    return [
        f"  {figures['images']} JPEGs of {figures['image_size']} ({figures['mean_file_mb']} MB) "
        f"to {figures['input_size']}x{figures['input_size']}, one thread, fastest of repeats",
        f"    naive (full decode, then resize): {figures['naive_ms']:8.1f} ms per image",
        f"    enrichment.media.decode.decode:         {figures['decode_ms']:8.1f} ms per image",
        f"    outputs differ by {figures['mean_abs_diff']} on average (0..255; tolerance "
        f"{figures['tolerance_mean_abs_diff']}), {figures['p99_abs_diff']} at the 99th percentile",
    ]


def decode_summary(figures: dict[str, Any]) -> list[common.Figure]:
    agreement = "outputs within tolerance" if figures["within_tolerance"] else "OUT OF TOLERANCE"
    return [
        common.Figure(
            "decode_over_naive",
            figures["decode_over_naive"],
            f">= {figures['target']}",
            note=agreement,
        )
    ]


def export_report(figures: dict[str, Any]) -> list[str]:
    lines = [f"  {figures['labels']:,} labels loaded with COPY in {figures['load_seconds']} s"]
    for name in ("small", "large"):
        part = figures[name]
        lines.append(
            f"    enrich export, {name:<5}: {part['annotations']:>9,} annotations in "
            f"{part['seconds']:6.1f} s, peak RSS {part['peak_rss_mb']:.1f} MB"
        )
    lines.append(
        f"    large file {figures['large_file_mb']} MB; {figures['export_rate_overall']:,} "
        "labels/s overall, start-up included"
    )
    return lines


def export_summary(figures: dict[str, Any]) -> list[common.Figure]:
    return [
        common.Figure(
            "export_rss_growth",
            figures["export_rss_growth"],
            f"<= {figures['rss_target']}",
            note="peak RSS exporting all labels over a tenth of them",
        ),
        common.Figure(
            "export_rate",
            figures["export_rate"],
            unit="labels/s",
            note="marginal rate: extra labels over extra seconds",
        ),
    ]


BENCHMARKS = {
    "decode": Benchmark("preprocessing (item 3)", bench_decode, decode_report, decode_summary),
    "e2e": Benchmark(
        "end to end vs model only and vs naive (items 1, 2)",
        bench_e2e,
        bench_e2e.report,
        bench_e2e.summary,
    ),
    "feed": Benchmark(
        "feeding the model from one host (issue 14)",
        bench_feed,
        bench_feed.report,
        bench_feed.summary,
    ),
    "db": Benchmark("database writes (item 4)", bench_db, bench_db.report, bench_db.summary),
    "schedule": Benchmark(
        "scheduler (item 6)", bench_schedule, bench_schedule.report, bench_schedule.summary
    ),
    "export": Benchmark("JSON-LD export (item 5)", bench_export, export_report, export_summary),
    "scale": Benchmark(
        "scale: pages and per-dataset commands at 10x the records (issue 24)",
        bench_scale,
        bench_scale.report,
        bench_scale.summary,
    ),
}


def write_results(path: Path, document: dict[str, Any]) -> None:
    """Write through a temporary file, so an interrupted run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the ~2-minute version")
    parser.add_argument(
        "--only", default=",".join(BENCHMARKS), help=f"comma-separated, of {', '.join(BENCHMARKS)}"
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"default: {RESULTS.name}")
    arguments = parser.parse_args(argv)
    chosen = [name.strip() for name in arguments.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    machine = common.machine()
    common.say(common.machine_line(machine))
    started = time.perf_counter()
    results: dict[str, Any] = {}
    figures: list[common.Figure] = []
    failed: list[str] = []
    for name in chosen:
        benchmark = BENCHMARKS[name]
        common.say(f"\n== {name}: {benchmark.title}{' (quick)' if arguments.quick else ''} ==")
        began = time.perf_counter()
        try:
            measured = benchmark.module.run(arguments.quick)
        except Exception:
            traceback.print_exc()
            failed.append(name)
            results[name] = {"error": traceback.format_exc()}
            continue
        for line in benchmark.report(measured):
            common.say(line)
        seconds = time.perf_counter() - began
        common.say(f"  ({seconds:.0f} s)")
        results[name] = {"seconds": round(seconds, 1), "figures": measured}
        figures.extend(benchmark.summary(measured))
    total = time.perf_counter() - started
    common.say(f"\n== summary ({'quick' if arguments.quick else 'full'} run, {total:.0f} s) ==")
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    common.say(f"load average now: {load} (1/5/15 min)")
    for figure in figures:
        common.say(figure.line())
    for name in failed:
        common.say(f"{name}: FAILED to run (traceback above)")
    write_results(
        arguments.results,
        {
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "quick": arguments.quick,
            "seconds": round(total, 1),
            "machine": machine,
            "summary": [figure.as_json() for figure in figures],
            "failed": failed,
            "benchmarks": results,
        },
    )
    common.say(f"results written to {arguments.results}")
    if failed:
        return 2
    return 0 if all(figure.met is not False for figure in figures) else 1


if __name__ == "__main__":
    sys.exit(main())
