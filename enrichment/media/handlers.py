"""The threads that take each fetched result on: `Fetcher.fetch_then`'s functions run here.

That is where the pipeline decodes (Pillow releases the GIL there) or hands the
bytes to a feeder process, so there are as many as the process's usable CPUs.
They are fed by one queue, not a ThreadPoolExecutor: its `submit` makes a
future, a work item and a done-callback for every download and checks its
thread count each time, about 40 CPU us an image more than a queue of
(outcome, function, value) (measured side by side, 54 against 15 us); the
caller's outcome is the only future.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

__all__ = ["Handlers"]

T = TypeVar("T")
V = TypeVar("V")


class Handlers:
    """`threads` threads running `then(value)` for each hand-on, each settling its outcome."""

    def __init__(self, threads: int, name: str, started: Callable[[], None]) -> None:
        self._queue: queue.SimpleQueue[tuple[Future[Any], Callable[[Any], Any], Any] | None]
        self._queue = queue.SimpleQueue()
        self._started = started
        self._lock = threading.Lock()  # `_closed` against hand-ons racing a shutdown
        self._closed = False
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}_{number}", daemon=True)
            for number in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def hand(self, outcome: Future[T], then: Callable[[V], T], value: V) -> None:
        """Run `then(value)` on a handler thread, settling `outcome`; dropped once shut down."""
        with self._lock:
            if not self._closed:
                self._queue.put((outcome, then, value))
                return
        drop(outcome)

    def shutdown(self, wait: bool) -> None:
        """Run what was handed on and stop (`wait`), or drop what has not begun and stop."""
        with self._lock:
            self._closed = True
        if not wait:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    drop(item[0])
        for _ in self._threads:
            self._queue.put(None)  # after everything handed on: each thread ends at one
        if wait:
            for thread in self._threads:
                thread.join()

    def _run(self) -> None:
        self._started()
        while (item := self._queue.get()) is not None:
            settle(*item)


def settle(outcome: Future[T], then: Callable[[V], T], value: V) -> None:
    """Run `then`, its return or its exception `outcome`'s."""
    if not outcome.set_running_or_notify_cancel():
        return
    try:
        outcome.set_result(then(value))
    except BaseException as error:  # the caller's to judge, through the future
        outcome.set_exception(error)


def drop(outcome: Future[Any]) -> None:
    """Cancel a future no executor runs, telling `concurrent.futures.wait` too (a bare
    `cancel` only tells `result` and the callbacks)."""
    if outcome.cancel():
        outcome.set_running_or_notify_cancel()
