"""One URL's whole time budget, and the one thread per fetcher that enforces them all.

Socket timeouts bound each wait, not their sum: a server that sends a byte
every second never trips them. So each fetch runs under a `Deadline`, and its
fetcher's `Watchdog` shuts the fetch's sockets down when the deadline passes,
which ends any read in progress at once. A timer thread per URL cost a thread
start and two context switches per image; at thousands of images a second that
is a core's worth of work, so one thread keeps a heap of every deadline's end.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import socket
import threading
import time


class DeadlinePassed(TimeoutError):
    """A wait that no socket can cut short (a name lookup) outlasted the deadline."""


class Deadline:
    """One URL's time budget, enforced on the sockets its fetch uses; a context manager."""

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

    def release(self, sock: socket.socket) -> None:
        """`sock` goes back to the shared pool: no longer this deadline's to shut down.

        Another thread may take its connection next; a deadline passing afterwards
        must not cut that thread's download.
        """
        with self._lock:
            if sock in self._sockets:
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
    """The deadlines of one fetcher's downloads: a heap of ends, one thread woken by the earliest.

    The thread starts with the first deadline. A finished fetch is not taken out
    of the heap: its entry is skipped when due. `close` is the sentinel: the
    thread ends once no fetch is left under a deadline, so downloads still in
    flight after `Fetcher.close(wait=False)` are cut off on time too.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Deadline]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._live = 0  # deadlines entered and not yet left
        self._closing = False
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

    def forget(self) -> None:
        """A deadline's fetch has ended (in time or not)."""
        with self._wake:
            self._live -= 1
            if self._closing and self._live == 0:
                self._wake.notify()

    def close(self, wait: bool = True) -> None:
        """End the thread once no fetch is under a deadline; with `wait`, until it has ended."""
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
