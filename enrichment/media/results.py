"""What a download gives back: the image's bytes, or one reason from a fixed list for why
there are none, named from whatever the HTTP client raised (`classify`).

The reasons are what a record's `error_reason` says, what `enrich status` counts and what a
later run retries (`fetch.PASSING`), so one function names each, whatever raised it.
"""

from __future__ import annotations

import os
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

from enrichment.media.guard import BlockedAddress
from enrichment.media.hosts import HostDown


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


def timed_out(url: str, seconds: float) -> FetchResult:
    return FetchResult.failed(url, "timeout", f"the image took longer than {seconds:g} s to fetch")


def classify(url: str, error: Exception, asked: str) -> FetchResult:
    """The reason for one failed try (not cut by the deadline), from what aiohttp raised
    asking `asked` (`url` or a redirect's target)."""
    if isinstance(error, HostDown):  # a redirect to a host that is down
        return FetchResult.failed(url, "host_unreachable", str(error))
    blocked = caused_by(error, BlockedAddress)
    if blocked is not None:
        return FetchResult.failed(url, "blocked_address", str(blocked))
    if caused_by(error, socket.gaierror) is not None:
        return FetchResult.failed(url, "dns_error", f"cannot resolve {urlsplit(asked).hostname}")
    if isinstance(error, aiohttp.ClientSSLError) or caused_by(error, ssl.SSLError) is not None:
        return FetchResult.failed(url, "tls_error", short(error))
    if isinstance(error, TimeoutError):  # a connect or read timeout, not the deadline
        return FetchResult.failed(url, "timeout", "the image server did not answer in time")
    if isinstance(error, aiohttp.ClientPayloadError):
        return FetchResult.failed(
            url, "truncated", "the image server sent less than the Content-Length it announced"
        )
    if isinstance(error, ValueError):  # aiohttp's and yarl's unparseable URLs, IDNA's
        return FetchResult.failed(url, "bad_url", short(error))
    if isinstance(error, aiohttp.ClientConnectorError):  # refused, unreachable
        # In its own words, not aiohttp's ("... ssl:default [Connect call failed ...]",
        # which names TLS for a plain http URL).
        cause = error.os_error
        why = os.strerror(cause.errno) if cause.errno else cause.strerror or short(cause)
        return FetchResult.failed(
            url, "connection_error", f"cannot connect to {error.host}:{error.port}: {why}"
        )
    # Reset, cut-off and garbled answers; whatever else aiohttp raised.
    if isinstance(error, OSError | aiohttp.ClientError):
        return FetchResult.failed(url, "connection_error", short(error))
    return FetchResult.failed(url, "fetch_error", f"{type(error).__name__}: {short(error)}")


def caused_by(error: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first `kind` in the chain of causes, contexts and arguments."""
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
        os_error = getattr(current, "os_error", None)  # aiohttp's connector errors
        if isinstance(os_error, BaseException):
            stack.append(os_error)
    return None


def short(error: BaseException) -> str:
    lines = str(error).splitlines()
    return lines[0][:300] if lines else type(error).__name__
