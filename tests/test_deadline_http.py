"""The publish client's per-call deadline and its pooled connections, against a real
local keep-alive server that counts the connections it is given."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from urllib3.util.retry import Retry

from enrichment.publish.deadline_http import CallDeadlines, DeadlineAdapter

BODY = b'{"ok": true}'


class KeepAliveHost:
    """HTTP/1.1 with keep-alive; `connections` counts the TCP connections accepted."""

    def __init__(self) -> None:
        self.connections = 0
        host = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                host.connections += 1
                super().setup()

            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(BODY)))
                self.end_headers()
                self.wfile.write(BODY)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/annotation"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def host() -> Iterator[KeepAliveHost]:
    server = KeepAliveHost()
    yield server
    server.close()


def test_a_connection_back_in_the_pool_is_not_shut_by_its_last_calls_deadline(
    host: KeepAliveHost,
) -> None:
    """A call's connection goes back to the pool as soon as its answer is read, while the
    call is still under its deadline. If the deadline passed just then, it used to shut
    that socket, which the next call (on another thread, in real use) may have taken
    already: its request then died with the socket. The next call now reuses it."""
    deadlines = CallDeadlines(30.0)
    session = requests.Session()
    session.mount("http://", DeadlineAdapter(deadlines, Retry(0), pool_maxsize=1))
    try:
        with deadlines.call() as deadline:
            assert session.get(host.url, timeout=5).content == BODY
            deadline.expire()  # the budget runs out with the connection already pooled
        with deadlines.call():
            assert session.get(host.url, timeout=5).content == BODY
        assert host.connections == 1, "the second call got the first call's connection, alive"
    finally:
        session.close()
        deadlines.close()
