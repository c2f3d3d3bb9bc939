"""The fetcher against real local HTTP servers, and the address policy on its own.

Every server here listens on a 127.0.0.x address, and only 127.0.0.1 is
allow-listed (except where a test says otherwise). A canary server on
127.0.0.2 records any request it gets: the SSRF tests point the fetcher at it
by every route they can think of and assert it got none. The address policy is
checked on private, link-local, CGNAT and other addresses directly, without
connecting, so no test sends traffic off the machine even if the guard breaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import ipaddress
import socket
import ssl
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from enrichment import PROJECT_NAME, __version__
from enrichment.config import Settings
from enrichment.media.cpus import usable_cpus
from enrichment.media.decode import ImageError, Preprocessing, decode
from enrichment.media.fetch import MAX_RETRIES, AddressPolicy, Fetcher, is_public
from enrichment.media.guard import BlockedAddress, GuardedResolver
from tests.conftest import image_bytes

Handler = Callable[[BaseHTTPRequestHandler], None]
PICTURE = image_bytes((200, 30, 30), "circle")
CONTACT = "https://museum.example/enrichment-contact"
BASE = Settings(
    fetch_allow=("127.0.0.1",),
    fetch_timeout=3.0,
    fetch_connect_timeout=1.0,
    fetch_read_timeout=1.0,
    fetch_max_bytes=100_000,
    fetch_concurrency=8,
    fetch_per_host=4,
    batch_size=8,
    contact_url=CONTACT,
)


class Server:
    """A real HTTP(S) server on one loopback address: a function per path; every
    connection and every request is kept."""

    def __init__(self, host: str, tls: ssl.SSLContext | None = None) -> None:
        self.routes: dict[str, Handler] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.connections: list[tuple[str, int]] = []
        server = self

        class Listener(ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
                sock, address = super().get_request()
                server.connections.append(address)
                return (tls.wrap_socket(sock, server_side=True) if tls else sock), address

        class RequestHandler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append((self.path, dict(self.headers.items())))
                route = server.routes.get(self.path, send(404, b"not found", "text/plain"))
                with contextlib.suppress(OSError):  # the fetcher hung up: too large, too slow
                    route(self)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = Listener((host, 0), RequestHandler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.host = host
        self.scheme = "https" if tls else "http"

    def url(self, path: str) -> str:
        return f"{self.scheme}://{self.host}:{self.httpd.server_port}{path}"

    def route(self, path: str, handler: Handler) -> str:
        self.routes[path] = handler
        return self.url(path)

    def hits(self, path: str) -> int:
        return sum(1 for seen, _ in self.requests if seen == path)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def send(
    status: int = 200,
    body: bytes = PICTURE,
    content_type: str = "image/png",
    headers: dict[str, str] | None = None,
    length: bool = True,
) -> Handler:
    def handler(request: BaseHTTPRequestHandler) -> None:
        request.send_response(status)
        request.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            request.send_header(name, value)
        if length:
            request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    return handler


def in_turn(*handlers: Handler) -> Handler:
    """The first request gets the first handler, and so on; the last one repeats."""
    calls = iter(range(10_000))

    def handler(request: BaseHTTPRequestHandler) -> None:
        handlers[min(next(calls), len(handlers) - 1)](request)

    return handler


def redirect(location: str, status: int = 302) -> Handler:
    return send(status, b"", "text/plain", {"Location": location})


class Trickle:
    """Sends a byte every 50 ms for 20 s, in the body or in the headers, and notes
    whether the client stayed to the end. No read timeout ever trips on it."""

    def __init__(self, in_headers: bool) -> None:
        self.in_headers = in_headers
        self.completed = False
        self.over = threading.Event()

    def __call__(self, request: BaseHTTPRequestHandler) -> None:
        try:
            if self.in_headers:
                request.wfile.write(b"HTTP/1.0 200 OK\r\nX-Slow: ")
            else:
                send(headers={"Content-Length": "100000"}, length=False, body=b"")(request)
            for _ in range(400):
                request.wfile.write(b"a")
                request.wfile.flush()
                time.sleep(0.05)
            self.completed = True
        finally:
            self.over.set()


def endless_body(request: BaseHTTPRequestHandler) -> None:
    request.send_response(200)
    request.send_header("Content-Type", "image/jpeg")
    request.end_headers()  # no Content-Length: the body ends when the server closes
    for _ in range(1000):
        request.wfile.write(b"\xff" * 65536)


class Gauge:
    """Counts the requests being served at once, per server and in all."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now: Counter[str] = Counter()
        self.most: Counter[str] = Counter()

    def slow_image(self, key: str) -> Handler:
        def handler(request: BaseHTTPRequestHandler) -> None:
            with self.lock:
                for name in (key, "all"):
                    self.now[name] += 1
                    self.most[name] = max(self.most[name], self.now[name])
            time.sleep(0.1)
            with self.lock:
                for name in (key, "all"):
                    self.now[name] -= 1
            send()(request)

        return handler


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    host = Server("127.0.0.1")
    yield host
    host.close()


@pytest.fixture(scope="module")
def canary() -> Iterator[Server]:
    """On 127.0.0.2, which is never allow-listed: it must never be asked anything."""
    host = Server("127.0.0.2")
    yield host
    assert host.connections == [], "a blocked address was connected to"
    host.close()


@pytest.fixture
def make_fetcher() -> Iterator[Callable[..., Fetcher]]:
    fetchers: list[Fetcher] = []

    def make(**changes: object) -> Fetcher:
        fetcher = Fetcher(dataclasses.replace(BASE, **changes))
        fetchers.append(fetcher)
        return fetcher

    yield make
    for fetcher in fetchers:
        fetcher.close()


def test_image_is_fetched_with_an_honest_user_agent(server: Server, make_fetcher) -> None:
    url = server.route("/ok.png", send())
    result = make_fetcher().fetch(url)
    assert result.error_reason is None and result.content == PICTURE
    assert result.sha256 == hashlib.sha256(PICTURE).hexdigest()
    headers = next(h for path, h in server.requests if path == "/ok.png")
    assert headers["User-Agent"] == f"{PROJECT_NAME}/{__version__} (+{CONTACT})"
    assert headers["Accept-Encoding"] == "identity"


def test_404_is_not_retried(server: Server, make_fetcher) -> None:
    result = make_fetcher().fetch(server.url("/missing.png"))
    assert result.error_reason == "http_404" and result.content is None
    assert "404" in (result.error_message or "")
    assert server.hits("/missing.png") == 1


def test_500_then_success_is_retried(server: Server, make_fetcher) -> None:
    url = server.route("/flaky.png", in_turn(send(500, b"oops", "text/plain"), send()))
    result = make_fetcher().fetch(url)
    assert result.content == PICTURE
    assert server.hits("/flaky.png") == 2


def test_persistent_503_gives_up_after_the_retries(server: Server, make_fetcher) -> None:
    url = server.route("/down.png", send(503, b"busy", "text/plain"))
    assert make_fetcher().fetch(url).error_reason == "http_503"
    assert server.hits("/down.png") == MAX_RETRIES + 1


def test_429_retry_after_is_honoured(server: Server, make_fetcher) -> None:
    limited = send(429, b"slow down", "text/plain", {"Retry-After": "1"})
    url = server.route("/limited.png", in_turn(limited, send()))
    assert make_fetcher().fetch(url).content == PICTURE
    assert server.hits("/limited.png") == 2


def test_429_asking_to_wait_past_the_deadline_gives_up_at_once(
    server: Server, make_fetcher
) -> None:
    url = server.route("/later.png", send(429, b"", "text/plain", {"Retry-After": "3600"}))
    assert make_fetcher().fetch(url).error_reason == "http_429"
    assert server.hits("/later.png") == 1


@pytest.mark.parametrize("in_headers", [False, True], ids=["body", "headers"])
def test_trickling_server_is_cut_at_the_deadline(
    server: Server, make_fetcher, in_headers: bool
) -> None:
    trickle = Trickle(in_headers)
    url = server.route(f"/trickle-{in_headers}", trickle)
    result = make_fetcher(fetch_timeout=0.5, fetch_read_timeout=2.0).fetch(url)
    assert result.error_reason == "timeout", result
    trickle.over.wait()
    assert not trickle.completed, "the fetcher waited for the whole trickle"


def test_body_over_the_limit_by_content_length(server: Server, make_fetcher) -> None:
    url = server.route("/big.jpg", send(body=b"\xff" * 200_000, content_type="image/jpeg"))
    result = make_fetcher().fetch(url)
    assert result.error_reason == "too_large" and "Content-Length" in (result.error_message or "")


def test_body_over_the_limit_without_content_length(server: Server, make_fetcher) -> None:
    url = server.route("/endless.jpg", endless_body)
    result = make_fetcher().fetch(url)
    assert result.error_reason == "too_large" and "body" in (result.error_message or "")


def test_html_served_as_jpeg_is_not_an_image(server: Server, make_fetcher) -> None:
    page = b"<!doctype html><html><body>Sorry, this object is not available</body></html>"
    url = server.route("/page.jpg", send(body=page, content_type="image/jpeg"))
    result = make_fetcher().fetch(url)
    assert result.content == page
    with pytest.raises(ImageError) as caught:
        decode(result.content, Preprocessing(32, (0.5,) * 3, (0.5,) * 3))
    assert caught.value.reason == "not_an_image"


@pytest.mark.parametrize(("hops", "reason"), [(3, None), (4, "too_many_redirects")])
def test_at_most_three_redirects_are_followed(
    server: Server, make_fetcher, hops: int, reason: str | None
) -> None:
    server.route(f"/chain{hops}-0", send())
    for hop in range(1, hops + 1):
        server.route(f"/chain{hops}-{hop}", redirect(f"/chain{hops}-{hop - 1}"))
    result = make_fetcher().fetch(server.url(f"/chain{hops}-{hops}"))
    assert result.error_reason == reason
    assert (result.content == PICTURE) is (reason is None)


def test_redirect_loop_ends(server: Server, make_fetcher) -> None:
    server.route("/loop-a", redirect(server.url("/loop-b"), 301))
    url = server.route("/loop-b", redirect("/loop-a", 307))
    assert make_fetcher().fetch(url).error_reason == "too_many_redirects"
    assert server.hits("/loop-a") + server.hits("/loop-b") == 4


def test_a_name_that_does_not_resolve_is_named_in_the_error(server: Server, make_fetcher) -> None:
    """The host that failed to resolve, whether the URL's own or a redirect's target."""
    direct = make_fetcher().fetch("http://no-such-host.invalid/picture.png")
    assert (direct.error_reason, direct.error_message) == (
        "dns_error",
        "cannot resolve no-such-host.invalid",
    )
    url = server.route("/to-nowhere", redirect("http://no-such-host.invalid/picture.png"))
    redirected = make_fetcher().fetch(url)
    assert (redirected.error_reason, redirected.error_message) == (
        "dns_error",
        "cannot resolve no-such-host.invalid",
    )


def test_redirect_to_a_blocked_address_is_refused(
    server: Server, canary: Server, make_fetcher
) -> None:
    url = server.route("/inwards", redirect(canary.url("/secret")))
    result = make_fetcher().fetch(url)
    assert result.error_reason == "blocked_address"
    assert result.error_message == (
        "127.0.0.2 resolves to a non-public address (127.0.0.2): "
        "if it is your own image server, allow it with ENRICH_FETCH_ALLOW"
    )


@pytest.mark.parametrize(
    "host",
    ["127.0.0.2", "127.2", "0x7f000002", "2130706434", "[::ffff:127.0.0.2]"],
)
def test_loopback_address_that_is_not_allow_listed_is_refused(
    canary: Server, make_fetcher, host: str
) -> None:
    # Whatever the spelling, the check is on the address the name resolves to.
    url = f"http://{host}:{canary.httpd.server_port}/secret"
    result = make_fetcher().fetch(url)
    assert result.error_reason == "blocked_address", result


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("file:///etc/passwd", "bad_scheme"),
        ("ftp://127.0.0.1/image.jpg", "bad_scheme"),
        ("gopher://127.0.0.1/", "bad_scheme"),
        ("/relative/image.jpg", "bad_scheme"),
        ("http://[::1/image.jpg", "bad_url"),
        ("http:///image.jpg", "bad_url"),
    ],
)
def test_urls_that_are_never_fetched(make_fetcher, url: str, reason: str) -> None:
    assert make_fetcher().fetch(url).error_reason == reason


def test_redirect_to_another_scheme_is_refused(server: Server, make_fetcher) -> None:
    url = server.route("/to-file", redirect("file:///etc/passwd"))
    assert make_fetcher().fetch(url).error_reason == "bad_scheme"


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """An HTTPS server with a self-signed certificate, which the fetcher must not trust."""
    directory = tmp_path_factory.mktemp("tls")
    key, cert = directory / "key.pem", directory / "cert.pem"
    request = "req -x509 -nodes -days 1 -subj /CN=127.0.0.1 -newkey ec"
    curve = "ec_paramgen_curve:prime256v1"
    command = ["openssl", *request.split(), "-pkeyopt", curve, "-keyout", key, "-out", cert]
    subprocess.run(command, check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    host = Server("127.0.0.1", tls=context)
    yield host
    host.close()


def test_https_goes_through_the_same_guard(
    tls_server: Server, canary: Server, make_fetcher
) -> None:
    url = tls_server.route("/tls.png", send())
    assert make_fetcher().fetch(url).error_reason == "tls_error"  # verified, and untrusted
    assert tls_server.connections
    canary_url = f"https://127.0.0.2:{canary.httpd.server_port}/secret"
    assert make_fetcher().fetch(canary_url).error_reason == "blocked_address"


def test_refused_connection_is_a_reason_not_an_exception(make_fetcher) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    result = make_fetcher(fetch_timeout=0.3).fetch(f"http://127.0.0.1:{port}/x.png")
    assert result.error_reason == "connection_error"
    # Its own words: not aiohttp's "... ssl:default [...]", which names TLS for plain http.
    assert result.error_message == f"cannot connect to 127.0.0.1:{port}: Connection refused"


def test_per_host_and_total_concurrency_caps(make_fetcher) -> None:
    gauge = Gauge()
    first, second = Server("127.0.0.1"), Server("127.0.0.3")
    try:
        urls = [  # one host's URLs first: its waiting records must not hold up the other's
            server.route(f"/slow{n}", gauge.slow_image(server.host))
            for server in (first, second)
            for n in range(8)
        ]
        fetcher = make_fetcher(
            fetch_allow=("127.0.0.1", "127.0.0.3"), fetch_per_host=2, fetch_concurrency=3
        )
        futures = [fetcher.submit(fetcher.fetch, url) for url in urls]
        assert all(future.result().content == PICTURE for future in futures)
    finally:
        first.close()
        second.close()
    assert gauge.most["127.0.0.1"] <= 2 and gauge.most["127.0.0.3"] <= 2
    assert 2 <= gauge.most["all"] <= 3  # capped, yet not a single-file queue


@pytest.mark.parametrize(
    "address",
    [
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "127.0.0.1",
        "127.8.9.10",
        "169.254.169.254",  # cloud metadata
        "100.64.0.1",  # CGNAT
        "100.127.255.254",
        "0.0.0.0",
        "255.255.255.255",
        "224.0.0.1",
        "192.0.0.8",
        "198.18.0.1",
        "240.0.0.1",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "fd12:3456:789a::1",
        "fec0::1",
        "ff02::1",
        "2001:db8::1",
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
        "64:ff9b::a9fe:a9fe",  # NAT64 of the metadata address
        "2002:a9fe:a9fe::1",  # 6to4 of the metadata address
    ],
)
def test_non_public_addresses_are_refused(address: str) -> None:
    ip = ipaddress.ip_address(address)
    assert not is_public(ip)
    assert not AddressPolicy().allows("images.example.org", ip)


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "151.101.1.1",
        "2606:4700::1111",
        "2a00:1450:4001::1",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",  # NAT64 of a public address (IPv6-only networks with DNS64)
        "2002:808:808::1",
    ],
)
def test_public_addresses_are_allowed(address: str) -> None:
    assert is_public(ipaddress.ip_address(address))


def test_allow_list_takes_hosts_and_networks() -> None:
    policy = AddressPolicy.from_allow_list(["10.1.2.0/24", "Images.Museum.example.", "fd00::/8"])
    allows = policy.allows
    assert allows("anything", ipaddress.ip_address("10.1.2.3"))
    assert allows("anything", ipaddress.ip_address("::ffff:10.1.2.3"))
    assert allows("anything", ipaddress.ip_address("fd00::5"))
    assert not allows("anything", ipaddress.ip_address("10.1.3.1"))
    assert not allows("anything", ipaddress.ip_address("169.254.169.254"))
    assert allows("images.museum.example", ipaddress.ip_address("10.9.9.9"))
    assert not allows("other.museum.example", ipaddress.ip_address("10.9.9.9"))


def test_fetch_settings_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "ENRICH_FETCH_ALLOW": "10.0.0.0/8, images.museum.example",
            "ENRICH_FETCH_PER_HOST": "2",
            "ENRICH_FETCH_READ_TIMEOUT": "7.5",
            "ENRICH_MAX_IMAGE_PIXELS": "1000000",
        }
    )
    assert settings.fetch_allow == ("10.0.0.0/8", "images.museum.example")
    assert settings.fetch_per_host == 2
    assert settings.fetch_read_timeout == 7.5
    assert settings.max_image_pixels == 1_000_000
    defaults = Settings.from_env({})
    assert (defaults.fetch_concurrency, defaults.fetch_per_host) == (64, 4)


def test_a_body_cut_short_of_its_content_length_is_truncated_and_not_retried(
    server: Server, make_fetcher
) -> None:
    url = server.route(
        "/cut.png", send(body=PICTURE[:40], headers={"Content-Length": "5000"}, length=False)
    )
    result = make_fetcher().fetch(url)
    assert result.error_reason == "truncated", result
    assert result.error_message == "the image server sent less than the Content-Length it announced"
    assert server.hits("/cut.png") == 1


def test_downloads_run_on_one_event_loop_not_a_thread_each(server: Server, make_fetcher) -> None:
    before = set(threading.enumerate())
    fetcher = make_fetcher()
    urls = [server.route(f"/many{n}.png", send()) for n in range(40)]
    futures = [fetcher.fetch_then(url, lambda fetched: fetched.content) for url in urls]
    assert [future.result() for future in futures] == [PICTURE] * 40
    started = [t.name for t in set(threading.enumerate()) - before if t.is_alive()]
    assert not any(isinstance(t, threading.Timer) for t in threading.enumerate())
    assert not [name for name in started if name.startswith("fetch_")], "no thread per download"
    handlers = [name for name in started if name.startswith("fetched")]
    assert 1 <= len(handlers) <= max(usable_cpus(), BASE.feeders_per_gpu)
    # This fetcher's own (another test's fetcher, a review app's, may be alive meanwhile).
    assert started.count("fetch-loop") == 1


def test_what_is_done_with_the_bytes_may_fail_on_its_own(server: Server, make_fetcher) -> None:
    """`fetch_then`'s function raising is its future's exception; other downloads go on."""
    url = server.route("/then.png", send())

    def refuse(fetched: object) -> None:
        raise RuntimeError("a decoder bug")

    fetcher = make_fetcher()
    failing = fetcher.fetch_then(url, refuse)
    fine = fetcher.fetch_then(url, lambda fetched: len(fetched.content or b""))
    with pytest.raises(RuntimeError, match="a decoder bug"):
        failing.result()
    assert fine.result() == len(PICTURE)


# Spellings that IDNA maps to 127.0.0.2 (fullwidth digits, ideographic and fullwidth full
# stops, circled digits): the guard must judge the host aiohttp will connect to.
UNICODE_LOOPBACK = ["１２７.０.０.２", "127。0。0。2", "127．0．0．2", "①②⑦.0.0.②"]


@pytest.mark.parametrize("host", UNICODE_LOOPBACK)
def test_an_address_spelled_in_unicode_is_judged_as_the_address_it_maps_to(
    canary: Server, make_fetcher, host: str
) -> None:
    result = make_fetcher().fetch(f"http://{host}:{canary.httpd.server_port}/secret")
    assert result.error_reason == "blocked_address", result
    assert "127.0.0.2" in (result.error_message or "")


def test_a_redirect_to_an_address_spelled_in_unicode_is_refused(
    server: Server, canary: Server, make_fetcher
) -> None:
    location = f"http://{UNICODE_LOOPBACK[0]}:{canary.httpd.server_port}/inner".encode()

    def raw_redirect(request: BaseHTTPRequestHandler) -> None:
        request.wfile.write(b"HTTP/1.1 302 Found\r\nLocation: " + location + b"\r\n")
        request.wfile.write(b"Content-Length: 0\r\nConnection: close\r\n\r\n")

    result = make_fetcher().fetch(server.route("/to-unicode", raw_redirect))
    assert result.error_reason == "blocked_address", result


def test_the_last_check_is_on_the_socket_itself() -> None:
    """Whatever path led aiohttp to an address, the socket for it is refused unless allowed."""
    resolver = GuardedResolver(
        AddressPolicy.from_allow_list(["10.1.0.0/16"]), lookups=ThreadPoolExecutor(1)
    )
    for address in ("127.0.0.2", "169.254.169.254", "10.2.0.1"):
        with pytest.raises(BlockedAddress):
            resolver.socket_for((socket.AF_INET, socket.SOCK_STREAM, 0, "", (address, 80)))
    for address in ("10.1.2.3", "8.8.8.8"):
        resolver.socket_for((socket.AF_INET, socket.SOCK_STREAM, 0, "", (address, 80))).close()


def test_one_host_in_several_spellings_keeps_one_limit(make_fetcher) -> None:
    gauge = Gauge()
    host = Server("127.0.0.1")
    try:
        port = host.httpd.server_port
        for n in range(4):
            host.route(f"/spelled{n}", gauge.slow_image("one"))
        spellings = ["127.0.0.1", "１２７.０.０.１", "127。0。0。1", "127．0．0．1"]
        fetcher = make_fetcher(fetch_host_limits=(("127.0.0.1", 1),))
        urls = [f"http://{s}:{port}/spelled{n}" for n, s in enumerate(spellings)]
        results = [f.result() for f in [fetcher.submit(fetcher.fetch, url) for url in urls]]
    finally:
        host.close()
    assert [r.content for r in results] == [PICTURE] * 4
    assert gauge.most["one"] == 1


@pytest.mark.parametrize(
    ("given", "sent"),
    [
        # Europeana's thumbnail service takes the image's own URL, encoded, as a parameter.
        (
            "/thumbnail/v2/url.json?uri=http%3A%2F%2Fexample.org%2Fa%20b.jpg&type=IMAGE",
            "/thumbnail/v2/url.json?uri=http%3A%2F%2Fexample.org%2Fa%20b.jpg&type=IMAGE",
        ),
        ("/x;y=%3B?uri=http://example.org/a b.jpg", "/x;y=%3B?uri=http://example.org/a%20b.jpg"),
        ("/bücher/ä.jpg?q=é", "/b%C3%BCcher/%C3%A4.jpg?q=%C3%A9"),
    ],
)
def test_the_request_keeps_the_urls_own_encoding(
    server: Server, make_fetcher, given: str, sent: str
) -> None:
    """Only what a request line cannot carry is quoted: an encoded `:` or `/` stays encoded,
    a space is %20 (not +), so a server that reads the raw query gets what the metadata said."""
    server.route(sent, send())
    result = make_fetcher().fetch(server.url(given))
    assert result.content == PICTURE, result
    assert server.hits(sent) == 1


def test_closing_a_fetcher_from_its_own_event_loop_is_refused(make_fetcher) -> None:
    fetcher = make_fetcher()
    attempt = asyncio.run_coroutine_threadsafe(_close_on_the_loop(fetcher), fetcher._loop)
    with pytest.raises(RuntimeError, match="own event loop"):
        attempt.result(timeout=5)


async def _close_on_the_loop(fetcher: Fetcher) -> None:
    fetcher.close()


@pytest.mark.parametrize("where", ["fetch_then", "submit"])
def test_closing_a_fetcher_from_work_it_runs_is_refused_and_leaves_it_working(
    server: Server, make_fetcher, where: str
) -> None:
    """It used to fail half-way ("cannot join current thread"), the fetcher half closed."""
    url = server.route("/picture.png", send())
    fetcher = make_fetcher()
    if where == "fetch_then":
        attempt = fetcher.fetch_then(url, lambda _: fetcher.close())
    else:
        attempt = fetcher.submit(fetcher.close)
    with pytest.raises(RuntimeError, match="from work the fetcher runs"):
        attempt.result(timeout=5)
    assert fetcher.fetch(url).content == PICTURE, "still open, and still fetching"
    assert fetcher.fetch_then(url, lambda fetched: fetched.content).result(5) == PICTURE
    fetcher.close()
    assert fetcher.fetch(url).error_reason == "cancelled", "closed now"
