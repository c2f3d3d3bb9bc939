"""The SSRF guard: every connection a fetch makes, checked on the address it connects to.

Image URLs come from other people's metadata, so a host name proves nothing:
the check is on the addresses the name resolves to, on every hop of every
redirect. Loopback, private, link-local, CGNAT, unique-local and other
non-global addresses are refused unless allow-listed, and the socket connects
to the very address that was checked (so DNS rebinding between a check and a
connect cannot send it inwards).

Name lookups run on the fetcher's `Resolver` threads and a fetch waits for one
only until its deadline: `getaddrinfo` cannot be interrupted, and a slow
resolver must not hold a download (and its host's slot) past its time budget.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from requests.utils import DEFAULT_CA_BUNDLE_PATH
from urllib3 import PoolManager
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util.retry import Retry

from enrichment.media.deadline import Deadline, DeadlinePassed

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
AddressInfo = tuple[Any, ...]  # one entry of socket.getaddrinfo's answer

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


class Resolver:
    """Name lookups on threads of their own, each waited for only until its fetch's deadline.

    A lookup that outlives its deadline keeps its resolver thread until the
    system resolver gives up, but no longer the download's thread or its host's
    slot. An address literal needs no lookup and is answered on the spot.
    """

    def __init__(self, threads: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="resolve")

    def addresses(self, host: str, port: int, deadline: Deadline | None) -> list[AddressInfo]:
        """`getaddrinfo(host, port)` for TCP; DeadlinePassed if the deadline comes first.

        Without a deadline (a connection made outside a fetch) the lookup is waited for.
        """
        if _is_address_literal(host):
            flags = socket.AI_NUMERICHOST
            return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, flags)
        lookup = self._pool.submit(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
        try:
            return lookup.result(timeout=deadline.remaining() if deadline is not None else None)
        except FutureTimeout:
            lookup.cancel()
            if deadline is not None:  # always so: only a wait with a deadline times out
                deadline.expire()
            raise DeadlinePassed(f"resolving {host} outlasted the deadline") from None

    def close(self) -> None:
        """Drop lookups not yet begun; one stuck in the system resolver is left to end."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def _is_address_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def connect_checked(
    policy: AddressPolicy,
    host: str,
    port: int,
    timeout: float | None,
    options: Sequence | None,
    addresses: Iterable[AddressInfo],
) -> socket.socket:
    """Refuse the disallowed ones of the `addresses` that `host` resolved to; connect to the first
    allowed one."""
    refused: list[str] = []
    last_error: OSError | None = None
    for family, kind, proto, _, sockaddr in addresses:
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
    raise BlockedAddress(
        f"{host} resolves to a non-public address ({', '.join(refused)}): "
        "if it is your own image server, allow it with ENRICH_FETCH_ALLOW"
    )


class AttemptDeadline(threading.local):
    """The deadline of the fetch that the calling thread is serving now; one per thread.

    The fetch threads share one adapter and its keep-alive connections; a
    connection is used by one thread at a time, and reads the deadline of that
    thread's fetch here: to bound its name lookup and to put its socket under
    it once the request is sent.
    """

    def __init__(self) -> None:
        self.deadline: Deadline | None = None


class _GuardedHTTPConnection(HTTPConnection):
    # Set per fetcher (see GuardedPools), so that each fetcher has its own.
    policy: AddressPolicy
    resolver: Resolver
    attempt: AttemptDeadline

    def _new_conn(self) -> socket.socket:
        timeout = self.timeout if isinstance(self.timeout, int | float) else None
        try:
            addresses = self.resolver.addresses(self._dns_host, self.port, self.attempt.deadline)
            sock = connect_checked(
                self.policy, self._dns_host, self.port, timeout, self.socket_options, addresses
            )
        except socket.gaierror as error:
            raise NameResolutionError(self.host, self, error) from error
        except BlockedAddress:
            raise
        except TimeoutError as error:  # DeadlinePassed too: the fetcher tells them apart
            raise ConnectTimeoutError(self, f"connection to {self.host} timed out") from error
        except OSError as error:
            raise NewConnectionError(self, f"failed to connect: {error}") from error
        sys.audit("http.client.connect", self, self.host, self.port)
        return sock

    def getresponse(self) -> Any:  # type: ignore[override]
        # Headers and body are read from here on: put the socket under the deadline.
        deadline = self.attempt.deadline
        if deadline is not None and self.sock is not None:
            deadline.watch(self.sock)
        return super().getresponse()


class _GuardedHTTPSConnection(_GuardedHTTPConnection, HTTPSConnection):
    pass


def _put_conn_released(pool: HTTPConnectionPool, conn: Any) -> None:
    """Back to the pool, out of the deadline of the fetch that used it (on its thread)."""
    attempt = getattr(conn, "attempt", None)
    deadline = attempt.deadline if attempt is not None else None
    if deadline is not None and conn.sock is not None:
        deadline.release(conn.sock)
    HTTPConnectionPool._put_conn(pool, conn)


class GuardedPools(PoolManager):
    """urllib3 connection pools, one per host, whose every connection goes through an AddressPolicy.

    Used straight, not behind a `requests` adapter: its per-request work (preparing
    the request, cookies, proxies, wrapping the response) was about a quarter of a
    fetch's CPU (docs/throughput.md, section 5), and none of it is needed here. A request
    is one attempt: the fetcher retries and follows redirects itself, so that both
    stay inside its deadline. Names are looked up on `resolver`, under the deadline
    of the fetch in `attempt`. One manager serves many threads (urllib3's pools are
    thread-safe): `hosts` host pools are kept, each with up to `per_host` idle
    keep-alive connections. TLS certificates are verified against the bundle
    `requests` uses, as when the fetch went through it.
    """

    def __init__(
        self,
        policy: AddressPolicy,
        resolver: Resolver,
        attempt: AttemptDeadline,
        hosts: int = 10,
        per_host: int = 10,
    ) -> None:
        super().__init__(
            num_pools=hosts,
            maxsize=per_host,
            block=False,
            retries=Retry(0, read=False, redirect=False),
            cert_reqs="CERT_REQUIRED",
            ca_certs=DEFAULT_CA_BUNDLE_PATH,
        )
        guard = {"policy": policy, "resolver": resolver, "attempt": attempt}
        plain = type("PolicyHTTPConnection", (_GuardedHTTPConnection,), guard)
        secure = type("PolicyHTTPSConnection", (_GuardedHTTPSConnection,), guard)
        returning = {"_put_conn": _put_conn_released}
        self.pool_classes_by_scheme = {
            "http": type(
                "PolicyHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": plain, **returning}
            ),
            "https": type(
                "PolicyHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": secure, **returning}
            ),
        }
