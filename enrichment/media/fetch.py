"""Fetching third-party images: concurrent, polite, bounded, and SSRF-safe.

Image URLs come from other people's metadata, so:

- only http and https, at most `MAX_REDIRECTS` redirects, each hop re-checked;
- every connection goes through the SSRF guard (`enrichment.media.guard`),
  checked on the address actually connected to (after DNS, on every hop):
  loopback, private, link-local, CGNAT, unique-local and other non-global
  addresses are refused unless allow-listed, so DNS rebinding and redirects
  inwards fail too;
- a byte cap (on Content-Length and while streaming) and a total deadline per
  URL, which covers the name lookup, every attempt, every wait between them and
  every byte of the body, so a server that trickles bytes is cut off on time,
  and so is a slow resolver;
- timeouts, connection errors, 429 (honouring Retry-After) and 5xx are retried
  with backoff while the deadline allows; other 4xx are not, and neither is a
  body cut short of its Content-Length (`truncated`: a server that cuts an image
  off does it the same way each time);
- per-host concurrency adapts to each host (`enrichment.media.hosts`): a small
  start for an unknown host, an operator's limit where one is set, halved on
  429/503 (once per round), none at all for a while to a host that answers
  nothing (`host_unreachable`); every request, a redirect's too, waits for the turn
  of the host it goes to; keep-alive connections are shared by every download
  from a host, about as many open as its limit lets downloads run at once.

Every download is a task on the fetcher's one event loop (aiohttp, its HTTP
parsing in C), not a thread: with a thread per download a fetch cost about 1 ms
of CPU, most of it holding the GIL, so one process could not fetch for a GPU
(docs/throughput.md, section 5). Redirects, retries and the deadline are the
fetcher's own; image servers get no cookies back; no proxy is used.

A `Fetcher` is a context manager that owns its threads: the event loop's, the
name-lookup threads, the threads that take each download's bytes on
(`fetch_then`: decoding, as many as the usable CPUs) and the threads of work
that fetches (`submit`).

`Fetcher.fetch` never raises: every failure is a `FetchResult` with a short
machine-readable reason (http_404, timeout, too_large, blocked_address,
bad_scheme, bad_url, dns_error, tls_error, too_many_redirects, truncated,
connection_error, host_unreachable, cancelled, fetch_error) and a human message. A
download cut short because the fetcher closed without waiting (Ctrl-C) is `cancelled`,
a failure that passes on a later try (`PASSING`).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar
from urllib.parse import urljoin, urlsplit

import aiohttp
import urllib3.exceptions
from requests.utils import DEFAULT_CA_BUNDLE_PATH, requote_uri
from urllib3.util.retry import Retry
from yarl import URL

from enrichment import PROJECT_NAME, __version__
from enrichment.config import Settings
from enrichment.media.cpus import usable_cpus
from enrichment.media.guard import (
    AddressPolicy,
    GuardedResolver,
    is_public,
    refused_literal,
)
from enrichment.media.handlers import Handlers
from enrichment.media.hosts import BUSY, NEUTRAL, OK, HostDown, HostPacer, PacerClosed, Slot
from enrichment.media.results import FetchResult, classify, short, timed_out

__all__ = [
    "CANCELLED",
    "MAX_RETRIES",
    "PASSING",
    "RETRYABLE",
    "AddressPolicy",
    "FetchResult",
    "Fetcher",
    "is_public",
]

T = TypeVar("T")

MAX_REDIRECTS = 3
MAX_RETRIES = 3
BACKOFF_SECONDS = 0.25
CHUNK_BYTES = 64 * 1024
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
RETRYABLE = frozenset(
    {"timeout", "connection_error", "http_429", "http_500", "http_502", "http_503", "http_504"}
)
CANCELLED = "cancelled"  # cut short by `Fetcher.close(wait=False)`, not by its host
# Failures that may pass on a later try: a harvest or the next run tries them again.
PASSING = RETRYABLE | {"host_unreachable", CANCELLED}
# What an attempt's failure says about its host's load (see enrichment.media.hosts), and
# which failures, where no answer came to a request sent, are its origin's silence.
BUSY_REASONS = frozenset({"http_429", "http_503", "timeout", "connection_error"})
SILENT_REASONS = frozenset({"timeout", "connection_error"})


@dataclass(frozen=True)
class _Attempt:
    """How one try went: its result, a 429/503's Retry-After, when its last request went
    out and its headers came, and whether the fetch's own deadline cut it (rather than
    the server failing)."""

    result: FetchResult
    retry_after: float | None = None
    answered: float | None = None
    cut_by_deadline: bool = False
    sent: float | None = None


@dataclass
class _Hops:
    """How far one attempt got: the URL it asked last, when it asked, when the headers came."""

    url: str
    sent: float | None = None
    answered: float | None = None


@dataclass
class _Turn:
    """The one host slot a download holds: at the host of the request it is making.

    A redirect to another host gives this host's slot back before waiting for that
    host's turn, so a host reached through redirects (a CDN, a museum's own server)
    keeps its own limit, and no download holds one host's slot while it waits for
    another's (two hosts redirecting to each other cannot starve each other).
    """

    pacer: HostPacer
    slot: Slot | None = None

    async def at(self, target: URL) -> Slot:
        """The slot at `target`'s host, waiting for its turn unless it is the one held."""
        host, origin = _host_key(target), _origin(target)
        if self.slot is not None and self.slot.host == host:
            self.slot.move_to(origin)  # http -> https on one host keeps its turn
            return self.slot
        self.leave()
        self.slot = await self.pacer.acquire(host, origin)
        return self.slot

    def leave(self) -> None:
        if self.slot is not None:
            self.slot.release()
            self.slot = None


class Fetcher:
    """Downloads many images at once, each host at its own adaptive pace; a context manager.

    Downloads run on one event loop in a thread of the fetcher's own; callers on
    any other thread wait for one (`fetch`), or have its bytes handed on to a
    function on the handler threads (`fetch_then`), as many of which run at once
    as this process has usable CPUs: that is where images are decoded, past the
    GIL in Pillow's C code. Leaving the `with` block (or `close`) stops every thread
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
        # Work that itself fetches (`submit`) blocks a thread while it waits: as many as
        # downloads may run at once, plus two batches, so waiting work never holds up
        # other hosts' downloads. Threads start as needed.
        # Which threads are this fetcher's own: `close` on one of them could never join it.
        self._own = threading.local()
        self._workers = ThreadPoolExecutor(
            max_workers=settings.fetch_concurrency + largest + 2 * settings.batch_size,
            thread_name_prefix="fetch",
            initializer=self._mark_own,
        )
        # Decoding the fetched bytes (or handing them to as many feeder processes).
        self._handlers = Handlers(
            max(usable_cpus(), settings.feeders_per_gpu), "fetched", started=self._mark_own
        )
        # As many lookups at once as downloads from hosts without a limit of their own.
        self._lookups = ThreadPoolExecutor(
            max_workers=settings.fetch_concurrency, thread_name_prefix="resolve"
        )
        self._headers = {
            "User-Agent": self.user_agent,
            "Accept": "image/*",
            # Images are compressed already; asking for identity keeps gzip bombs out.
            "Accept-Encoding": "identity",
        }
        self._downloads: set[asyncio.Task[FetchResult]] = set()
        self._closed = False
        self._lock = threading.Lock()  # `_closed` against new downloads being scheduled
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="fetch-loop", daemon=True)
        self._thread.start()
        self._session = asyncio.run_coroutine_threadsafe(self._open(), self._loop).result()

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        """Wait for the fetches under way, unless leaving on an exception (Ctrl-C among them)."""
        self.close(wait=kind is None)

    def close(self, wait: bool = True) -> None:
        """Stop the fetcher's threads; without `wait` (leaving on Ctrl-C or an error), fetches
        not yet under way are dropped and those under way cancelled: each ends as a
        `cancelled` failure for whoever waits on it. Left to their deadlines, a
        thread blocked in `fetch` (a harvest's) held the process's exit for as long.
        """
        if self._thread is None:
            return
        if threading.get_ident() == self._thread.ident:
            raise RuntimeError("Fetcher.close on the fetcher's own event loop would wait for ever")
        if getattr(self._own, "thread", False):
            raise RuntimeError(
                "Fetcher.close from work the fetcher runs (a `fetch_then` function or `submit` "
                "work) would wait for that work itself: close it from the thread that made it"
            )
        if not wait:
            self._loop.call_soon_threadsafe(self._cancel_downloads)
        self._workers.shutdown(wait=wait, cancel_futures=not wait)
        with self._lock:
            self._closed = True
        finished = asyncio.run_coroutine_threadsafe(self._finish(), self._loop)
        if wait:
            finished.result()
        self._handlers.shutdown(wait)
        if wait:
            self._thread.join()
        self._thread = None

    def _cancel_downloads(self) -> None:
        """On the loop: those waiting for a host's turn end now (PacerClosed), the others are
        cancelled (`_done` settles each)."""
        self.pacer.close()
        for task in list(self._downloads):
            task.cancel()

    def _mark_own(self) -> None:
        self._own.thread = True

    def submit(self, function: Callable[..., T], *args: Any) -> Future[T]:
        """Run work that fetches (and decodes) on a thread of its own."""
        return self._workers.submit(function, *args)

    def fetch(self, url: str) -> FetchResult:
        """One URL to its bytes, or to the reason there are none; never raises.

        It waits for the download: call it from any thread but the fetcher's own loop."""
        if self._thread is not None and threading.get_ident() == self._thread.ident:
            raise RuntimeError("Fetcher.fetch on the fetcher's own event loop would wait for ever")
        return self._start(url).result()

    def fetch_then(self, url: str, then: Callable[[FetchResult], T]) -> Future[T]:
        """Fetch `url`, then hand its result to `then` on a handler thread; what it returns.

        No thread waits for the download: it is a task on the event loop until its
        bytes (or its failure) are there.
        """
        outcome: Future[T] = Future()
        self._start(url).add_done_callback(partial(self._hand_on, outcome, then))
        return outcome

    def _hand_on(
        self, outcome: Future[T], then: Callable[[FetchResult], T], fetched: Future[FetchResult]
    ) -> None:
        """Pass a finished download on to `then`; whatever happens, `outcome` is settled, since a
        caller waits on it (an exception here would only be logged by the future)."""
        self._handlers.hand(outcome, then, fetched.result())

    def _start(self, url: str) -> Future[FetchResult]:
        fetched: Future[FetchResult] = Future()
        with self._lock:
            if not self._closed:
                self._loop.call_soon_threadsafe(self._begin, url, fetched)
                return fetched
        # Closed without waiting (Ctrl-C) just before this fetch began: a failure that passes,
        # as the downloads it cut short are (a harvest fetches it on its next start).
        fetched.set_result(FetchResult.failed(url, CANCELLED, "the fetcher is closed"))
        return fetched

    def _begin(self, url: str, fetched: Future[FetchResult]) -> None:
        """On the loop: the download as a task, known to `_finish` from now on."""
        task = self._loop.create_task(self._fetch(url))
        self._downloads.add(task)
        task.add_done_callback(partial(self._done, url, fetched))

    def _done(
        self, url: str, fetched: Future[FetchResult], task: asyncio.Task[FetchResult]
    ) -> None:
        """The download's result; one that ended otherwise (a bug: `_fetch` returns every
        failure) is a `fetch_error` all the same, since `fetch` never raises."""
        self._downloads.discard(task)
        if task.cancelled():
            fetched.set_result(FetchResult.failed(url, CANCELLED, "the download was cancelled"))
        elif (error := task.exception()) is not None:
            message = f"{type(error).__name__}: {short(error)}"
            fetched.set_result(FetchResult.failed(url, "fetch_error", message))
        else:
            fetched.set_result(task.result())

    def _run_loop(self) -> None:
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    async def _open(self) -> aiohttp.ClientSession:
        resolver = GuardedResolver(self.policy, self._lookups)
        connector = aiohttp.TCPConnector(
            limit=0,  # the pacer limits downloads, host by host
            ssl=ssl.create_default_context(cafile=DEFAULT_CA_BUNDLE_PATH),
            resolver=resolver,
            socket_factory=resolver.socket_for,
        )
        return aiohttp.ClientSession(
            connector=connector,
            headers=self._headers,
            auto_decompress=False,
            trust_env=False,  # no proxy from the environment
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None),
        )

    async def _finish(self) -> None:
        """Wait for the downloads under way (each ends by its deadline), then stop the loop."""
        if self._downloads:
            await asyncio.wait(set(self._downloads))
        self.pacer.close()
        await self._session.close()
        # Only now: a lookup cancelled under a download would cancel the download itself.
        self._lookups.shutdown(wait=False, cancel_futures=True)  # a stuck one is left to end
        # After this coroutine's own result is handed over (in the same round of callbacks).
        self._loop.call_soon(self._loop.stop)

    async def _fetch(self, url: str) -> FetchResult:
        target = _hop(url, url, self.policy)
        if isinstance(target, FetchResult):
            return target
        turn = _Turn(self.pacer)
        try:
            await turn.at(target)  # the deadline starts once this turn has come
            return await self._attempts(url, target, turn)
        except PacerClosed as closed:
            return FetchResult.failed(url, CANCELLED, str(closed))
        except HostDown as down:
            return FetchResult.failed(url, "host_unreachable", str(down))
        finally:
            turn.leave()

    async def _attempts(self, url: str, target: URL, turn: _Turn) -> FetchResult:
        """Try until the image comes, the failure is final, or the deadline leaves no time.

        Each attempt's outcome is reported to the host that gave it (the last one
        asked, after any redirects)."""
        end = self._loop.time() + self.settings.fetch_timeout
        host_said: FetchResult | None = None  # the host's last answer before the deadline
        for attempt in range(MAX_RETRIES + 1):
            began = time.monotonic()
            tried = await self._attempt(url, target, end, turn)
            result = tried.result
            reason = result.error_reason
            sent = tried.sent or began
            slot = turn.slot  # None only where the deadline cut the wait for a host's turn
            heard = tried.answered is not None
            if slot is not None and (heard or (reason in SILENT_REASONS and tried.sent)):
                slot.heard(heard)  # an answer of any kind, or silence to a request sent
            if reason is None:
                latency = tried.answered - sent if tried.answered else None
                if slot is not None:
                    slot.report(OK, sent, latency, None)
            elif host_said is not None and tried.cut_by_deadline:
                # Our deadline cut a retry short: that says nothing new about the
                # host, and its last real answer (a 429, a 503) is the truer reason.
                if slot is not None:
                    slot.report(NEUTRAL, sent, None, None)
                return host_said
            elif slot is not None:
                signal = BUSY if reason in BUSY_REASONS else NEUTRAL
                slot.report(signal, sent, None, tried.retry_after)
            if reason not in RETRYABLE or attempt == MAX_RETRIES:
                break
            if slot is not None and slot.outage.until > time.monotonic():
                # Found down meanwhile (this try may have been the last straw): ask no more.
                return FetchResult.failed(url, "host_unreachable", str(HostDown(slot.outage)))
            host_said = result
            pause = tried.retry_after if tried.retry_after is not None else _backoff(attempt)
            if pause >= end - self._loop.time():
                break  # the answer would come too late: give up now, with the last reason
            await asyncio.sleep(pause)
        return result

    async def _attempt(self, url: str, target: URL, end: float, turn: _Turn) -> _Attempt:
        """One try, following redirects, within what is left of the deadline."""
        hops = _Hops(url)
        budget = asyncio.timeout_at(end)
        try:
            async with budget:
                result, retry_after = await self._follow(url, target, end, turn, hops)
        except Exception as error:  # every failure is a result; classified below
            if budget.expired():
                late = timed_out(url, self.settings.fetch_timeout)
                return _Attempt(late, None, hops.answered, cut_by_deadline=True, sent=hops.sent)
            return _Attempt(classify(url, error, hops.url), None, hops.answered, sent=hops.sent)
        return _Attempt(result, retry_after, hops.answered, sent=hops.sent)

    async def _follow(
        self,
        original: str,
        target: URL,
        end: float,
        turn: _Turn,
        hops: _Hops,
    ) -> tuple[FetchResult, float | None]:
        """`target` (the parsed and checked `original`), then each redirect, checked in turn,
        each asked in its own host's turn (`_Turn`); `hops` says how far it got."""
        settings = self.settings
        url = original
        for _ in range(MAX_REDIRECTS + 1):
            slot = await turn.at(target)
            remaining = end - self._loop.time()
            timeout = aiohttp.ClientTimeout(
                total=None,
                sock_connect=min(settings.fetch_connect_timeout, remaining),
                sock_read=min(settings.fetch_read_timeout, remaining),
            )
            asked_at = time.monotonic()
            hops.url, hops.sent, hops.answered = url, asked_at, None
            # The URL as checked, not a string aiohttp would parse again.
            async with self._session.get(
                target, allow_redirects=False, timeout=timeout
            ) as response:
                hops.answered = answered = time.monotonic()
                location = response.headers.get("Location")
                if response.status in REDIRECT_STATUSES and location:
                    url = urljoin(url, location)
                    hop = _hop(original, url, self.policy)
                    if isinstance(hop, FetchResult):
                        return hop, None
                    slot.heard(True)
                    if _host_key(hop) != slot.host:  # leaving this host: its answer counts
                        slot.report(OK, asked_at, answered - asked_at, None)
                    target = hop
                    continue
                if response.status != 200:
                    failure = FetchResult.failed(
                        original,
                        f"http_{response.status}",
                        f"the image server answered HTTP {response.status}",
                    )
                    return failure, _retry_after(response.headers.get("Retry-After"))
                return await self._read_body(original, response), None
        return FetchResult.failed(
            original, "too_many_redirects", f"more than {MAX_REDIRECTS} redirects"
        ), None

    async def _read_body(self, url: str, response: aiohttp.ClientResponse) -> FetchResult:
        """The body, within the byte cap; leaving `_follow`'s `async with` then gives the
        connection back to the pool where it was read to its end, and closes it where not."""
        limit = self.settings.fetch_max_bytes
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit():
            if int(declared) > limit:
                return FetchResult.failed(
                    url, "too_large", f"Content-Length {declared} is over the {limit}-byte limit"
                )
            content = await response.read()  # no more than it declared
        else:
            body = bytearray()
            async for chunk in response.content.iter_chunked(CHUNK_BYTES):
                body += chunk
                if len(body) > limit:
                    return FetchResult.failed(
                        url, "too_large", f"the body is over the {limit}-byte limit"
                    )
            content = bytes(body)
        return FetchResult(url=url, content=content, sha256=hashlib.sha256(content).hexdigest())


def _hop(url: str, hop: str, policy: AddressPolicy) -> URL | FetchResult:
    """`hop` (the URL or a redirect target) as aiohttp will request it, or why it must not be.

    The literal check is on the host as aiohttp resolves it: yarl maps it by IDNA first,
    and fullwidth digits or ideographic full stops then spell an ASCII address.
    """
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
    try:
        # Metadata's URLs may carry spaces around them (requests stripped them too).
        parsed = URL(hop.strip())
        mapped = parsed.raw_host
        if not mapped:
            return FetchResult.failed(url, "bad_url", f"no host in {hop[:200]}")
        for spelling in dict.fromkeys((mapped, host)):
            refused = refused_literal(policy, spelling)
            if refused is not None:
                return FetchResult.failed(url, "blocked_address", refused)
        # The mapped host, but the path and query as the metadata gave them, with only what a
        # request line cannot carry quoted (as requests and urllib3 did): yarl's own requoting
        # would decode `%3A%2F` in a thumbnail URL's `uri=` and turn a space into `+`.
        return URL.build(
            scheme=parts.scheme.lower(),
            user=parsed.raw_user,
            password=parsed.raw_password,
            host=f"[{mapped}]" if ":" in mapped else mapped,
            port=parsed.explicit_port,
            path=requote_uri(parts.path) or "/",
            query_string=requote_uri(parts.query),
            encoded=True,
        )
    except (ValueError, UnicodeError) as error:
        return FetchResult.failed(url, "bad_url", f"unparseable URL: {short(error)}")


def _origin(target: URL) -> str:
    """What a request goes to, "host:port": the unit a host's outage is kept for."""
    return f"{_host_key(target)}:{target.port}"


def _host_key(target: URL) -> str:
    """The host as aiohttp will reach it (after IDNA mapping), so that one host in several
    spellings still has one limit."""
    return (target.raw_host or "").lower().rstrip(".")


def _retry_after(value: str | None) -> float | None:
    """Seconds the server asks us to wait (delay or HTTP date), if it says so sensibly."""
    if value is None:
        return None
    try:
        return Retry().parse_retry_after(value)
    except urllib3.exceptions.InvalidHeader:
        return None


def _backoff(attempt: int) -> float:
    """Exponential backoff with jitter, so that retries of many downloads spread out."""
    return BACKOFF_SECONDS * 2**attempt * random.uniform(0.5, 1.0)
