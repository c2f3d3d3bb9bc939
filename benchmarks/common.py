"""What the benchmarks share: the machine line, the summary lines, throwaway servers, timing.

Every benchmark module imports this first: it puts the repository root on
`sys.path`, so `tests.services` (the same throwaway PostgreSQL and Redis the
tests use) is importable from a script in `benchmarks/`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import sqlalchemy as sa  # noqa: E402
import torch  # noqa: E402
from sqlalchemy import event  # noqa: E402

from enrichment.media.cpus import usable_cpus  # noqa: E402
from enrichment.model.spec import ClassSpec  # noqa: E402
from tests.services import PostgresServer, RedisServer, _as_postgres, _pg_bin  # noqa: E402

PEERS = Path(__file__).resolve().parent / "peers.py"
VOCABULARY: dict[str, str] = json.loads(
    (REPO / "enrichment" / "data" / "vocabulary.json").read_text(encoding="utf-8")
)


def vocabulary_labels(threshold: float = 0.5) -> tuple[ClassSpec, ...]:
    """The pilot's 20 classes, so every benchmark writes as many scores and labels as production."""
    return tuple(
        ClassSpec(key, key.replace("_", " ").capitalize(), concept, threshold)
        for key, concept in VOCABULARY.items()
    )


@dataclass(frozen=True)
class Figure:
    """One summary line: `name: value (target)`, and whether the target was met."""

    name: str
    value: float
    target: str | None = None  # ">= 0.9" or "<= 1.1"; None: reported, no target
    unit: str = "x"
    note: str = ""
    # The measurement did not finish (a timeout, a failure): its target counts as missed.
    incomplete: bool = False

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        if self.incomplete:
            return False
        operator, bound = self.target.split()
        return self.value >= float(bound) if operator == ">=" else self.value <= float(bound)

    def line(self) -> str:
        if self.unit == "x":
            value, suffix = f"{self.value:.2f}x", "x"
        else:
            value, suffix = f"{self.value:,.0f} {self.unit}", f" {self.unit}"
        parts = [f"target {self.target}{suffix}" if self.target else "reported, no target"]
        if self.note:
            parts.append(self.note)
        missed = "  <- MISSED" if self.met is False else ""
        return f"{self.name}: {value} ({'; '.join(parts)}){missed}"

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "target": self.target,
            "met": self.met,
            "note": self.note,
            "line": self.line(),
        }


def say(text: str) -> None:
    """Print at once: a full run takes minutes and its progress should show as it goes."""
    print(text, flush=True)


def machine() -> dict[str, Any]:
    """What the figures were measured on: they mean little without it."""
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown CPU",
    )
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpus": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "cpu_model": model,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average": [round(value, 2) for value in os.getloadavg()],
    }


def machine_line(info: dict[str, Any]) -> str:
    load = ", ".join(f"{value:.1f}" for value in info["load_average"])
    return (
        f"machine: {info['cpus']} CPUs ({info['usable_cpus']} usable; {info['cpu_model']}), "
        f"{info['memory_gib']} GiB, GPU: {info['gpu'] or 'none'}; Python {info['python']}, "
        f"torch {info['torch']}; load average {load} (1/5/15 min: other work on the machine "
        "slows both sides of every ratio)"
    )


def timed(function: Callable[[], Any]) -> tuple[float, Any]:
    """Wall-clock seconds of one call, and what it returned."""
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


class DurablePostgresServer(PostgresServer):
    """A throwaway PostgreSQL with its own defaults: fsync and synchronous commit on.

    tests/services turns both off so that tests run fast, which makes every
    commit nearly free: fine for a pipeline that commits once per batch, but it
    would flatter a writer that commits once per record. Production runs durable.
    """

    def start(self) -> None:
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1"
        pg_ctl = [_pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.data / "server.log")]
        subprocess.run(
            [*_as_postgres(), *pg_ctl, "-w", "-o", options, "start"],
            check=True,
            capture_output=True,
        )


class StatementClock:
    """Seconds spent in each kind of SQL statement on one engine, to show where a step waits.

    A kind is the verb and the table (`INSERT INTO results`, `SELECT FROM
    batches`). Commits are not statements: whatever a step spends outside
    these is commits and Python.
    """

    def __init__(self, engine: sa.Engine) -> None:
        self.seconds: dict[str, float] = {}
        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)

    def _before(self, connection: sa.Connection, *_: Any) -> None:
        connection.info["statement_started"] = time.perf_counter()

    def _after(self, connection: sa.Connection, _cursor: Any, statement: str, *_: Any) -> None:
        words = statement.split()
        if words[0] == "SELECT" and "FROM" in words:
            kind = f"SELECT FROM {words[words.index('FROM') + 1]}"
        else:
            kind = " ".join(words[: 3 if words[0] in ("INSERT", "DELETE") else 2])
        spent = time.perf_counter() - connection.info.pop("statement_started")
        self.seconds[kind] = self.seconds.get(kind, 0.0) + spent

    def largest(self, count: int = 4) -> dict[str, float]:
        ranked = sorted(self.seconds.items(), key=lambda item: -item[1])[:count]
        return {kind: round(seconds, 2) for kind, seconds in ranked}


@contextmanager
def database_server(durable: bool = False) -> Iterator[str]:
    """BENCH_DATABASE_URL (a server, or a sqlite:/// URL), else a throwaway PostgreSQL server.

    The throwaway server is the tests' (fsync off) unless `durable`.
    """
    if os.environ.get("BENCH_DATABASE_URL"):
        yield os.environ["BENCH_DATABASE_URL"]
        return
    server = DurablePostgresServer() if durable else PostgresServer()
    try:
        yield server.url
    finally:
        server.close()


@contextmanager
def fresh_database(base_url: str) -> Iterator[str]:
    """A new empty database on the server (a new file for SQLite), dropped afterwards."""
    base = sa.engine.make_url(base_url)
    if base.get_backend_name() == "sqlite":
        with tempfile.TemporaryDirectory(prefix="bench-db-") as directory:
            yield f"sqlite:///{directory}/bench.sqlite3"
        return
    name = f"bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def redis_server() -> Iterator[str]:
    server = RedisServer()
    try:
        yield server.url
    finally:
        server.close()


@contextmanager
def peers(*arguments: str) -> Iterator[dict[str, Any]]:
    """Run `peers.py` (image hosts or a Search API) in its own process; yields what it serves.

    A provider's server is another machine: in its own process its request
    handling does not take this process's GIL. It stops when its stdin closes.
    """
    process = subprocess.Popen(
        [sys.executable, str(PEERS), *arguments],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"peers.py {' '.join(arguments)} did not start")
        yield {**json.loads(line), "pid": process.pid}
    finally:
        assert process.stdin is not None
        process.stdin.close()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def process_cpu(pid: int) -> float:
    """Seconds of CPU (user and system) another process of this machine has spent so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stand_alone(
    doc: str,
    quick_help: str,
    run: Callable[[bool], dict[str, Any]],
    report: Callable[[dict[str, Any]], list[str]],
    summary: Callable[[dict[str, Any]], list[Figure]],
    argv: list[str] | None = None,
) -> int:
    """Run one benchmark module on its own: figures, then summary lines; 1 if a target is missed."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    started = time.perf_counter()
    figures = run(parser.parse_args(argv).quick)
    for line in report(figures):
        say(line)
    say(f"  ({time.perf_counter() - started:.0f} s)")
    lines = summary(figures)
    for line in lines:
        say(line.line())
    return 0 if all(line.met is not False for line in lines) else 1
