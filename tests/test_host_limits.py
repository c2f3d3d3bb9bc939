"""Per-host limits against a real local host that counts the requests it answers at once."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from enrichment.config import DEFAULT_HOST_LIMITS, Settings
from enrichment.errors import ConfigError
from enrichment.media import hosts
from enrichment.media.fetch import Fetcher
from enrichment.media.hosts import DOWN_AFTER, DOWN_FOR, HostDown, HostPacer
from tests.conftest import image_bytes
from tests.services import ImageHost
from tests.test_host_turns import held

PICTURE = image_bytes((10, 120, 200), "bar")
BASE = Settings(fetch_allow=("127.0.0.1",), fetch_timeout=10.0, batch_size=8)


@pytest.fixture
def host() -> Iterator[ImageHost]:
    server = ImageHost()
    yield server
    server.close()


def fetch_all(settings: Settings, urls: list[str]) -> tuple[Fetcher, list[str | None]]:
    fetcher = Fetcher(settings)
    try:
        futures = [fetcher.submit(fetcher.fetch, url) for url in urls]
        return fetcher, [future.result().error_reason for future in futures]
    finally:
        fetcher.close()


def test_an_override_is_the_limit_and_is_reached(host: ImageHost) -> None:
    urls = [host.add(f"/override/{n}.png", PICTURE, delay=0.3) for n in range(30)]
    settings = dataclasses.replace(BASE, fetch_host_limits=(("127.0.0.1", 6),))
    fetcher, reasons = fetch_all(settings, urls)
    assert reasons == [None] * 30
    assert host.most == 6, "the override is both honoured and used"
    assert fetcher.pacer.hosts["127.0.0.1"].most == 6


@pytest.fixture
def other_host() -> Iterator[ImageHost]:
    """A second host, on its own loopback address: where redirects send the fetcher."""
    server = ImageHost(host="127.0.0.2")
    yield server
    server.close()


def redirected(
    origin: ImageHost, target: ImageHost, prefix: str, count: int, delay: float
) -> list[str]:
    """`count` URLs at `origin` that each redirect to an image of its own at `target`."""
    return [
        origin.add(
            f"/{prefix}/{n}",
            b"",
            "text/plain",
            status=302,
            location=target.add(f"/{prefix}/{n}.png", PICTURE, delay=delay),
        )
        for n in range(count)
    ]


TWO_HOSTS = dataclasses.replace(BASE, fetch_allow=("127.0.0.1", "127.0.0.2"))


def test_a_host_reached_through_redirects_keeps_its_own_limit(
    host: ImageHost, other_host: ImageHost
) -> None:
    """The first host may be asked 20 at once; the one it redirects to bears 2."""
    urls = redirected(host, other_host, "cdn", 20, delay=0.2)
    limits = (("127.0.0.1", 20), ("127.0.0.2", 2))
    fetcher, reasons = fetch_all(dataclasses.replace(TWO_HOSTS, fetch_host_limits=limits), urls)
    assert reasons == [None] * 20
    assert other_host.most == 2, "the target's own limit, reached and never passed"
    assert fetcher.pacer.hosts["127.0.0.2"].most == 2


def test_a_redirect_gives_its_first_hosts_turn_back(host: ImageHost, other_host: ImageHost) -> None:
    """A first host that bears one request at a time is not held while its redirects'
    slow target answers: the target is asked as many at once as its own limit lets."""
    urls = redirected(host, other_host, "slow", 6, delay=0.3)
    limits = (("127.0.0.1", 1), ("127.0.0.2", 6))
    fetcher, reasons = fetch_all(dataclasses.replace(TWO_HOSTS, fetch_host_limits=limits), urls)
    assert reasons == [None] * 6
    assert host.most == 1
    assert other_host.most > 1, "the first host's one turn was held through the slow download"
    assert fetcher.pacer.hosts["127.0.0.1"].in_use == fetcher.pacer.hosts["127.0.0.2"].in_use == 0


def test_two_hosts_redirecting_to_each_other_at_one_at_a_time_both_finish(
    host: ImageHost, other_host: ImageHost
) -> None:
    """No download holds one host's turn while it waits for the other's, so neither waits
    for ever on the other (each host bears one request at a time)."""
    urls = redirected(host, other_host, "there", 6, delay=0.05)
    urls += redirected(other_host, host, "back", 6, delay=0.05)
    limits = (("127.0.0.1", 1), ("127.0.0.2", 1))
    settings = dataclasses.replace(TWO_HOSTS, fetch_host_limits=limits, fetch_timeout=20.0)
    _, reasons = fetch_all(settings, urls)
    assert reasons == [None] * 12
    assert host.most == other_host.most == 1


def test_an_unknown_host_never_goes_past_the_per_host_ceiling(host: ImageHost) -> None:
    urls = [host.add(f"/ceiling/{n}.png", PICTURE, delay=0.05) for n in range(200)]
    settings = dataclasses.replace(BASE, fetch_per_host=2, fetch_per_host_max=5)
    fetcher, reasons = fetch_all(settings, urls)
    assert reasons == [None] * 200
    assert host.most <= 5
    assert fetcher.pacer.hosts["127.0.0.1"].limit > 2, "a host that keeps pace is let up"


def test_a_host_that_slows_down_under_load_is_not_pushed(host: ImageHost) -> None:
    """A small server that queues: each request waits for the ones ahead of it."""
    fetcher = Fetcher(dataclasses.replace(BASE, fetch_per_host=2, fetch_per_host_max=32))
    limit = fetcher.pacer.host("127.0.0.1")
    try:
        for _window in range(6):  # windows whose answers slow down as concurrency rises
            for _ in range(max(16, 2 * limit.limit)):
                fetcher.pacer.record(limit, "ok", time.monotonic(), 0.1 * limit.limit, None)
    finally:
        fetcher.close()
    assert limit.limit <= 4, limit


def test_a_429_and_503_storm_lowers_concurrency_and_it_recovers(host: ImageHost) -> None:
    settings = dataclasses.replace(BASE, fetch_host_limits=(("127.0.0.1", 8),), fetch_timeout=1.0)
    fetcher = Fetcher(settings)
    try:
        storm = [
            host.add(f"/storm/{n}.png", b"busy", "text/plain", status=(429, 503)[n % 2])
            for n in range(10)
        ]
        results = [f.result() for f in [fetcher.submit(fetcher.fetch, url) for url in storm]]
        assert {r.error_reason for r in results} <= {"http_429", "http_503"}, (
            "a retry cut short by the deadline keeps the host's own answer"
        )
        limit = fetcher.pacer.hosts["127.0.0.1"]
        assert limit.limit <= 2, "each round of busy answers halves the limit"
        calm = [host.add(f"/calm/{n}.png", PICTURE) for n in range(400)]
        host.reset_counts()
        results = [f.result() for f in [fetcher.submit(fetcher.fetch, url) for url in calm]]
        failed = [(r.error_reason, r.error_message) for r in results if r.error_reason]
        assert failed == [], failed[:3]
        assert limit.limit == 8, "the limit grows back to the override once the host is well"
        assert host.most <= 8
    finally:
        fetcher.close()


def test_busy_answers_to_requests_sent_before_a_cut_do_not_cut_again() -> None:
    """A burst of 429s from a host's 64 downloads in flight is one signal, not 64."""
    pacer = HostPacer(start=4, ceiling=64, overrides=(("h", 64),), total=64, max_pause=1)
    limit = pacer.host("h")
    sent = time.monotonic()
    for _ in range(64):
        pacer.record(limit, "busy", sent, None, None)
    assert limit.limit == 32
    pacer.record(limit, "busy", limit.cut_at + 0.001, None, None)
    assert limit.limit == 16, "a request sent after the cut that is refused again cuts again"


def test_retry_after_pauses_the_host() -> None:
    pacer = HostPacer(start=4, ceiling=4, overrides=(), total=10, max_pause=0.5)

    async def refused() -> None:
        async with held(pacer, "h") as slot:
            slot.report("busy", time.monotonic(), None, 3600.0)

    asyncio.run(refused())
    limit = pacer.hosts["h"]
    assert limit.limit == 2
    assert 0 < limit.paused_until - time.monotonic() <= 0.5, "capped"


def test_wildcards_and_the_europeana_default() -> None:
    pacer = HostPacer(
        start=4,
        ceiling=64,
        overrides=(("*.example.org", 2), ("img.example.org", 50), *DEFAULT_HOST_LIMITS),
        total=64,
        max_pause=1,
    )
    assert pacer.override_for("img.example.org") == 2, "the first match wins"
    assert pacer.override_for("example.org") == 2
    assert pacer.override_for("badexample.org") is None
    assert pacer.override_for("api.europeana.eu") == 256
    defaults = Settings.from_env({})
    assert defaults.fetch_host_limits == DEFAULT_HOST_LIMITS
    operator = Settings.from_env({"ENRICH_FETCH_HOST_LIMITS": "api.europeana.eu=64,*.Museum.org=2"})
    assert operator.fetch_host_limits[:2] == (("api.europeana.eu", 64), ("*.museum.org", 2))


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("ENRICH_FETCH_HOST_LIMITS", "api.europeana.eu", "HOST=N"),
        ("ENRICH_FETCH_HOST_LIMITS", "api.europeana.eu=0", "HOST=N"),
        ("ENRICH_FETCH_HOST_LIMITS", "a b=3", "HOST=N"),
        ("ENRICH_FETCH_HOST_LIMITS", "x=1.5", "HOST=N"),
        ("ENRICH_FETCH_ALLOW", "127.0.0.1/33", "not a valid address or network"),
        ("ENRICH_FETCH_ALLOW", "10.0.0.256", "not a valid address or network"),
        ("ENRICH_FETCH_ALLOW", "http://images.example.org", "not a valid address or network"),
        ("ENRICH_FETCH_ALLOW", "images example", "not a host name"),
        ("ENRICH_FETCH_TIMEOUT", "nan", "finite"),
        ("ENRICH_FETCH_TIMEOUT", "inf", "finite"),
        ("ENRICH_FETCH_READ_TIMEOUT", "-inf", "finite"),
        ("ENRICH_HEARTBEAT_INTERVAL", "NaN", "finite"),
        ("ENRICH_FETCH_PER_HOST_MAX", "2", "below ENRICH_FETCH_PER_HOST"),
    ],
)
def test_bad_fetch_settings_are_one_line_errors(name: str, value: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says) as raised:
        Settings.from_env({name: value})
    assert "\n" not in str(raised.value) and name in str(raised.value)


def test_cli_refuses_a_bad_allow_list_at_start_up(tmp_path) -> None:
    from tests.conftest import enrich

    result = enrich("status", env={"ENRICH_FETCH_ALLOW": "127.0.0.1/33"}, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        next(line for line in result.stderr.splitlines() if "127.0.0.1/33" in line)
    ]


@dataclass
class SilentHost:
    """A server that takes every connection and never answers (a hung museum server) until
    it is told to `answer`: then it answers each request with an image."""

    listener: socket.socket = field(
        default_factory=lambda: socket.create_server(("127.0.0.1", 0), backlog=1024)
    )
    taken: list[socket.socket] = field(default_factory=list)
    answering: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        threading.Thread(target=self._take, daemon=True).start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def _take(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                connection = self.listener.accept()[0]
                self.taken.append(connection)
                if self.answering.is_set():
                    threading.Thread(target=self._answer, args=(connection,)).start()

    def _answer(self, connection: socket.socket) -> None:
        with contextlib.suppress(OSError), connection:
            request = b""
            while b"\r\n\r\n" not in request:
                request += connection.recv(4096)
            head = f"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {len(PICTURE)}"
            connection.sendall(f"{head}\r\nConnection: close\r\n\r\n".encode() + PICTURE)

    def close(self) -> None:
        self.listener.close()
        for connection in self.taken:
            connection.close()


@pytest.fixture
def silent() -> Iterator[SilentHost]:
    server = SilentHost()
    yield server
    server.close()


def test_a_host_that_answers_nothing_is_not_asked_again_for_a_while(silent: SilentHost) -> None:
    """Halving alone took a silent host to one download at a time, each waiting out its whole
    deadline (32 images: 28 s at a 1 s deadline; a dataset of thousands: a day). After
    `DOWN_AFTER` silent tries the rest end at once, and the host is asked no more. With
    the defaults' shape (the read timeout half the deadline), so that a retry cut short by
    the deadline counts as silence too, not as news."""
    settings = dataclasses.replace(BASE, fetch_timeout=1.0, fetch_read_timeout=0.5)
    fetcher, reasons = fetch_all(settings, [f"{silent.base}/hung/{n}.jpg" for n in range(40)])
    assert "host_unreachable" in reasons and set(reasons) <= {"timeout", "host_unreachable"}
    assert reasons.count("timeout") <= DOWN_AFTER
    # Two tries a download before (80 connections); now those under way when it went down.
    assert len(silent.taken) < 2 * DOWN_AFTER, "no request went to the host once it was down"
    [outage] = fetcher.pacer.outages.values()
    assert outage.until > time.monotonic() and outage.length == DOWN_FOR
    assert f"none of the last {outage.unanswered} requests" in str(HostDown(outage))


def test_a_host_of_its_own_is_waited_for_and_probed_one_download_at_a_time(
    silent: SilentHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's own source (a limit of its own: the thumbnail service) is not given up on:
    downloads wait out its outage, one probes it at a time, and when it answers again
    they all come, instead of thousands of records failing during a blip."""
    monkeypatch.setattr(hosts, "DOWN_FOR", 0.3)
    settings = dataclasses.replace(
        BASE, fetch_timeout=3.0, fetch_read_timeout=0.5, fetch_host_limits=(("127.0.0.1", 4),)
    )
    fetcher = Fetcher(settings)
    try:
        futures = [
            fetcher.fetch_then(f"{silent.base}/wait/{n}.jpg", lambda r: r) for n in range(24)
        ]
        deadline = time.monotonic() + 30
        while not fetcher.pacer.outages and time.monotonic() < deadline:
            time.sleep(0.01)
        [outage] = fetcher.pacer.outages.values()
        while outage.until == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        asked_when_down = len(silent.taken)
        time.sleep(1.0)
        probes = len(silent.taken) - asked_when_down
        silent.answering.set()
        reasons = [future.result(timeout=30).error_reason for future in futures]
    finally:
        fetcher.close()
    assert outage.length > 0 or outage.unanswered == 0
    # One probe (two at most in a second), with a connection or two of the downloads under
    # way when it went down: not the twenty waiting downloads at once.
    assert probes <= 4, "one download at a time probes a host that is down"
    # Only downloads that had asked before it went down failed (each asked at least once);
    # those that waited for it all came.
    assert 0 < 24 - reasons.count(None) <= asked_when_down < 24, reasons


def test_retries_to_a_host_found_down_stop(host: ImageHost) -> None:
    """A host that takes connections and drops them at once: the downloads already under
    way stop retrying it once it is down (they tried four times each before)."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    dropped: list[int] = []

    def drop() -> None:
        with contextlib.suppress(OSError):
            while True:
                listener.accept()[0].close()
                dropped.append(1)

    threading.Thread(target=drop, daemon=True).start()
    base = f"http://127.0.0.1:{listener.getsockname()[1]}"
    settings = dataclasses.replace(BASE, fetch_host_limits=(("127.0.0.1", 32),))
    try:
        _, reasons = fetch_all(settings, [f"{base}/drop/{n}.jpg" for n in range(32)])
    finally:
        listener.close()
    assert "host_unreachable" in reasons
    # aiohttp itself tries a dropped connection twice: 64 for one attempt each, 256 for four.
    assert len(dropped) < 32 * 2 * 2, f"{len(dropped)} connections: retries went on"


def test_a_host_whose_port_is_closed_is_given_up_after_a_few_tries(host: ImageHost) -> None:
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    fetcher = Fetcher(BASE)
    try:
        refused = [fetcher.fetch(f"http://127.0.0.1:{port}/gone/{n}.jpg") for n in range(6)]
        results = [fetcher.fetch(host.add(f"/other/{n}.png", PICTURE)) for n in range(3)]
    finally:
        fetcher.close()
    # Each download tries four times: the first two, eight refusals in all.
    assert [r.error_reason for r in refused] == ["connection_error"] * 2 + ["host_unreachable"] * 4
    assert "the next run tries it again" in (refused[-1].error_message or "")
    assert [r.error_reason for r in results] == [None] * 3, "the same address, another port"


def test_a_host_that_answers_errors_is_never_down(host: ImageHost) -> None:
    urls = [host.add(f"/broken/{n}.png", b"oops", "text/plain", status=500) for n in range(24)]
    settings = dataclasses.replace(BASE, fetch_timeout=0.5)
    _, reasons = fetch_all(settings, urls)
    assert reasons == ["http_500"] * 24


def test_a_down_host_is_probed_when_its_time_is_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """Silence again after the wait doubles it; any answer ends the state; tries that say
    nothing either way (not heard) neither count nor end it."""
    monkeypatch.setattr(hosts, "DOWN_FOR", 0.2)
    pacer = HostPacer(start=4, ceiling=4, overrides=(), total=10, max_pause=1)

    async def tries(answered: bool | None, n: int) -> None:
        for _ in range(n):
            async with held(pacer, "h") as slot:
                if answered is not None:
                    slot.heard(answered)

    asyncio.run(tries(False, DOWN_AFTER))
    outage = pacer.outages["h"]
    assert outage.length == 0.2
    with pytest.raises(HostDown, match="none of the last 8 requests"):
        asyncio.run(tries(True, 1))
    time.sleep(0.25)
    asyncio.run(tries(None, 1))  # a probe that learnt nothing (our own deadline, say)
    assert outage.suspect and outage.length == 0.2
    asyncio.run(tries(False, 1))  # the probe, unanswered
    assert outage.length == 0.4 and outage.until > time.monotonic()
    time.sleep(0.45)
    asyncio.run(tries(True, 1))  # the probe, answered
    assert outage.length == 0 and outage.unanswered == 0 and not outage.suspect
    asyncio.run(tries(False, DOWN_AFTER - 1))
    assert outage.until < time.monotonic(), "it takes DOWN_AFTER silent tries again"


def test_a_redirect_to_another_port_of_the_host_keeps_its_turn_unless_that_port_is_down(
    host: ImageHost,
) -> None:
    """http -> https on one host keeps the download's place (the host's limit is one);
    a redirect to a port of the host that answers nothing ends as `host_unreachable`."""
    second = ImageHost()  # the same address, another port: another origin
    with socket.create_server(("127.0.0.1", 0)) as closed:
        gone = f"http://127.0.0.1:{closed.getsockname()[1]}"
    settings = dataclasses.replace(BASE, fetch_host_limits=(("127.0.0.1", 1),))
    fetcher = Fetcher(settings)
    try:
        moved = redirected(host, second, "moved", 3, delay=0.0)
        assert [fetcher.fetch(url).error_reason for url in moved] == [None] * 3
        for n in range(2):  # four refused tries each: the closed port is found down
            assert fetcher.fetch(f"{gone}/direct/{n}.jpg").error_reason == "connection_error"
        to_gone = host.add("/to-gone", b"", "text/plain", status=302, location=f"{gone}/a.jpg")
        result = fetcher.fetch(to_gone)
        again = fetcher.fetch(redirected(host, second, "again", 1, delay=0.0)[0])
    finally:
        fetcher.close()
        second.close()
    assert result.error_reason == "host_unreachable", result
    assert again.error_reason is None, "the host's other ports are not down"
    assert fetcher.pacer.hosts["127.0.0.1"].most == 1
