"""Shared fixtures: real PostgreSQL and Redis servers per test session, a local
image host, a tiny model in the real model-directory format, and CLI runners."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path

from enrichment.media.cpus import usable_cpus

# The suite runs in TEST_WORKERS processes (pytest-xdist) on few cores. torch sizes its CPU
# thread pool to the whole machine in each of them and in each `enrich` they start, and the
# pools oversubscribe the cores (their threads spin while they wait): the training fixture
# took 89 s beside one busy process with 2 threads, 41 s with 1 (25 and 29 s on an idle
# machine). Each worker process gets its share, unless OMP_NUM_THREADS is set already; set
# before torch is imported, which reads it once.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault(
        "OMP_NUM_THREADS",
        str(max(1, usable_cpus() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))),
    )

import pytest
import redis
import sqlalchemy as sa
import torch
from PIL import Image, ImageDraw

from enrichment.model.classifier import build_network, save_model_dir
from enrichment.model.spec import ClassSpec, ModelSpec
from enrichment.store.database import Database
from tests.services import ImageHost, PostgresServer, RedisServer

REPO = Path(__file__).resolve().parent.parent
VOCABULARY: dict[str, str] = json.loads(
    (REPO / "enrichment" / "data" / "vocabulary.json").read_text()
)


# The test files that take longest, longest first (seconds in one full run on 2 cores:
# `make test` with `--durations=0`, summed per file). pytest-xdist hands whole files
# (`--dist loadfile`) to the test processes: by default those with the most tests first,
# in collection order with `--no-loadscope-reorder` (the Makefile's). In name order these
# came last, and by number of tests a long file of few (test_worker_recovery) did: one
# process worked through it while the other had nothing left. Sent first, the rest fills
# in around them.
LONGEST_FIRST = (  # seconds measured with --durations=0 on 7 December, 2 workers
    "test_worker_runtime.py",  # 199
    "test_review_scale.py",  # 104
    "test_harvest_recipe.py",  # 87
    "test_demo.py",  # 68
    "test_training.py",  # 60
    "test_rolling_upgrade.py",  # 56
    "test_run_on_celery.py",  # 49
    "test_europeana_source.py",  # 45
    "test_record_bytes.py",  # 43
    "test_lookups.py",  # 41
    "test_host_limits.py",  # 40
    "test_run_in_process.py",  # 37
    "test_worker_recovery.py",  # 35: last in name order, it ran alone at the end
    "test_publish_hostile.py",  # 33
    "test_feed_overlap.py",  # 29
    "test_run_move.py",  # 22
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest files first (`LONGEST_FIRST`), every other in its place after them."""
    rank = {name: place for place, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer | str]:
    if os.environ.get("TEST_DATABASE_URL"):
        yield os.environ["TEST_DATABASE_URL"]
        return
    server = PostgresServer()
    yield server
    server.close()


@pytest.fixture
def pg_url(postgres: PostgresServer | str) -> str:
    """A new, empty PostgreSQL database for one test."""
    base = postgres if isinstance(postgres, str) else postgres.url
    name = f"t_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return sa.engine.make_url(base).set(database=name).render_as_string(hide_password=False)


def upgraded_database(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    """An empty database at this code's schema, of the dialect a fixture parametrised with
    "sqlite" or "postgresql" asks for (`request.param`)."""
    url = (
        f"sqlite:///{tmp_path}/test.sqlite3"
        if request.param == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    db = Database(url)
    db.upgrade()
    return db


@pytest.fixture(scope="session")
def redis_process() -> Iterator[RedisServer | str]:
    if os.environ.get("TEST_REDIS_URL"):
        yield os.environ["TEST_REDIS_URL"]
        return
    server = RedisServer()
    yield server
    server.close()


@pytest.fixture
def redis_server(redis_process: RedisServer | str) -> RedisServer | str:
    """The session's Redis, emptied: a message an earlier test left in a queue (a batch id
    of its own database) must not reach this test's workers, whose batch ids are the same."""
    url = redis_process if isinstance(redis_process, str) else redis_process.url
    redis.Redis.from_url(url).flushall()
    return redis_process


@pytest.fixture(scope="session")
def image_host() -> Iterator[ImageHost]:
    host = ImageHost()
    yield host
    host.close()


def image_bytes(colour: tuple[int, int, int], shape: str = "none", fmt: str = "PNG") -> bytes:
    """A small generated picture: a coloured ground with an optional white shape."""
    image = Image.new("RGB", (96, 72), colour)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse((20, 10, 70, 60), fill=(255, 255, 255))
    elif shape == "bar":
        draw.rectangle((10, 30, 86, 42), fill=(255, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def make_tiny_model(directory: Path, name: str = "tiny", seed: int = 0) -> str:
    """A small random-weights model in the real format. Returns its version.

    The head is scaled so that `photograph` and `drawing` depend strongly on the
    image (some records get one, both or none) and `map` never reaches its threshold.
    """
    torch.manual_seed(seed)
    labels = (
        ClassSpec("photograph", "Photograph", VOCABULARY["photograph"], 0.5),
        ClassSpec("drawing", "Drawing", VOCABULARY["drawing"], 0.5),
        ClassSpec("map", "Map", VOCABULARY["map"], 0.5),
    )
    network = build_network("resnet18", len(labels))
    head = network.fc
    with torch.no_grad():
        head.weight.mul_(20.0)
        head.bias.copy_(torch.tensor([1.0, 0.0, -8.0]))
    spec = ModelSpec(name=name, architecture="resnet18", input_size=32, classes=labels)
    return save_model_dir(directory, spec, network)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("model")
    make_tiny_model(directory)
    return directory


def empty_database(path: Path) -> str:
    """The URL of a new SQLite database at `path`, at this code's schema: only a run creates
    one, and a command that reads refuses a file that does not exist."""
    url = f"sqlite:///{path}"
    db = Database(url)
    db.ensure_schema()
    db.dispose()
    return url


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def enrich(
    *args: str, env: dict[str, str], cwd: Path | None = None, timeout: float = 180
) -> subprocess.CompletedProcess:
    """Run the real `enrich` command line in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "enrichment", *args],
        env={**os.environ, **env},
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def pseudo_terminal() -> tuple[int, int]:
    """(controller, terminal) of a pseudo-terminal of 24 rows of 120 columns, for a command
    that behaves as it does for a person at one (tqdm draws nothing at a width of 0)."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    return controller, terminal


def read_terminal(controller: int, until: bytes | None = None, timeout: float = 180) -> bytes:
    """What the terminal showed: up to `until` (and what came with it), or all of it once
    its other end is closed."""
    shown = b""
    deadline = time.monotonic() + timeout
    while until is None or until not in shown:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the terminal did not show {until!r}; it showed {shown[-300:]!r}")
        ready, _, _ = select.select([controller], [], [], left)
        if not ready:
            continue
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the other end is closed and all was read
            break
        if not chunk:
            break
        shown += chunk
    return shown


def enrich_here(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`enrich` run in this process by click's runner, answered as `enrich` answers: for
    tests of what a command does, where its own test already runs it in a subprocess. Each
    subprocess costs a new interpreter and, for `run`, torch's import: 4-6 s here."""
    from click.testing import CliRunner

    from enrichment.cli import cli

    result = CliRunner().invoke(cli, list(args), env=env)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, stderr)
