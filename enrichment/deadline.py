"""One call's whole time budget, and the one thread per client that enforces them all.

Socket timeouts bound each wait, not their sum: a server that sends a byte
every second never trips them. So each call to the Annotations API, and each page
of the Search API, runs under a `Deadline` (`deadline_http`), and its client's
`Watchdog` shuts the call's
sockets down when the deadline passes, which ends any read in progress at once.
One thread keeps a heap of every deadline's end, rather than a timer thread per
call. (The image fetcher needs none of this: its downloads are tasks on an event
loop, each under an `asyncio.timeout`.)
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import socket
import threading
import time


class Deadline:
    """One call's time budget, enforced on the sockets it uses; a context manager."""

    def __init__(self, seconds: float, watchdog: Watchdog) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.expired = False
        self._watchdog = watchdog
        self._finished = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def __enter__(self) -> Deadline:
        self._watchdog.watch(self)
        return self

    def __exit__(self, *_: object) -> None:
        with self._lock:
            self._finished = True
            self._sockets.clear()
        self._watchdog.forget()

    def remaining(self) -> float:
        return 0.0 if self.expired else max(0.0, self.end - time.monotonic())

    def watch(self, sock: socket.socket) -> None:
        """Shut `sock` down when the deadline passes (at once if it has)."""
        with self._lock:
            if self.expired:
                _shut(sock)
            elif not self._finished:
                self._sockets.append(sock)

    def unwatch(self, sock: socket.socket) -> None:
        """`sock` is done with this call (its connection went back to the pool, where the
        next call takes it): the deadline passing must no longer shut it."""
        with self._lock, contextlib.suppress(ValueError):
            self._sockets.remove(sock)

    def expire(self) -> None:
        """The budget is spent: end every read in progress; from now on nothing waits."""
        with self._lock:
            if self._finished:
                return
            self.expired = True
            for sock in self._sockets:
                _shut(sock)


class Watchdog:
    """The deadlines of one client's calls: a heap of ends, one thread woken by the earliest.

    The thread starts with the first deadline. A finished call is not taken out
    of the heap: its entry is skipped when due. `close` is the sentinel: the
    thread ends once no call is left under a deadline, so calls still in flight
    when the client closes are cut off on time too.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Deadline]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._live = 0  # deadlines entered and not yet left
        self._closing = False
        self._aborted = False
        self._thread: threading.Thread | None = None

    def watch(self, deadline: Deadline) -> None:
        with self._wake:
            self._live += 1
            heapq.heappush(self._heap, (deadline.end, next(self._order), deadline))
            if self._heap[0][2] is deadline:
                self._wake.notify()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="deadlines", daemon=True)
                self._thread.start()
            aborted = self._aborted
        if aborted:
            deadline.expire()

    def forget(self) -> None:
        """A deadline's call has ended (in time or not)."""
        with self._wake:
            self._live -= 1
            if self._closing and self._live == 0:
                self._wake.notify()

    def abort(self) -> None:
        """Spend every budget now, those of calls still to come included: a Ctrl-C must not
        wait for answers that may take minutes."""
        with self._wake:
            self._aborted = True
            live = [deadline for _, _, deadline in self._heap]
        for deadline in live:
            deadline.expire()

    def close(self, wait: bool = True) -> None:
        """End the thread once no call is under a deadline; with `wait`, until it has ended."""
        with self._wake:
            self._closing = True
            self._wake.notify()
            thread = self._thread
        if wait and thread is not None:
            thread.join()

    def _run(self) -> None:
        while True:
            with self._wake:
                while True:
                    if self._closing and self._live == 0:
                        self._heap.clear()
                        self._thread = None
                        return
                    now = time.monotonic()
                    if self._heap and self._heap[0][0] <= now:
                        break
                    self._wake.wait(self._heap[0][0] - now if self._heap else None)
                _, _, due = heapq.heappop(self._heap)
            due.expire()


def _shut(sock: socket.socket) -> None:
    # socket.socket's own shutdown, not SSLSocket's, which would drop the TLS
    # state under a read that another thread is still in. Already closed is fine.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
