"""How the Annotations API client retries: urllib3's `Retry`, two policies, within deadlines.

urllib3's `Retry` on the requests adapter rather than tenacity: urllib3 is
already a dependency, its `Retry` honours `Retry-After`, backs off
exponentially, and, above all, decides per HTTP method and per failure kind
(connection refused before sending vs. answer lost after sending), which is
exactly the line between a request that may be repeated and one that may not.
The client's two sessions carry two policies:

- *safe* requests (reads, PUT, DELETE and the duplicate-checked single create)
  are retried on connection and read errors, 5xx, 429 and the write lock (423,
  Europeana's `error.annotation_write_lock`);
- *page creates* are retried only when the server surely did nothing: a
  connection that never opened, 423, 429 or 503. Any other failure leaves the
  page's outcome unknown (`Unsettled`), and the caller resolves it through the
  search endpoint instead of posting the page again, which would duplicate it.
"""

from __future__ import annotations

import threading
from typing import Any

from urllib3.exceptions import InvalidHeader, MaxRetryError, ResponseError
from urllib3.util.retry import Retry

from enrichment.publish.deadline_http import CallDeadlines

RETRIES = 6
BACKOFF = 0.5
BACKOFF_MAX = 30.0


SAFE_STATUSES = frozenset({423, 429, 500, 502, 503, 504})
# Only what the server surely did not carry out: a lock, a throttle, unavailable.
PAGE_STATUSES = frozenset({423, 429, 503})


class BoundedRetry(Retry):
    """urllib3's `Retry`, whose waits between tries stay within the call's deadline and end
    when the client closes.

    urllib3 waits as long as a `Retry-After` says, up to six hours a try: a server asking
    for a day would hold a publish for hours past `DEADLINE`, and Ctrl-C would wait for it.
    A wait longer than what is left of the call's deadline is not begun: the call ends with
    the server's answer (`AnnotationsAPI` says what it asked for).
    """

    # Set per client (`bounded_retries`): `Retry.new` copies only its arguments.
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


def retry_policy(page: bool, backoff: float = BACKOFF, kind: type[Retry] = Retry) -> Retry:
    """Retries of safe requests, or (`page`) of page creates, which may not be repeated blind."""
    return kind(
        total=RETRIES,
        connect=RETRIES,
        read=0 if page else RETRIES,
        status=RETRIES,
        other=0,
        redirect=0,
        allowed_methods=frozenset({"POST"} if page else {"GET", "PUT", "DELETE", "POST"}),
        status_forcelist=PAGE_STATUSES if page else SAFE_STATUSES,
        backoff_factor=backoff,
        backoff_max=BACKOFF_MAX,
        backoff_jitter=backoff,
        respect_retry_after_header=True,
        raise_on_status=False,
    )


def bounded_retries(
    page: bool, backoff: float, deadlines: CallDeadlines, closing: threading.Event
) -> Retry:
    """`retry_policy` for one client: its waits within its calls' deadlines, ended by its
    closing."""
    kind = type("BoundedRetry", (BoundedRetry,), {"deadlines": deadlines, "closing": closing})
    return retry_policy(page, backoff, kind)
