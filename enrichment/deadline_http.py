"""A requests adapter whose every call has an overall deadline, as each image download has:
the Annotations API's client and the Search API's.

Socket timeouts bound each wait, not their sum: an Annotations API that
trickles its answer one byte every 30 s never trips a 120 s read timeout and
holds a publish for as long as it likes. So each call runs under a `Deadline`
(`enrichment.deadline`): the connections of this adapter put their socket
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
from urllib3.exceptions import InvalidHeader, MaxRetryError, ResponseError
from urllib3.util.retry import Retry

from enrichment.deadline import Deadline, Watchdog


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


class BoundedRetry(Retry):
    """urllib3's `Retry`, whose waits between tries stay within the call's deadline and end
    when the client closes.

    urllib3 waits as long as a `Retry-After` says, up to six hours a try: a server asking
    for a day would hold a publish for hours past `DEADLINE`, and Ctrl-C would wait for it.
    A wait longer than what is left of the call's deadline is not begun: the call ends with
    the server's answer (`AnnotationsAPI` says what it asked for).
    """

    # Set per client (a subclass of its own): `Retry.new` copies only its arguments.
    deadlines: CallDeadlines
    closing: threading.Event

    def increment(
        self,
        method: str | None = None,
        url: str | None = None,
        response: Any = None,
        error: Exception | None = None,
        _pool: Any = None,
        _stacktrace: Any = None,
    ) -> Retry:
        retry = super().increment(method, url, response, error, _pool, _stacktrace)
        deadline = self.deadlines.current()
        if deadline is not None and wait_before_retry(retry, response) > deadline.remaining():
            reason = ResponseError("the next try would start past the call's deadline")
            raise MaxRetryError(_pool, url or "", reason)
        return retry

    def sleep(self, response: Any = None) -> None:
        if self.closing.wait(wait_before_retry(self, response)):
            raise MaxRetryError(None, "", ResponseError("the client is closing"))


def wait_before_retry(retry: Retry, response: Any) -> float:
    """How long `retry` waits before its next try: the server's `Retry-After`, else backoff
    (also for a `Retry-After` that is neither seconds nor a date: the status still says the
    request may be tried again)."""
    if retry.respect_retry_after_header and response is not None:
        try:
            after = retry.get_retry_after(response)
        except InvalidHeader:
            after = None
        if after:
            return after
    return retry.get_backoff_time()
