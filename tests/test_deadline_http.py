"""The publish client's per-call deadline and its pooled connections, against a real
local keep-alive server that notes the client port of every request."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
from urllib3.util.retry import Retry

from enrichment.deadline_http import CallDeadlines, DeadlineAdapter
from tests.test_feed_cpu import BODY, CountingHost


@pytest.fixture
def host() -> Iterator[CountingHost]:
    server = CountingHost()
    yield server
    server.close()


def test_a_connection_back_in_the_pool_is_not_shut_by_its_last_calls_deadline(
    host: CountingHost,
) -> None:
    """A call's connection goes back to the pool as soon as its answer is read, while the
    call is still under its deadline. If the deadline passed just then, it used to shut
    that socket, which the next call (on another thread, in real use) may have taken
    already: its request then died with the socket. The next call now reuses it."""
    deadlines = CallDeadlines(30.0)
    session = requests.Session()
    session.mount("http://", DeadlineAdapter(deadlines, Retry(0), pool_maxsize=1))
    try:
        with deadlines.call() as deadline:
            assert session.get(host.url(1), timeout=5).content == BODY
            deadline.expire()  # the budget runs out with the connection already pooled
        with deadlines.call():
            assert session.get(host.url(2), timeout=5).content == BODY
        ports = host.ports
        assert len(ports) == 2 and len(set(ports)) == 1, "one connection, alive, for both calls"
    finally:
        session.close()
        deadlines.close()
