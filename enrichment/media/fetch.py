"""Fetching third-party images: concurrent, polite, bounded, and SSRF-safe.

Image URLs come from other people's metadata, so:

- only http and https, at most `MAX_REDIRECTS` redirects, each hop re-checked;
- every connection goes through the SSRF guard (`enrichment.media.guard`),
  checked on the address actually connected to (after DNS, on every hop):
  loopback, private, link-local, CGNAT, unique-local and other non-global
  addresses are refused unless allow-listed, so DNS rebinding and redirects
  inwards fail too;
- a byte cap (on Content-Length and while streaming) and a total deadline per
  URL (`enrichment.media.deadline`), enforced on the sockets themselves, so a
  server that trickles bytes is cut off on time, and on the name lookup, so a
  slow resolver is too;
- timeouts, connection errors, 429 (honouring Retry-After) and 5xx are retried
  with backoff while the deadline allows; other 4xx are not, and neither is a
  body cut short of its Content-Length (`truncated`: a server that cuts an image
  off does it the same way each time);
- per-host concurrency adapts to each host (`enrichment.media.hosts`): a small
  start for an unknown host, an operator's limit where one is set, halved on
  429/503 (once per round); keep-alive connections are shared by the fetch threads, at
  most a host's ceiling of them kept open per host.

Each request goes straight to urllib3's guarded connection pools, not through
`requests` at all: a session's per-request work (merging settings, hooks, its
cookie jar) was a third of a fetch's CPU, and an adapter's (preparing the
request, proxies from the environment, wrapping the response) about a quarter
of what was left; none of it is needed here (redirects and retries are the
fetcher's own; image servers get no cookies back; no proxy was ever used).

A `Fetcher` is a context manager that owns its threads: the fetch threads, the
name-lookup threads, and the one watchdog thread that times every download.

`Fetcher.fetch` never raises: every failure is a `FetchResult` with a short
machine-readable reason (http_404, timeout, too_large, blocked_address,
bad_scheme, bad_url, dns_error, tls_error, too_many_redirects, truncated,
connection_error, fetch_error) and a human message.
"""

from __future__ import annotations

import hashlib
import http.client
import random
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urljoin, urlsplit

import urllib3.exceptions
from urllib3.exceptions import MaxRetryError, NameResolutionError, NewConnectionError
from urllib3.response import BaseHTTPResponse
from urllib3.util.retry import Retry
from urllib3.util.timeout import Timeout

from enrichment import PROJECT_NAME, __version__
from enrichment.config import Settings
from enrichment.media.deadline import Deadline, DeadlinePassed, Watchdog
from enrichment.media.guard import (
    AddressPolicy,
    AttemptDeadline,
    BlockedAddress,
    GuardedPools,
    Resolver,
    is_public,
)
from enrichment.media.hosts import BUSY, NEUTRAL, OK, HostPacer, PacerClosed, Slot

__all__ = ["MAX_RETRIES", "RETRYABLE", "AddressPolicy", "FetchResult", "Fetcher", "is_public"]

T = TypeVar("T")

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
    """Downloads many images at once, each host at its own adaptive pace; a context manager.

    The thread pool is larger than the downloads allowed at once by two
    batches, so that records waiting for a busy host's slot never hold up
    downloads from other hosts, and the next batch can be fetched while this
    one is classified. Leaving the `with` block (or `close`) stops every thread
    the fetcher started; a closed fetcher fetches nothing more.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.policy = AddressPolicy.from_allow_list(settings.fetch_allow)
        self.user_agent = f"{PROJECT_NAME}/{__version__} (+{settings.contact_url})"
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
        self._watchdog = Watchdog()
        # As many lookups at once as downloads from hosts without a limit of their own:
        # each new host (and each new connection) needs one. Threads start as needed.
        self._resolver = Resolver(threads=settings.fetch_concurrency)
        # One set of pools for every fetch thread, so a host's keep-alive connections serve
        # whichever thread fetches from it next: about as many open as the host's limit,
        # not one per thread that ever fetched from it. Each thread's deadline is its own.
        self._attempt_deadline = AttemptDeadline()
        self._pools = GuardedPools(
            self.policy,
            self._resolver,
            self._attempt_deadline,
            hosts=2 * settings.fetch_concurrency + len(settings.fetch_host_limits),
            per_host=max(settings.fetch_per_host_max, largest),
        )
        self._headers = {
            "User-Agent": self.user_agent,
            "Accept": "image/*",
            # Images are compressed already; asking for identity keeps gzip bombs out.
            "Accept-Encoding": "identity",
            "Connection": "keep-alive",
        }

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        """Wait for the fetches under way, unless leaving on an exception (Ctrl-C among them)."""
        self.close(wait=kind is None)

    def close(self, wait: bool = True) -> None:
        """Stop the fetcher's threads; without `wait`, fetches not yet under way are dropped.

        Downloads already under way then end on their own, by their deadlines at the latest.
        """
        if not wait:
            self.pacer.close()  # those waiting for a host's turn end now, with PacerClosed
        self._pool.shutdown(wait=wait, cancel_futures=True)
        self.pacer.close()
        self._resolver.close()
        self._pools.clear()
        self._watchdog.close(wait=wait)

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
        attempt_deadline = self._attempt_deadline
        with (
            self.pacer.slot(host) as slot,
            Deadline(self.settings.fetch_timeout, self._watchdog) as deadline,
        ):
            attempt_deadline.deadline = deadline
            try:
                return self._attempts(url, slot, deadline)
            finally:
                attempt_deadline.deadline = None

    def _attempts(self, url: str, slot: Slot, deadline: Deadline) -> FetchResult:
        """Try until the image comes, the failure is final, or the deadline leaves no time."""
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
            timeout = Timeout(
                connect=min(settings.fetch_connect_timeout, remaining),
                read=min(settings.fetch_read_timeout, remaining),
            )
            with self._answer(url, timeout) as response:
                answered.append(time.monotonic())
                location = response.headers.get("Location")
                if response.status in REDIRECT_STATUSES and location:
                    url = urljoin(url, location)
                    refusal = _refuse_url(original, url)
                    if refusal is not None:
                        return refusal, None
                    continue
                if response.status != 200:
                    failure = FetchResult.failed(
                        original,
                        f"http_{response.status}",
                        f"the image server answered HTTP {response.status}",
                    )
                    return failure, _retry_after(response)
                return self._read_body(original, response, deadline), None
        return FetchResult.failed(
            original, "too_many_redirects", f"more than {MAX_REDIRECTS} redirects"
        ), None

    @contextmanager
    def _answer(self, url: str, timeout: Timeout) -> Iterator[BaseHTTPResponse]:
        """One GET of `url` (no redirect followed, no retry), its body left to be streamed.

        Afterwards its connection goes back to the pool: kept alive where the body was
        read to its end, closed where it was not (a redirect, an error, a body over the
        cap), so that nothing unread is ever drained.
        """
        response = self._pools.urlopen(
            "GET",
            url.strip(),  # metadata's URLs may carry spaces around them (requests stripped them)
            headers=self._headers,
            redirect=False,
            preload_content=False,
            decode_content=False,
            timeout=timeout,
        )
        try:
            yield response
        finally:
            response.close()  # a no-op for a connection already back (a body read to its end)
            response.release_conn()

    def _read_body(self, url: str, response: BaseHTTPResponse, deadline: Deadline) -> FetchResult:
        limit = self.settings.fetch_max_bytes
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            return FetchResult.failed(
                url, "too_large", f"Content-Length {declared} is over the {limit}-byte limit"
            )
        body = bytearray()
        for chunk in response.stream(CHUNK_BYTES, decode_content=True):
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
    """The reason for one failed try, from the exception urllib3 (or the guard) raised."""
    if deadline.expired or _caused_by(error, DeadlinePassed) is not None:
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
    # A connection that failed comes wrapped (its one attempt used up): judge its reason.
    reason = error.reason if isinstance(error, MaxRetryError) and error.reason else error
    if isinstance(reason, urllib3.exceptions.SSLError):
        return FetchResult.failed(url, "tls_error", _short(error))
    connect_timeout = isinstance(reason, urllib3.exceptions.ConnectTimeoutError) and not isinstance(
        reason, NewConnectionError
    )  # a refused connection is a NewConnectionError too, but no timeout
    if connect_timeout or _caused_by(error, urllib3.exceptions.ReadTimeoutError) is not None:
        return FetchResult.failed(url, "timeout", "the image server did not answer in time")
    if isinstance(error, ValueError):  # urllib3's unparseable URLs and ports, IDNA's
        return FetchResult.failed(url, "bad_url", _short(error))
    # Refused, reset, cut-off and garbled answers; whatever else urllib3 raised.
    if isinstance(error, OSError | urllib3.exceptions.HTTPError | http.client.HTTPException):
        return FetchResult.failed(url, "connection_error", _short(error))
    return FetchResult.failed(url, "fetch_error", f"{type(error).__name__}: {_short(error)}")


def _retry_after(response: BaseHTTPResponse) -> float | None:
    """Seconds the server asks us to wait (delay or HTTP date), if it says so sensibly."""
    try:
        return Retry().get_retry_after(response)
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
