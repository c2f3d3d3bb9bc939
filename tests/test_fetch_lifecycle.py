"""A fetcher's own threads and time budget: name lookups under the deadline, and a clean close.

A slow resolver is simulated in-process (socket.getaddrinfo replaced for one
made-up name, which then resolves to the local image host); every other name
and address resolves as usual.
"""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import wait
from http.server import BaseHTTPRequestHandler

import pytest

from enrichment.config import Settings
from enrichment.media.fetch import CANCELLED, PASSING, Fetcher, FetchResult
from tests.conftest import image_bytes
from tests.services import ImageHost
from tests.test_fetch import Server

PICTURE = image_bytes((30, 160, 60), "circle")
SLOW_NAME = "slow-dns.example.org"
KNOWN_NAME = "images.example.org"
BASE = Settings(
    fetch_allow=("127.0.0.1",),
    fetch_timeout=0.5,
    fetch_connect_timeout=5.0,
    fetch_read_timeout=5.0,
    batch_size=8,
)


@pytest.fixture
def host() -> Iterator[ImageHost]:
    server = ImageHost()
    yield server
    server.close()


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """SLOW_NAME answers only once the event is set; KNOWN_NAME at once; both are 127.0.0.1."""
    real = socket.getaddrinfo
    answer = threading.Event()

    def getaddrinfo(name: str, *args: object, **kwargs: object) -> list:
        if name == SLOW_NAME:
            answer.wait(60)
        if name in (SLOW_NAME, KNOWN_NAME):
            name = "127.0.0.1"
        return real(name, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield answer
    answer.set()


def named(url: str, name: str) -> str:
    return url.replace("127.0.0.1", name, 1)


def test_a_slow_resolver_is_a_timeout_within_the_deadline_and_frees_the_host(
    host: ImageHost, resolver: threading.Event
) -> None:
    urls = [named(host.add(f"/dns/{n}.png", PICTURE), SLOW_NAME) for n in range(3)]
    settings = dataclasses.replace(
        BASE, fetch_allow=("127.0.0.1", SLOW_NAME), fetch_host_limits=((SLOW_NAME, 1),)
    )
    with Fetcher(settings) as fetcher:
        began = time.monotonic()
        result = fetcher.fetch(urls[0])
        took = time.monotonic() - began
        assert result.error_reason == "timeout", result
        assert took < settings.fetch_timeout + 0.5, f"the lookup held the fetch {took:.2f} s"
        assert fetcher.pacer.hosts[SLOW_NAME].in_use == 0, "the host's slot is given back"
        # One download at a time at this host: each next one gets the slot when the
        # one before it gives up at its deadline, not when the resolver answers.
        began = time.monotonic()
        results = [f.result() for f in [fetcher.submit(fetcher.fetch, u) for u in urls[1:]]]
        took = time.monotonic() - began
        assert [r.error_reason for r in results] == ["timeout", "timeout"]
        assert took < 2 * settings.fetch_timeout + 1.0
    assert host.requests == [], "nothing was sent after the deadline"


def test_a_name_is_resolved_and_its_address_checked(
    host: ImageHost, resolver: threading.Event
) -> None:
    url = named(host.add("/named.png", PICTURE), KNOWN_NAME)
    with Fetcher(dataclasses.replace(BASE, fetch_allow=(KNOWN_NAME,))) as allowed:
        assert allowed.fetch(url).content == PICTURE
    with Fetcher(dataclasses.replace(BASE, fetch_allow=())) as guarded:
        result = guarded.fetch(url)
    assert result.error_reason == "blocked_address", result
    assert "127.0.0.1" in (result.error_message or "")
    assert host.requests == ["/named.png"], "the loopback address was refused before any request"


def loop_threads() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if thread.name == "fetch-loop"}


def test_leaving_the_with_block_stops_the_fetchers_threads(host: ImageHost) -> None:
    before = set(threading.enumerate())
    urls = [host.add(f"/with/{n}.png", PICTURE) for n in range(20)]
    with Fetcher(dataclasses.replace(BASE, fetch_timeout=5.0)) as fetcher:
        results = [f.result() for f in [fetcher.submit(fetcher.fetch, u) for u in urls]]
        assert all(result.content == PICTURE for result in results)
        assert len(loop_threads() - before) == 1, "one event loop, owned by this fetcher"
    # The image host's own request threads may still be closing their connections.
    left = [
        thread.name
        for thread in set(threading.enumerate()) - before
        if thread.is_alive() and "process_request_thread" not in thread.name
    ]
    assert [name for name in left if not name.startswith("resolve")] == []
    closed = fetcher.fetch(urls[0])
    assert closed.error_reason == CANCELLED, "a closed fetcher fetches nothing more"
    assert len(host.requests) == 20


def test_two_fetchers_do_not_share_an_event_loop(host: ImageHost) -> None:
    before = loop_threads()
    url = host.add("/two.png", PICTURE)
    with Fetcher(BASE) as first, Fetcher(BASE) as second:
        assert first.fetch(url).content == PICTURE
        assert second.fetch(url).content == PICTURE
        assert len(loop_threads() - before) == 2
    assert loop_threads() - before == set()


class Trickle:
    """Headers at once, then a body byte every 50 ms for 20 s; `started` once it is sending."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.over = threading.Event()
        self.completed = False

    def __call__(self, request: BaseHTTPRequestHandler) -> None:
        try:
            request.send_response(200)
            request.send_header("Content-Type", "image/png")
            request.send_header("Content-Length", "100000")
            request.end_headers()
            request.wfile.flush()
            self.started.set()
            for _ in range(400):
                request.wfile.write(b"a")
                request.wfile.flush()
                time.sleep(0.05)
            self.completed = True
        except OSError:
            pass  # the fetcher hung up
        finally:
            self.over.set()


def test_a_download_in_flight_when_closed_without_waiting_is_cancelled_at_once() -> None:
    """Not left to its deadline: a thread blocked in `fetch` on it (a harvest's) held the
    process's exit after Ctrl-C for as long. Cancelled, it is a failure that passes."""
    trickle = Trickle()
    server = Server("127.0.0.1")
    try:
        url = server.route("/trickle", trickle)
        before = loop_threads()
        fetcher = Fetcher(dataclasses.replace(BASE, fetch_timeout=60.0))
        in_flight = fetcher.submit(fetcher.fetch, url)
        assert trickle.started.wait(5)
        fetcher.close(wait=False)
        cancelled = in_flight.result(timeout=10)
        assert cancelled.error_reason == CANCELLED and CANCELLED in PASSING
        assert trickle.over.wait(5) and not trickle.completed
        for loop in loop_threads() - before:
            loop.join(timeout=5)
            assert not loop.is_alive(), "the event loop ends once its last download has"
    finally:
        server.close()


def test_closing_without_waiting_ends_every_fetch_then_future(host: ImageHost) -> None:
    """What was downloaded but not yet handed on is dropped, and its future says so: a
    caller waiting on it (the model stage) is never left waiting for ever."""
    urls = [host.add(f"/handed/{n}.png", PICTURE) for n in range(30)]
    fetcher = Fetcher(BASE)
    release = threading.Event()

    def slow(fetched: object) -> object:
        release.wait(5)  # every handler thread busy: the rest queue up behind them
        return fetched

    outcomes = [fetcher.fetch_then(url, slow) for url in urls]
    until = time.monotonic() + 10
    while len(host.requests) < len(urls) and time.monotonic() < until:
        time.sleep(0.02)
    fetcher.close(wait=False)
    release.set()
    done, pending = wait(outcomes, timeout=10)
    assert pending == set(), f"{len(pending)} futures never ended"
    assert any(outcome.cancelled() for outcome in done), "the queued ones were dropped"
    assert all(o.result().content == PICTURE for o in done if not o.cancelled())


def test_closing_with_waiting_hands_every_download_on(host: ImageHost) -> None:
    """Leaving the `with` block waits: downloads done but not yet handed on still are."""
    urls = [host.add(f"/waited/{n}.png", PICTURE) for n in range(12)]

    def slow(fetched: FetchResult) -> bytes | None:
        time.sleep(0.1)  # the handler threads fall behind the downloads
        return fetched.content

    with Fetcher(BASE) as fetcher:
        outcomes = [fetcher.fetch_then(url, slow) for url in urls]
    assert [outcome.result(timeout=0) for outcome in outcomes] == [PICTURE] * 12
