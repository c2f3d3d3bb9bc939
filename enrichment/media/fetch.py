"""Fetching third-party images: concurrent, polite, bounded, and SSRF-safe.

Image URLs come from other people's metadata, so:

- only http and https, at most `MAX_REDIRECTS` redirects, each hop re-checked;
- every connection goes through `AddressPolicy`, checked on the address
  actually connected to (after DNS, on every hop): loopback, private,
  link-local, CGNAT, unique-local and other non-global addresses are refused
  unless allow-listed, so DNS rebinding and redirects inwards fail too;
- a byte cap (on Content-Length and while streaming) and a total deadline per
  URL, enforced on the sockets themselves, so a server that trickles bytes is
  cut off on time;
- timeouts, connection errors, 429 (honouring Retry-After) and 5xx are retried
  with backoff while the deadline allows; other 4xx are not, and neither is a
  body cut short of its Content-Length (`truncated`: a server that cuts an image
  off does it the same way each time);
- per-host concurrency adapts to each host (`enrichment.media.hosts`): a small
  start for an unknown host, an operator's limit where one is set, halved on
  429/503 (once per round); each thread keeps its own keep-alive connections, per host.

The deadlines of all fetches in flight share one watchdog thread, so a URL
costs no thread of its own to time.

`Fetcher.fetch` never raises: every failure is a `FetchResult` with a short
machine-readable reason (http_404, timeout, too_large, blocked_address,
bad_scheme, bad_url, dns_error, tls_error, too_many_redirects, truncated,
connection_error, fetch_error) and a human message.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import http.client
import ipaddress
import itertools
import random
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urljoin, urlsplit

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util.retry import Retry

from enrichment import PROJECT_NAME, __version__
from enrichment.config import Settings
from enrichment.media.hosts import BUSY, NEUTRAL, OK, HostPacer, PacerClosed

T = TypeVar("T")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_REDIRECTS = 3
MAX_RETRIES = 3
BACKOFF_SECONDS = 0.25
CHUNK_BYTES = 64 * 1024
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
RETRYABLE = frozenset(
    {"timeout", "connection_error", "http_429", "http_500", "http_502", "http_503", "http_504"}
)
# What an attempt's failure says about its host's load (see enrichment.media.hosts).
BUSY_REASONS = frozenset({"http_429", "http_503", "timeout", "connection_error"})
# Non-global ranges that `ipaddress.is_global` misses on older Pythons.
EXTRA_NON_GLOBAL = (ipaddress.ip_network("192.0.0.0/24"), ipaddress.ip_network("fec0::/10"))
NAT64 = ipaddress.ip_network("64:ff9b::/96")


class BlockedAddress(OSError):
    """A connection refused by the address policy before any packet was sent."""


@dataclass(frozen=True)
class AddressPolicy:
    """Which addresses may be connected to: global ones, plus an explicit allow-list."""

    allowed_hosts: frozenset[str] = frozenset()
    allowed_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_allow_list(cls, entries: Iterable[str]) -> AddressPolicy:
        """Host names and CIDRs (a bare address is a /32 or /128), as in ENRICH_FETCH_ALLOW."""
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for entry in entries:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(entry.lower().rstrip("."))
        return cls(frozenset(hosts), tuple(networks))

    def allows(self, host: str, address: IPAddress) -> bool:
        if host.lower().rstrip(".") in self.allowed_hosts:
            return True
        address = embedded_ipv4(address)
        if any(address in network for network in self.allowed_networks):
            return True
        return is_public(address)


def embedded_ipv4(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 one stands for (mapped, NAT64, 6to4); otherwise itself.

    ::ffff:10.0.0.1 or 64:ff9b::a9fe:a9fe reach a private or metadata address,
    so they are judged by the address they embed.
    """
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if address.sixtofour is not None:
            return address.sixtofour
    return address


def is_public(address: IPAddress) -> bool:
    """True only for globally routable unicast addresses."""
    address = embedded_ipv4(address)
    return (
        address.is_global
        and not (address.is_multicast or address.is_reserved or address.is_unspecified)
        and not any(address in network for network in EXTRA_NON_GLOBAL)
    )


def connect_checked(
    policy: AddressPolicy, host: str, port: int, timeout: float | None, options: Sequence | None
) -> socket.socket:
    """Resolve `host`, refuse disallowed addresses, connect to the first allowed one."""
    refused: list[str] = []
    last_error: OSError | None = None
    for family, kind, proto, _, sockaddr in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
        address = ipaddress.ip_address(sockaddr[0].split("%")[0])
        if not policy.allows(host, address):
            refused.append(str(address))
            continue
        sock = socket.socket(family, kind, proto)
        try:
            for option in options or ():
                sock.setsockopt(*option)
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            return sock
        except OSError as error:
            sock.close()
            last_error = error
    if last_error is not None:
        raise last_error
    raise BlockedAddress(f"{host} resolves to a non-public address ({', '.join(refused)})")


class Deadline:
    """One URL's whole time budget, enforced on the sockets it uses.

    Socket timeouts bound each wait, not their sum: a server that sends a byte
    every second never trips them. At the deadline the watchdog shuts down the
    sockets of the fetch, which ends any read in progress at once.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.expired = False
        self._finished = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def __enter__(self) -> Deadline:
        _current.deadline = self
        _WATCHDOG.watch(self)
        return self

    def __exit__(self, *_: object) -> None:
        with self._lock:
            self._finished = True
            self._sockets.clear()
        _current.deadline = None

    def remaining(self) -> float:
        return 0.0 if self.expired else max(0.0, self.end - time.monotonic())

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            if self.expired:
                _shut(sock)
            elif not self._finished:
                self._sockets.append(sock)

    def expire(self) -> None:
        with self._lock:
            if self._finished:
                return
            self.expired = True
            for sock in self._sockets:
                _shut(sock)


class _Watchdog:
    """One thread for every deadline in the process: a heap of ends, woken by the earliest.

    A timer thread per URL cost a thread start and two context switches per
    image; at thousands of images a second that is a core's worth of work.
    A finished fetch is not removed from the heap: its entry is skipped when due.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Deadline]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def watch(self, deadline: Deadline) -> None:
        with self._wake:
            heapq.heappush(self._heap, (deadline.end, next(self._order), deadline))
            if self._heap[0][2] is deadline:
                self._wake.notify()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="deadlines", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._wake.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                _, _, due = heapq.heappop(self._heap)
            due.expire()


_WATCHDOG = _Watchdog()


def _shut(sock: socket.socket) -> None:
    # socket.socket's own shutdown, not SSLSocket's, which would drop the TLS
    # state under a read that another thread is still in. Already closed is fine.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


_current = threading.local()  # the Deadline of the fetch running on this thread


class _GuardedHTTPConnection(HTTPConnection):
    policy: AddressPolicy = AddressPolicy()

    def _new_conn(self) -> socket.socket:
        timeout = self.timeout if isinstance(self.timeout, int | float) else None
        try:
            sock = connect_checked(
                self.policy, self._dns_host, self.port, timeout, self.socket_options
            )
        except socket.gaierror as error:
            raise NameResolutionError(self.host, self, error) from error
        except BlockedAddress:
            raise
        except TimeoutError as error:
            raise ConnectTimeoutError(self, f"connection to {self.host} timed out") from error
        except OSError as error:
            raise NewConnectionError(self, f"failed to connect: {error}") from error
        sys.audit("http.client.connect", self, self.host, self.port)
        return sock

    def getresponse(self) -> Any:  # type: ignore[override]
        # Headers and body are read from here on: put the socket under the deadline.
        deadline: Deadline | None = getattr(_current, "deadline", None)
        if deadline is not None and self.sock is not None:
            deadline.watch(self.sock)
        return super().getresponse()


class _GuardedHTTPSConnection(_GuardedHTTPConnection, HTTPSConnection):
    pass


class GuardedAdapter(HTTPAdapter):
    """A requests adapter whose every connection goes through an AddressPolicy.

    It makes one attempt per request: the fetcher retries and follows
    redirects itself, so that both stay inside its deadline.
    """

    def __init__(self, policy: AddressPolicy) -> None:
        plain = type("PolicyHTTPConnection", (_GuardedHTTPConnection,), {"policy": policy})
        secure = type("PolicyHTTPSConnection", (_GuardedHTTPSConnection,), {"policy": policy})
        self._pools = {
            "http": type("PolicyHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": plain}),
            "https": type("PolicyHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": secure}),
        }
        super().__init__(max_retries=Retry(0, read=False, redirect=False))

    def init_poolmanager(self, *args, **kwargs) -> None:  # type: ignore[override]
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = self._pools


@dataclass(frozen=True)
class FetchResult:
    """The bytes of one image, or why there are none."""

    url: str
    content: bytes | None = None
    sha256: str | None = None
    error_reason: str | None = None
    error_message: str | None = None

    @classmethod
    def failed(cls, url: str, reason: str, message: str) -> FetchResult:
        return cls(url=url, error_reason=reason, error_message=message)


class Fetcher:
    """Downloads many images at once, each host at its own adaptive pace (see media.hosts).

    The thread pool is larger than the downloads allowed at once by two
    batches, so that records waiting for a busy host's slot never hold up
    downloads from other hosts, and the next batch can be fetched while this
    one is classified.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.policy = AddressPolicy.from_allow_list(settings.fetch_allow)
        self.user_agent = f"{PROJECT_NAME}/{__version__} (+{settings.contact_url})"
        self._local = threading.local()
        self.pacer = HostPacer(
            start=settings.fetch_per_host,
            ceiling=settings.fetch_per_host_max,
            overrides=settings.fetch_host_limits,
            total=settings.fetch_concurrency,
            max_pause=settings.fetch_timeout,
        )
        largest = max((limit for _, limit in settings.fetch_host_limits), default=0)
        self._pool = ThreadPoolExecutor(
            max_workers=settings.fetch_concurrency + largest + 2 * settings.batch_size,
            thread_name_prefix="fetch",
        )

    def close(self, wait: bool = True) -> None:
        """Stop the fetch threads; without `wait`, fetches not yet under way are dropped."""
        if not wait:
            self.pacer.close()
        self._pool.shutdown(wait=wait, cancel_futures=True)

    def submit(self, function: Callable[..., T], *args: Any) -> Future[T]:
        """Run work that fetches (and decodes) on the fetch threads."""
        return self._pool.submit(function, *args)

    def fetch(self, url: str) -> FetchResult:
        """One URL to its bytes, or to the reason there are none; never raises."""
        refusal = _refuse_url(url, url)
        if refusal is not None:
            return refusal
        host = (urlsplit(url).hostname or "").lower().rstrip(".")
        try:
            return self._fetch_at(url, host)
        except PacerClosed as closed:
            return FetchResult.failed(url, "fetch_error", str(closed))

    def _fetch_at(self, url: str, host: str) -> FetchResult:
        with (
            self.pacer.slot(host) as slot,
            Deadline(self.settings.fetch_timeout) as deadline,
        ):
            host_said: FetchResult | None = None  # the host's last answer before the deadline
            for attempt in range(MAX_RETRIES + 1):
                began = time.monotonic()
                result, retry_after, answered = self._attempt(url, deadline)
                reason = result.error_reason
                if reason is None:
                    slot.report(OK, began, answered - began if answered else None, None)
                elif host_said is not None and deadline.expired:
                    # Our deadline cut a retry short: that says nothing new about the
                    # host, and its last real answer (a 429, a 503) is the truer reason.
                    slot.report(NEUTRAL, began, None, None)
                    return host_said
                else:
                    signal = BUSY if reason in BUSY_REASONS else NEUTRAL
                    slot.report(signal, began, None, retry_after)
                if reason not in RETRYABLE or attempt == MAX_RETRIES:
                    break
                host_said = result
                pause = retry_after if retry_after is not None else _backoff(attempt)
                if pause >= deadline.remaining():
                    break  # the answer would come too late: give up now, with the last reason
                time.sleep(pause)
            return result

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = False  # no proxies or netrc from the environment
            session.headers["User-Agent"] = self.user_agent
            session.headers["Accept"] = "image/*"
            # Images are compressed already; asking for identity keeps gzip bombs out.
            session.headers["Accept-Encoding"] = "identity"
            adapter = GuardedAdapter(self.policy)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._local.session = session
        return session

    def _attempt(
        self, url: str, deadline: Deadline
    ) -> tuple[FetchResult, float | None, float | None]:
        """One try, following redirects: the result, a 429/503's Retry-After, when headers came."""
        answered: list[float] = []
        try:
            result, retry_after = self._follow(url, deadline, answered)
        except Exception as error:  # every failure is a result; classified below
            return _classify(url, error, deadline), None, None
        return result, retry_after, answered[-1] if answered else None

    def _follow(
        self, url: str, deadline: Deadline, answered: list[float]
    ) -> tuple[FetchResult, float | None]:
        settings = self.settings
        original = url
        for _ in range(MAX_REDIRECTS + 1):
            remaining = deadline.remaining()
            if remaining <= 0:
                return _timed_out(original, deadline), None
            timeout = (
                min(settings.fetch_connect_timeout, remaining),
                min(settings.fetch_read_timeout, remaining),
            )
            with self._session().get(
                url, stream=True, allow_redirects=False, timeout=timeout
            ) as response:
                answered.append(time.monotonic())
                location = response.headers.get("Location")
                if response.status_code in REDIRECT_STATUSES and location:
                    url = urljoin(url, location)
                    refusal = _refuse_url(original, url)
                    if refusal is not None:
                        return refusal, None
                    continue
                if response.status_code != 200:
                    failure = FetchResult.failed(
                        original,
                        f"http_{response.status_code}",
                        f"the image server answered HTTP {response.status_code}",
                    )
                    return failure, _retry_after(response)
                return self._read_body(original, response, deadline), None
        return FetchResult.failed(
            original, "too_many_redirects", f"more than {MAX_REDIRECTS} redirects"
        ), None

    def _read_body(self, url: str, response: requests.Response, deadline: Deadline) -> FetchResult:
        limit = self.settings.fetch_max_bytes
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            return FetchResult.failed(
                url, "too_large", f"Content-Length {declared} is over the {limit}-byte limit"
            )
        body = bytearray()
        for chunk in response.iter_content(CHUNK_BYTES):
            body += chunk
            if len(body) > limit:
                return FetchResult.failed(
                    url, "too_large", f"the body is over the {limit}-byte limit"
                )
        if deadline.expired:  # the deadline shut the socket: what arrived is partial
            return _timed_out(url, deadline)
        content = bytes(body)
        return FetchResult(url=url, content=content, sha256=hashlib.sha256(content).hexdigest())


def _refuse_url(url: str, hop: str) -> FetchResult | None:
    """Why `hop` (the URL or a redirect target) must not be fetched at all, if it must not."""
    try:
        parts = urlsplit(hop)
        host = parts.hostname
    except ValueError as error:
        return FetchResult.failed(url, "bad_url", f"unparseable URL: {error}")
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        return FetchResult.failed(
            url, "bad_scheme", f"only http and https URLs are fetched, not {scheme or 'no scheme'}"
        )
    if not host:
        return FetchResult.failed(url, "bad_url", f"no host in {hop[:200]}")
    return None


def _timed_out(url: str, deadline: Deadline) -> FetchResult:
    return FetchResult.failed(
        url, "timeout", f"the image took longer than {deadline.seconds:g} s to fetch"
    )


def _classify(url: str, error: Exception, deadline: Deadline) -> FetchResult:
    """The reason for one failed try, from the exception requests/urllib3 raised."""
    if deadline.expired:
        return _timed_out(url, deadline)
    if _caused_by(error, http.client.IncompleteRead) is not None:
        return FetchResult.failed(
            url, "truncated", "the image server sent less than the Content-Length it announced"
        )
    blocked = _caused_by(error, BlockedAddress)
    if blocked is not None:
        return FetchResult.failed(url, "blocked_address", str(blocked))
    if _caused_by(error, NameResolutionError) is not None:
        return FetchResult.failed(url, "dns_error", f"cannot resolve {urlsplit(url).hostname}")
    if isinstance(error, requests.exceptions.SSLError):
        return FetchResult.failed(url, "tls_error", _short(error))
    if isinstance(error, requests.exceptions.Timeout) or _caused_by(
        error, urllib3.exceptions.ReadTimeoutError
    ):
        return FetchResult.failed(url, "timeout", "the image server did not answer in time")
    if isinstance(error, ValueError):  # requests' InvalidURL and kin, urllib3's, IDNA's
        return FetchResult.failed(url, "bad_url", _short(error))
    # requests' own exceptions are OSErrors: refused, reset, cut-off and garbled answers.
    if isinstance(error, OSError | urllib3.exceptions.ProtocolError | http.client.HTTPException):
        return FetchResult.failed(url, "connection_error", _short(error))
    return FetchResult.failed(url, "fetch_error", f"{type(error).__name__}: {_short(error)}")


def _retry_after(response: requests.Response) -> float | None:
    """Seconds the server asks us to wait (delay or HTTP date), if it says so sensibly."""
    try:
        return Retry().get_retry_after(response.raw)
    except urllib3.exceptions.InvalidHeader:
        return None


def _backoff(attempt: int) -> float:
    """Exponential backoff with jitter, so that retries from many threads spread out."""
    return BACKOFF_SECONDS * 2**attempt * random.uniform(0.5, 1.0)


def _caused_by(error: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first `kind` in the chain of causes, contexts, arguments and urllib3 reasons."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [error]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, kind):
            return current
        stack.extend(
            [
                current.__cause__,
                current.__context__,
                *[a for a in current.args if isinstance(a, BaseException)],
            ]
        )
        reason = getattr(current, "reason", None)
        if isinstance(reason, BaseException):
            stack.append(reason)
    return None


def _short(error: BaseException) -> str:
    lines = str(error).splitlines()
    return lines[0][:300] if lines else type(error).__name__
