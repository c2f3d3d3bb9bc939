"""The SSRF guard: every connection a fetch makes, checked on the address it connects to.

Image URLs come from other people's metadata, so a host name proves nothing:
the check is on the addresses the name resolves to, on every hop of every
redirect. Loopback, private, link-local, CGNAT, unique-local and other
non-global addresses are refused unless allow-listed, three times over:

- `GuardedResolver` hands aiohttp only the allowed addresses of a name, and
  aiohttp connects to what its resolver returns (so DNS rebinding between a
  check and a connect cannot send it inwards);
- a host that is an address literal gets no lookup, so `refused_literal` checks
  it before any request, in the form aiohttp will use (after IDNA mapping, which
  turns fullwidth digits and ideographic full stops into an ASCII address) and in
  every legacy spelling the system's resolver would accept;
- `GuardedResolver.socket_for` makes every socket aiohttp connects, and refuses
  an address that neither the policy nor an allow-listed name's lookup allows.

Name lookups run on the fetcher's lookup threads; a fetch waits for one only
until its deadline (`getaddrinfo` cannot be interrupted, and a slow resolver must
not hold a download, and its host's slot, past its time budget).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
from collections.abc import Iterable
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial
from typing import Any

from aiohttp.abc import AbstractResolver, ResolveResult

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Non-global ranges that `ipaddress.is_global` misses on older Pythons.
EXTRA_NON_GLOBAL = (ipaddress.ip_network("192.0.0.0/24"), ipaddress.ip_network("fec0::/10"))
NAT64 = ipaddress.ip_network("64:ff9b::/96")
# What an IPv4 address written in a legacy form (decimal, octal, hex parts) is made of.
LEGACY_IPV4_CHARACTERS = frozenset("0123456789abcdefABCDEFxX.")


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
        return host.lower().rstrip(".") in self.allowed_hosts or self.allows_address(address)

    def allows_address(self, address: IPAddress) -> bool:
        """Whatever name it was reached by: public, or in an allow-listed network."""
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


class GuardedResolver(AbstractResolver):
    """aiohttp's name lookups, answering only with the addresses the policy allows; and the
    check on every socket aiohttp connects (`socket_for`), whatever led it there.

    A name whose every address is refused raises `BlockedAddress`, which aiohttp
    passes on as the cause of its connection error, so the fetch names the
    addresses it refused. Each lookup runs on one of `lookups`' threads. Both the
    lookups' answers and the sockets are handled on the fetcher's event loop.
    """

    def __init__(self, policy: AddressPolicy, lookups: Executor) -> None:
        self.policy = policy
        self.lookups = lookups
        # Non-public addresses allowed only by the name they were looked up by (an
        # allow-listed host name): the sockets may connect to them too.
        self._named: set[IPAddress] = set()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        lookup = partial(socket.getaddrinfo, host, port, family, socket.SOCK_STREAM)
        answers = await asyncio.get_running_loop().run_in_executor(self.lookups, lookup)
        allowed: list[ResolveResult] = []
        refused: list[str] = []
        for found_family, _, proto, _, sockaddr in answers:
            address = _address_of(sockaddr)
            if not self.policy.allows(host, address):
                refused.append(str(address))
                continue
            if not self.policy.allows_address(address):
                self._named.add(address)
            allowed.append(
                ResolveResult(
                    hostname=host,
                    host=str(sockaddr[0]),
                    port=int(sockaddr[1]),
                    family=found_family,
                    proto=proto,
                    flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
                )
            )
        if not allowed:
            raise BlockedAddress(refusal(host, refused))
        return allowed

    def socket_for(self, address_info: tuple[Any, ...]) -> socket.socket:
        """The socket for one address aiohttp is about to connect to: refused unless the
        policy allows that address, or a lookup of an allow-listed name gave it. The last
        line of defence, on the address connected to, for whatever path led there (an
        address literal in a spelling no check above foresaw, say). It sees no host name,
        so an address an allow-listed name once resolved to passes here for any host; the
        resolver and the literal check still refuse it to every other name."""
        family, kind, proto, _, sockaddr = address_info
        address = _address_of(sockaddr)
        if not (self.policy.allows_address(address) or address in self._named):
            raise BlockedAddress(refusal(str(address), [str(address)]))
        return socket.socket(family, kind, proto)

    async def close(self) -> None:
        """The lookup threads are the fetcher's: it shuts them down."""


def _address_of(sockaddr: tuple[Any, ...]) -> IPAddress:
    return ipaddress.ip_address(str(sockaddr[0]).split("%")[0])


@functools.lru_cache(maxsize=4096)
def refused_literal(policy: AddressPolicy, host: str) -> str | None:
    """Why a host that is an address (in any spelling: 127.2, 2130706434, ::ffff:7f00:2)
    must not be connected to, if it must not; None for a name or an allowed address.

    Asked for every URL and redirect, of a few hosts: the answers are kept (parsing
    an address was a tenth of a download's CPU on the event loop)."""
    address = _address_literal(host)
    if address is None or policy.allows(host, address):
        return None
    return refusal(host, [str(address)])


def refusal(host: str, refused: Iterable[str]) -> str:
    return (
        f"{host} resolves to a non-public address ({', '.join(refused)}): "
        "if it is your own image server, allow it with ENRICH_FETCH_ALLOW"
    )


def _address_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if not set(host) <= LEGACY_IPV4_CHARACTERS:
        return None
    try:  # the legacy IPv4 forms the resolver would accept: 127.1, 0x7f000001, 2130706433
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None
