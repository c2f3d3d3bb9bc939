"""A requests adapter whose every call has an overall deadline, as each image download has.

Socket timeouts bound each wait, not their sum: an Annotations API that
trickles its answer one byte every 30 s never trips a 120 s read timeout and
holds a publish for as long as it likes. So each call runs under a `Deadline`
(`enrichment.publish.deadline`): the connections of this adapter put their socket
under the deadline of the call their thread is making as soon as the request
is sent, and the watchdog shuts the socket down when the deadline passes,
which ends the read at once. Retries of the call stay under the same deadline.
A connection given back to the pool leaves its call's deadline first: the next
call to take it, on any thread, must not lose it to the last one's deadline.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.util.retry import Retry

from enrichment.publish.deadline import Deadline, Watchdog


class CallDeadlines:
    """The deadline of the call each thread is making now, and the watchdog that enforces it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._watchdog = Watchdog()
        self._current = threading.local()

    @contextmanager
    def call(self) -> Iterator[Deadline]:
        """One call's budget: every socket it reads from is shut when the budget is spent."""
        with Deadline(self.seconds, self._watchdog) as deadline:
            self._current.deadline = deadline
            try:
                yield deadline
            finally:
                self._current.deadline = None

    def current(self) -> Deadline | None:
        return getattr(self._current, "deadline", None)

    def abort(self) -> None:
        """End every call in flight at once, and every call after it."""
        self._watchdog.abort()

    def close(self) -> None:
        self._watchdog.close(wait=False)


class _DeadlineHTTPConnection(HTTPConnection):
    # Set per adapter (see DeadlineAdapter).
    deadlines: CallDeadlines
    _watched_by: Deadline | None = None

    def getresponse(self) -> Any:  # type: ignore[override]
        # The request is sent; headers and body are read from here on, under the deadline.
        deadline = self.deadlines.current()
        if deadline is not None and self.sock is not None:
            deadline.watch(self.sock)
            self._watched_by = deadline
        return super().getresponse()

    def leave_deadline(self) -> None:
        """The call is done with this connection: its deadline no longer shuts the socket."""
        deadline, self._watched_by = self._watched_by, None
        if deadline is not None and self.sock is not None:
            deadline.unwatch(self.sock)


class _DeadlineHTTPSConnection(_DeadlineHTTPConnection, HTTPSConnection):
    pass


class _DeadlineHTTPPool(HTTPConnectionPool):
    def _put_conn(self, conn: Any) -> None:
        # Back in the pool before the call has left its deadline (the body is read, the
        # caller is still in `CallDeadlines.call`): from now on the connection is the
        # next call's.
        if isinstance(conn, _DeadlineHTTPConnection):
            conn.leave_deadline()
        super()._put_conn(conn)


class _DeadlineHTTPSPool(_DeadlineHTTPPool, HTTPSConnectionPool):
    pass


class DeadlineAdapter(HTTPAdapter):
    """An HTTPAdapter whose connections read under the deadline of their thread's call."""

    def __init__(self, deadlines: CallDeadlines, max_retries: Retry, pool_maxsize: int) -> None:
        plain = type("DeadlineHTTPConnection", (_DeadlineHTTPConnection,), {"deadlines": deadlines})
        secure = type(
            "DeadlineHTTPSConnection", (_DeadlineHTTPSConnection,), {"deadlines": deadlines}
        )
        self._pools = {
            "http": type("DeadlineHTTPPool", (_DeadlineHTTPPool,), {"ConnectionCls": plain}),
            "https": type("DeadlineHTTPSPool", (_DeadlineHTTPSPool,), {"ConnectionCls": secure}),
        }
        super().__init__(max_retries=max_retries, pool_connections=2, pool_maxsize=pool_maxsize)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = self._pools
