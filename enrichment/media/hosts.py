"""Per-host politeness that finds each host's pace: how many downloads at once, host by host.

Nearly every image of a real run comes from one host (Europeana's thumbnail
service), the rest from thousands of small museum servers. One fixed cap fits
neither, so each host gets an adaptive limit, in the manner of TCP congestion
control:

- a host named in ENRICH_FETCH_HOST_LIMITS (or Europeana's thumbnail host, which
  has a built-in default) starts at its limit and never goes above it;
- any other host starts at ENRICH_FETCH_PER_HOST (a museum's server) and is let
  up to ENRICH_FETCH_PER_HOST_MAX only while its answers stay as fast as the
  fastest it has given. As in TCP Vegas, `limit * (1 - best / median)` estimates
  how many of our requests wait in the host's own queue; a server that starts
  queueing them (its answers slow down as we add more) is not pushed further;
- a 429 or 503 (with or without Retry-After), a timeout or a refused connection
  halves the limit at once, but only once per round: busy answers to requests
  sent before the cut tell of the load that caused it, not of more (as TCP cuts
  its window once per loss event), so a burst of 429s from 256 downloads in
  flight halves the limit once instead of taking it to 1. A Retry-After (capped)
  also pauses new requests to that host; then the limit grows back by one per
  window of good answers.
- a host (on one port: an origin) that answers nothing at all (`DOWN_AFTER` tries
  in a row time out before any header or are refused, with no answer of any kind
  between them) is *down* for `DOWN_FOR` seconds, doubled each time it is found
  down again (at most `DOWN_FOR_MAX`): no request goes to it, and the downloads
  that were retrying it stop. The downloads waiting for its turn or coming to it
  end at once as `host_unreachable` (`HostDown`), which the next run retries;
  but a host with a limit of its own (the operator's, or Europeana's thumbnail
  service) is the run's source, not one museum among many, so there they first
  wait, as for a Retry-After, for as long as one fetch may take
  (ENRICH_FETCH_TIMEOUT): a blip costs a stall, not thousands of failed records,
  and a host that stays away still ends every download in bounded time.
  Without this, the halving took a dead museum server to one download at a
  time, each waiting out its whole deadline: a day for a dataset of a few
  thousand images. When the time is up, one download at a
  time is let through as a probe: an answer of any kind ends the state, silence
  starts it again for twice as long.

Growth is judged over a window of at least `MIN_WINDOW` answers, so a short
burst never raises a limit on the strength of a few lucky timings.

The pacer lives on the fetcher's one event loop, so it needs no locks. Waiting
is per host, as with img2dataset's semaphore per host: each host has a queue of
waiters of its own, and a finished download wakes one download waiting for that
host, never the waiters of every other host. Downloads from hosts without a
limit of their own also share the total (ENRICH_FETCH_CONCURRENCY); one whose
host has room but the total has none waits in the total's own queue, woken one
at a time as the total frees up. A download whose task is cancelled while it
waits is skipped by later wake-ups, and passes on one it had already been given,
so that no wake-up is lost with it. (The fetcher cancels none: closing wakes the
waiters with `PacerClosed`, and a download's deadline starts once it has its slot.)
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import deque
from dataclasses import dataclass, field

MIN_WINDOW = 16
DOWN_AFTER = 8
DOWN_FOR = 60.0
DOWN_FOR_MAX = 900.0
# Answers within this many seconds of the best count as no slower: sub-millisecond
# local answers and a busy client's own scheduling jitter by that much.
SLOWER_SLACK = 0.05
# Signals: what a finished attempt tells the limiter about the host's load.
OK, BUSY, NEUTRAL = "ok", "busy", "neutral"


@dataclass
class HostLimit:
    """One host's current concurrency, its ceiling, and what it has been seen to bear."""

    limit: int
    ceiling: int
    fixed: bool  # an operator's (or built-in) limit: starts at the ceiling
    in_use: int = 0
    most: int = 0  # the most downloads at once so far, for tests and logs
    paused_until: float = 0.0
    threshold: int = 0  # below it the limit doubles per window; above, it adds one
    best: float | None = None  # the fastest window's median time to headers
    window: list[float] = field(default_factory=list)
    cut_at: float = float("-inf")  # when the limit was last halved (time.monotonic)
    # Downloads waiting for this host's turn (see `_wait`).
    turn: deque[asyncio.Future[bool]] = field(default_factory=deque, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.threshold = self.ceiling

    def record(
        self, signal: str, began: float, latency: float | None, retry_after: float | None
    ) -> None:
        """Adjust the limit after one attempt that began at `began` (time.monotonic)."""
        now = time.monotonic()
        if signal == BUSY:
            if began > self.cut_at:
                self.limit = max(1, self.limit // 2)
                self.threshold = self.limit
                self.window.clear()
                self.cut_at = now
            if retry_after:
                self.paused_until = max(self.paused_until, now + retry_after)
            return
        if signal != OK or latency is None:
            return
        self.window.append(latency)
        if len(self.window) < max(MIN_WINDOW, 2 * self.limit):
            return
        median = statistics.median(self.window)
        self.window.clear()
        if self.best is None or median < self.best:
            self.best = median
        slower = max(self.best, median - SLOWER_SLACK)
        queued = self.limit * (1 - self.best / slower) if slower > 0 else 0.0
        if queued > max(1.0, self.limit / 8):
            self.threshold = self.limit  # the host queues us: stop doubling, hold here
            return
        if self.limit < self.ceiling:
            grown = self.limit * 2 if self.limit < self.threshold else self.limit + 1
            self.limit = min(self.ceiling, grown)


@dataclass
class Outage:
    """Whether one origin (a host and port) answers at all; see the module's docstring.

    Kept per origin, not per host: a museum's image server on one port may be down while
    its web server on another answers. Only answers and silences count: a try that ended
    for another reason (our own deadline while waiting, a name that did not resolve)
    says nothing either way."""

    unanswered: int = 0  # tries in a row that got no answer at all
    until: float = 0.0  # no request goes to the origin before then (time.monotonic)
    length: float = 0.0  # how long it was last held down; 0 once it answers
    in_flight: int = 0  # downloads holding a turn at this origin

    @property
    def suspect(self) -> bool:
        """Found down, and not yet heard from since: one download at a time probes it."""
        return self.unanswered >= DOWN_AFTER

    def heard(self, answered: bool) -> bool:
        """Count one try: any answer, or none at all. True when that changed the state
        (found down, or back): the downloads waiting for the origin must look again."""
        if answered:
            back = self.suspect
            self.unanswered, self.until, self.length = 0, 0.0, 0.0
            return back
        self.unanswered += 1
        now = time.monotonic()
        if not self.suspect or self.until > now:
            return False
        self.length = min(DOWN_FOR_MAX, 2 * self.length or DOWN_FOR)
        self.until = now + self.length
        return True


class PacerClosed(RuntimeError):
    """The fetcher closed while a download still waited for its host's turn."""


class HostDown(RuntimeError):
    """The download's host is down (see the module's docstring): it is not asked."""

    def __init__(self, outage: Outage) -> None:
        super().__init__(
            f"its host answered none of the last {outage.unanswered} requests (timeouts,"
            f" refused connections) and is not asked again for {outage.length:g} s;"
            " the next run tries it again"
        )


class HostPacer:
    """The limits of every host one fetcher talks to, plus a total over hosts without their own.

    Hosts with a limit of their own (an override or a built-in default) count
    only against it: their limit is the operator's statement of what that host
    bears, and a total cap below it would silently override it.
    """

    def __init__(
        self,
        start: int,
        ceiling: int,
        overrides: tuple[tuple[str, int], ...],
        total: int,
        max_pause: float,
    ) -> None:
        self.start = start
        self.ceiling = max(start, ceiling)
        self.overrides = overrides
        self.total = total
        self.total_in_use = 0
        self.total_most = 0
        self.max_pause = max_pause
        self.hosts: dict[str, HostLimit] = {}
        self.outages: dict[str, Outage] = {}  # by origin, "host:port"
        self.closed = False
        # Downloads whose host has room but the total has none (hosts without their own limit).
        self._total_turn: deque[asyncio.Future[bool]] = deque()

    def close(self) -> None:
        """Wake every download still waiting for a slot: it ends with PacerClosed."""
        self.closed = True
        for limit in self.hosts.values():
            _wake(limit.turn, len(limit.turn))
        _wake(self._total_turn, len(self._total_turn))

    def override_for(self, host: str) -> int | None:
        """The first matching `host=N` or `*.domain=N` (which also covers `domain` itself)."""
        for pattern, limit in self.overrides:
            if pattern.startswith("*."):
                domain = pattern[2:]
                if host == domain or host.endswith("." + domain):
                    return limit
            elif host == pattern:
                return limit
        return None

    def host(self, host: str) -> HostLimit:
        """This host's limit, created on first sight."""
        found = self.hosts.get(host)
        if found is None:
            override = self.override_for(host)
            if override is None:
                found = HostLimit(self.start, self.ceiling, fixed=False)
            else:
                found = HostLimit(override, override, fixed=True)
            self.hosts[host] = found
        return found

    async def acquire(self, host: str, origin: str | None = None) -> Slot:
        """Wait for a slot at `host` (and in the total, where it counts); the caller releases it.
        `origin` ("host:port", default `host`) is what the request goes to: `HostDown` where
        that is down.

        Nothing awaits between the turn and the slot's return, so a cancellation
        reaches the caller only once it holds the slot and can release it.
        """
        limit = self.host(host)
        origin = origin or host
        outage = self.outages.setdefault(origin, Outage())
        await self._wait_for_turn(limit, outage)
        limit.in_use += 1
        limit.most = max(limit.most, limit.in_use)
        outage.in_flight += 1
        if not limit.fixed:
            self.total_in_use += 1
            self.total_most = max(self.total_most, self.total_in_use)
        return Slot(self, limit, host, origin, outage)

    def _release(self, limit: HostLimit) -> None:
        limit.in_use -= 1
        _wake(limit.turn)
        if not limit.fixed:
            self.total_in_use -= 1
            _wake(self._total_turn)

    async def _wait_for_turn(self, limit: HostLimit, outage: Outage) -> None:
        """Until `limit`'s host has room, is not paused, and the total has room where it counts.

        A waiter is woken for one freed slot (its host's or the total's). If it
        cannot use it and goes on to wait for something else, it passes the
        wake-up on, so that the slot is never left free while another could use it.
        """
        woken_by: deque[asyncio.Future[bool]] | None = None
        patience: float | None = None  # how long a host of its own is waited for, when down
        while True:
            if self.closed:
                raise PacerClosed("the fetcher closed before this download's turn")
            now = time.monotonic()
            if outage.until > now and limit.fixed and patience is None:
                patience = now + self.max_pause
            if outage.until > now and (patience is None or now >= patience):
                if woken_by is not None:
                    _wake(woken_by)  # another download may use the turn
                raise HostDown(outage)
            timeout: float | None = None
            if outage.until > now:  # a host of its own, waited for as long as a fetch takes
                queue, timeout = limit.turn, min(outage.until, patience or now) - now
            elif outage.suspect and outage.in_flight:  # one probe at a time
                queue = limit.turn
            elif limit.paused_until > now:
                queue, timeout = limit.turn, limit.paused_until - now
            elif limit.in_use >= limit.limit:
                queue = limit.turn
            elif not limit.fixed and self.total_in_use >= self.total:
                queue = self._total_turn
            else:
                return
            if woken_by is not None and woken_by is not queue:
                _wake(woken_by)
            woken_by = queue if await _wait(queue, timeout) else None

    def record(
        self,
        limit: HostLimit,
        signal: str,
        began: float,
        latency: float | None,
        retry_after: float | None,
    ) -> None:
        """Adjust `limit` after an attempt (Retry-After capped); if it grew, wake as many."""
        pause = min(retry_after, self.max_pause) if retry_after else None
        before = limit.limit
        limit.record(signal, began, latency, pause)
        if limit.limit > before:  # room for more at this host: wake as many
            _wake(limit.turn, limit.limit - before)


async def _wait(queue: deque[asyncio.Future[bool]], timeout: float | None) -> bool:
    """Wait in `queue` until woken (True) or until `timeout` seconds have passed (False).

    A waiter that times out or is cancelled stays in the queue as a finished
    future, which `_wake` skips: taking it out at once would cost a scan of the
    queue per waiter, and a deadline can cancel thousands of them together.
    """
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[bool] = loop.create_future()
    queue.append(waiter)
    timer = None if timeout is None else loop.call_later(timeout, _expire, waiter)
    try:
        return await waiter
    except asyncio.CancelledError:
        if waiter.done() and not waiter.cancelled() and waiter.result():
            _wake(queue)  # woken, then cancelled before it could act: the next one acts
        raise
    finally:
        waiter.cancel()  # a no-op once it is done; otherwise `_wake` now skips it
        if timer is not None:
            timer.cancel()


def _expire(waiter: asyncio.Future[bool]) -> None:
    """End a paused host's wait when the pause ends, unless it was woken first."""
    if not waiter.done():
        waiter.set_result(False)


def _wake(queue: deque[asyncio.Future[bool]], n: int = 1) -> None:
    """Wake the first `n` downloads still waiting in `queue`."""
    while n > 0 and queue:
        waiter = queue.popleft()
        if not waiter.done():
            waiter.set_result(True)
            n -= 1


@dataclass
class Slot:
    """A download's place at its host, through which each attempt reports how it went."""

    pacer: HostPacer
    limit: HostLimit
    host: str
    origin: str
    outage: Outage
    released: bool = False

    def report(
        self, signal: str, began: float, latency: float | None, retry_after: float | None
    ) -> None:
        """How the attempt sent at `began` (time.monotonic) went."""
        self.pacer.record(self.limit, signal, began, latency, retry_after)

    def heard(self, answered: bool) -> None:
        """Whether the attempt got any answer from its origin (`Outage.heard`)."""
        if self.outage.heard(answered):  # down, or back: every download waiting looks again
            _wake(self.limit.turn, len(self.limit.turn))

    def move_to(self, origin: str) -> None:
        """The download's next request goes to another origin of this host (a redirect from
        http to https): it keeps its place, unless that origin is down (`HostDown`)."""
        if origin == self.origin:
            return
        outage = self.pacer.outages.setdefault(origin, Outage())
        if outage.until > time.monotonic():
            raise HostDown(outage)
        self.outage.in_flight -= 1
        outage.in_flight += 1
        self.origin, self.outage = origin, outage

    def release(self) -> None:
        """Give the place back (once; again is a no-op) and wake the next download for it."""
        if not self.released:
            self.released = True
            self.outage.in_flight -= 1
            self.pacer._release(self.limit)
