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

from urllib3.util.retry import Retry

from enrichment.deadline_http import BoundedRetry, CallDeadlines

RETRIES = 6
BACKOFF = 0.5
BACKOFF_MAX = 30.0


SAFE_STATUSES = frozenset({423, 429, 500, 502, 503, 504})
# Only what the server surely did not carry out: a lock, a throttle, unavailable.
PAGE_STATUSES = frozenset({423, 429, 503})


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
