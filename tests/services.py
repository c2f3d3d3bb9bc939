"""Throwaway PostgreSQL and Redis servers, and a local image host, for the test session.

Servers are started from the installed binaries in temporary directories on
free ports, so the suite never touches (or depends on) servers already running
on the machine. `TEST_DATABASE_URL` / `TEST_REDIS_URL` use existing ones instead.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name) or ""]
    if not found[-1]:
        raise RuntimeError(f"PostgreSQL binary {name} not found; set TEST_DATABASE_URL")
    return found[-1]


def _as_postgres() -> list[str]:
    """initdb and postgres refuse to run as root; run them as the postgres user then."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


class PostgresServer:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="enrich-pg-"))
        self.root.chmod(0o755)
        self.data = self.root / "data"
        self.data.mkdir()
        if os.geteuid() == 0:
            shutil.chown(self.data, "postgres", "postgres")
        self.port = free_port()
        subprocess.run(
            [
                *_as_postgres(),
                _pg_bin("initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
        )
        self.start()

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c full_page_writes=off -c synchronous_commit=off"
        )
        subprocess.run(
            [
                *_as_postgres(),
                _pg_bin("pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.data / "server.log"),
                "-w",
                "-o",
                options,
                "start",
            ],
            check=True,
            capture_output=True,
        )

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(
            [*_as_postgres(), _pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"],
            check=False,
            capture_output=True,
        )

    def close(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


class RedisServer:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="enrich-redis-"))
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.root),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class Route:
    status: int = 200
    content_type: str = "image/png"
    body: bytes = b""
    delay: float = 0.0  # seconds before answering, as a slow provider would
    location: str | None = None  # a redirect's target


@dataclass
class ImageHost:
    """A local HTTP server with programmable routes, recording every request path.

    HTTP/1.1 with keep-alive and a deep listen backlog, so that the host itself is
    never what limits a client at high concurrency; `active` and `most` count the
    requests being answered at once (now, and at most since `reset_counts`).
    """

    routes: dict[str, Route] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    active: int = 0
    most: int = 0

    def __post_init__(self) -> None:
        host = self
        counting = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # The answer goes out in three writes (headers, body, last byte); with Nagle's
            # algorithm the last waits for the client's delayed ACK, about 40 ms a request,
            # so a host without latency would not be one.
            disable_nagle_algorithm = True

            def do_GET(self) -> None:
                host.requests.append(self.path)
                route = host.routes.get(self.path, Route(404, "text/plain", b"not found"))
                with counting:
                    host.active += 1
                    host.most = max(host.most, host.active)
                answered = False

                def finished() -> None:
                    nonlocal answered
                    if not answered:
                        answered = True
                        with counting:
                            host.active -= 1

                try:
                    if route.delay:
                        time.sleep(route.delay)
                    self.answer(route, finished)
                finally:
                    finished()

            def answer(self, route: Route, finished: Callable[[], None]) -> None:
                """The request stops counting just before its last byte goes out: the client
                cannot have the whole answer (and send its next request) before that, so a
                client that keeps to a limit is never seen above it."""
                body = route.body
                with contextlib.suppress(OSError):  # the client hung up (killed, or too slow)
                    self.send_response(route.status)
                    self.send_header("Content-Type", route.content_type)
                    self.send_header("Content-Length", str(len(body)))
                    if route.location is not None:
                        self.send_header("Location", route.location)
                    if not body:
                        finished()
                    self.end_headers()
                    if body:
                        self.wfile.write(body[:-1])
                        self.wfile.flush()
                        finished()
                        self.wfile.write(body[-1:])

            def log_message(self, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 1024
            daemon_threads = True

        self.server = Server((self.host, 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.server.server_port}{path}"

    def reset_counts(self) -> None:
        self.most = self.active

    def add(
        self,
        path: str,
        body: bytes,
        content_type: str = "image/png",
        status: int = 200,
        delay: float = 0.0,
        location: str | None = None,
    ) -> str:
        self.routes[path] = Route(status, content_type, body, delay, location)
        return self.url(path)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


class CeleryWorker:
    """A real worker started with `enrich worker` (Celery, prefork, one pool process)."""

    def __init__(self, env: dict[str, str], log_path: Path, argv: list[str] | None = None) -> None:
        import sys

        self.log_path = log_path
        self.log = log_path.open("a")
        self.process = subprocess.Popen(
            argv
            or [sys.executable, "-m", "enrichment", "worker", "--name", f"test-{log_path.stem}@%h"],
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            cwd=Path(__file__).resolve().parent.parent,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as on a machine of its own
        )
        with contextlib.suppress(AssertionError):  # reported below, with the worker's log
            wait_for(
                lambda: "ready." in self.output() or self.process.poll() is not None,
                90,
                "celery worker start",
            )
        if "ready." not in self.output():
            self.stop()
            raise RuntimeError("celery worker did not start:\n" + self.output())

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def pool_pids(self) -> list[int]:
        """The pool processes that run the batches (children of the main worker process)."""
        found = subprocess.run(
            ["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True, check=False
        )
        return [int(pid) for pid in found.stdout.split()]

    def kill(self) -> None:
        """SIGKILL the whole worker, main process and pool alike, as a crash or OOM would."""
        for pid in [*self.pool_pids(), self.process.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        self.process.wait(10)
        self.log.close()

    def kill_group(self) -> None:
        """SIGKILL the worker's whole process group at once: the machine is gone."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, 9)
        self.process.wait(10)
        self.log.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
