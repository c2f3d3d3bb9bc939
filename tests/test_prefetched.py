"""`prefetched`: source pages read ahead on a thread that never outlives its consumer."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from enrichment.runs.schedule import prefetched


def producers() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "source-pages"]


def endless() -> Iterator[int]:
    number = 0
    while True:
        yield number
        number += 1


def test_items_come_in_order_and_the_producer_ends() -> None:
    assert list(prefetched(range(10))) == list(range(10))
    assert producers() == []


def test_a_consumer_that_breaks_out_leaves_no_producer_behind() -> None:
    for item in prefetched(endless()):
        if item == 3:
            break
    time.sleep(0.1)  # the buffer was full: the producer was blocked handing over
    assert producers() == []


def test_a_consumer_that_stops_as_the_source_ends_leaves_no_producer_behind() -> None:
    """The producer's last hand-over (the end) into a full buffer gives up too."""
    pages = prefetched(range(3), depth=2)
    assert next(pages) == 0
    time.sleep(0.2)  # the producer fills the buffer and waits to hand over the end
    pages.close()
    assert producers() == []


def test_a_consumer_that_raises_leaves_no_producer_behind_and_closes_the_source() -> None:
    closed = threading.Event()

    def source() -> Iterator[int]:
        try:
            yield from endless()
        finally:
            closed.set()

    with pytest.raises(RuntimeError, match="consumer failed"):
        for item in prefetched(source()):
            if item == 1:
                raise RuntimeError("consumer failed")
    assert producers() == []
    assert closed.is_set()


def test_the_producers_error_surfaces_in_the_consumer() -> None:
    def failing() -> Iterator[int]:
        yield 1
        raise ValueError("page 2 failed")

    seen = []
    with pytest.raises(ValueError, match="page 2 failed"):
        for item in prefetched(failing()):
            seen.append(item)
    assert seen == [1]
    assert producers() == []
