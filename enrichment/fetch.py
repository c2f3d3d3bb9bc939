"""Fetching third-party images: concurrent, polite, bounded, and SSRF-safe.

Image URLs come from other people's metadata, so every connection goes
through `AddressPolicy`, checked on the address actually connected to (after
DNS, on every redirect hop): loopback, private, link-local, CGNAT, unique-local
and other non-global addresses are refused unless allow-listed.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, MaxRetryError, NewConnectionError
from urllib3.util.retry import Retry

from enrichment import PROJECT_NAME, __version__
from enrichment.config import Settings

T = TypeVar("T")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
RETRY_STATUSES = (429, 500, 502, 503, 504)
MAX_REDIRECTS = 3
MAX_RETRY_AFTER = 30.0


class BlockedAddress(OSError):
    """A connection refused by the address policy before any packet was sent."""


@dataclass(frozen=True)
class AddressPolicy:
    """Which addresses may be connected to: global ones, plus an explicit allow-list."""

    allowed_hosts: frozenset[str] = frozenset()
    allowed_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_allow_list(cls, entries: Iterable[str]) -> AddressPolicy:
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
        if any(address in network for network in self.allowed_networks):
            return True
        return is_public(address)


def is_public(address: IPAddress) -> bool:
    """True only for globally routable unicast addresses."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not (
        address.is_multicast or address.is_reserved or address.is_unspecified
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


class _GuardedHTTPConnection(HTTPConnection):
    policy: AddressPolicy = AddressPolicy()

    def _new_conn(self) -> socket.socket:
        timeout = self.timeout if isinstance(self.timeout, int | float) else None
        try:
            return connect_checked(
                self.policy, self._dns_host, self.port, timeout, self.socket_options
            )
        except BlockedAddress:
            raise
        except TimeoutError as error:
            raise ConnectTimeoutError(self, f"connection to {self.host} timed out") from error
        except OSError as error:
            raise NewConnectionError(self, f"failed to connect: {error}") from error


class _GuardedHTTPSConnection(_GuardedHTTPConnection, HTTPSConnection):
    pass


class GuardedAdapter(HTTPAdapter):
    """A requests adapter whose every connection goes through an AddressPolicy."""

    def __init__(self, policy: AddressPolicy, retries: Retry, pool_size: int) -> None:
        plain = type("PolicyHTTPConnection", (_GuardedHTTPConnection,), {"policy": policy})
        secure = type("PolicyHTTPSConnection", (_GuardedHTTPSConnection,), {"policy": policy})
        self._pools = {
            "http": type("PolicyHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": plain}),
            "https": type("PolicyHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": secure}),
        }
        super().__init__(max_retries=retries, pool_connections=pool_size, pool_maxsize=pool_size)

    def init_poolmanager(self, *args, **kwargs) -> None:  # type: ignore[override]
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = self._pools


class CappedRetry(Retry):
    """urllib3's Retry, but a provider's Retry-After never stalls a batch for long."""

    def get_retry_after(self, response) -> float | None:  # type: ignore[override]
        value = super().get_retry_after(response)
        return None if value is None else min(value, MAX_RETRY_AFTER)

    def increment(
        self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None
    ):  # type: ignore[override]
        # A refused address is a verdict, not a blip: retrying it only wastes time.
        if error is not None and _caused_by(error, BlockedAddress):
            raise MaxRetryError(_pool, url, error) from error
        return super().increment(method, url, response, error, _pool, _stacktrace)


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
    """Downloads many images at once, with a total and a per-host concurrency cap."""

    def __init__(self, settings: Settings, per_host: int = 4) -> None:
        self.settings = settings
        self.policy = AddressPolicy.from_allow_list(settings.fetch_allow)
        self.per_host = per_host
        self.user_agent = f"{PROJECT_NAME}/{__version__} (+{settings.contact_url})"
        self._local = threading.local()
        self._host_slots: defaultdict[str, threading.BoundedSemaphore] = defaultdict(
            lambda: threading.BoundedSemaphore(self.per_host)
        )
        self._slots_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(
            max_workers=settings.fetch_concurrency, thread_name_prefix="fetch"
        )

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = False  # no proxies or netrc from the environment
            session.max_redirects = MAX_REDIRECTS
            session.headers["User-Agent"] = self.user_agent
            session.headers["Accept"] = "image/*"
            retries = CappedRetry(
                total=3,
                connect=2,
                read=2,
                redirect=False,
                status=3,
                status_forcelist=RETRY_STATUSES,
                backoff_factor=0.5,
                backoff_jitter=0.25,
                respect_retry_after_header=True,
                raise_on_status=False,
                allowed_methods=frozenset({"GET"}),
            )
            adapter = GuardedAdapter(self.policy, retries, pool_size=self.per_host)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._local.session = session
        return session

    def _slot(self, url: str) -> threading.BoundedSemaphore:
        host = (urlsplit(url).hostname or "").lower()
        with self._slots_lock:
            return self._host_slots[host]

    def submit(self, function: Callable[..., T], *args: Any) -> Future[T]:
        """Run work that fetches (and decodes) on the fetch threads."""
        return self._pool.submit(function, *args)

    def fetch(self, url: str) -> FetchResult:
        scheme = urlsplit(url).scheme.lower()
        if scheme not in ("http", "https"):
            return FetchResult.failed(
                url,
                "bad_scheme",
                f"only http and https URLs are fetched, not {scheme or 'no scheme'}",
            )
        with self._slot(url):
            try:
                return self._download(url)
            except BlockedAddress as error:
                return FetchResult.failed(url, "blocked_address", str(error))
            except requests.exceptions.TooManyRedirects:
                return FetchResult.failed(
                    url, "too_many_redirects", f"more than {MAX_REDIRECTS} redirects"
                )
            except (requests.exceptions.Timeout, TimeoutError):
                return FetchResult.failed(url, "timeout", "the image server did not answer in time")
            except requests.exceptions.ConnectionError as error:
                if _caused_by(error, BlockedAddress):
                    return FetchResult.failed(
                        url, "blocked_address", str(_caused_by(error, BlockedAddress))
                    )
                return FetchResult.failed(url, "connection_error", _short(error))
            except requests.exceptions.RequestException as error:
                return FetchResult.failed(url, "fetch_error", _short(error))

    def _download(self, url: str) -> FetchResult:
        settings = self.settings
        deadline = time.monotonic() + settings.fetch_timeout
        with self._session().get(
            url, stream=True, timeout=(settings.fetch_connect_timeout, settings.fetch_timeout)
        ) as response:
            if response.status_code != 200:
                return FetchResult.failed(
                    url,
                    f"http_{response.status_code}",
                    f"the image server answered HTTP {response.status_code}",
                )
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > settings.fetch_max_bytes:
                return FetchResult.failed(
                    url,
                    "too_large",
                    f"Content-Length {declared} is over the {settings.fetch_max_bytes}-byte limit",
                )
            body = bytearray()
            digest = hashlib.sha256()
            while chunk := response.raw.read1(65536, decode_content=True):
                body += chunk
                digest.update(chunk)
                if len(body) > settings.fetch_max_bytes:
                    return FetchResult.failed(
                        url,
                        "too_large",
                        f"body is over the limit of {settings.fetch_max_bytes} bytes",
                    )
                if time.monotonic() > deadline:
                    return FetchResult.failed(
                        url, "timeout", f"download took longer than {settings.fetch_timeout:g} s"
                    )
            return FetchResult(url=url, content=bytes(body), sha256=digest.hexdigest())


def _caused_by(error: BaseException, kind: type[BaseException]) -> BaseException | None:
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
    return str(error).splitlines()[0][:300]
