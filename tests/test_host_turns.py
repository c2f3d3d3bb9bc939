"""Waiting for a host's turn: each host wakes only its own waiters, and no freed slot is left idle.

These drive `HostPacer` directly from threads; the limits themselves (halving,
growth, overrides) are tested against a real host in test_host_limits.py.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time

import pytest

from enrichment.media.hosts import HostPacer, PacerClosed


class WatchedTurn(threading.Condition):
    """A condition that counts its notifications, and lets a test wait for each wait on it."""

    def __init__(self, lock: threading.Lock) -> None:
        super().__init__(lock)
        self.notified = 0
        self.waits = threading.Semaphore(0)

    def notify(self, n: int = 1) -> None:
        self.notified += n
        super().notify(n)

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.release()
        return super().wait(timeout)


def watch_turn(pacer: HostPacer, host: str) -> WatchedTurn:
    limit = pacer.host(host)
    limit.turn = WatchedTurn(pacer._lock)
    return limit.turn


def wait_in_thread(pacer: HostPacer, host: str, release: threading.Event) -> threading.Event:
    """Take a slot at `host` in a thread of its own (and hold it until `release`)."""
    got = threading.Event()

    def take() -> None:
        with contextlib.suppress(PacerClosed), pacer.slot(host):
            got.set()
            release.wait(10)

    threading.Thread(target=take, daemon=True).start()
    return got


def test_a_slot_given_back_wakes_its_own_host_only() -> None:
    pacer = HostPacer(start=1, ceiling=1, overrides=(), total=10, max_pause=1)
    b_turn = watch_turn(pacer, "b")
    release = threading.Event()
    with contextlib.ExitStack() as held:
        holding_a = held.enter_context(contextlib.ExitStack())
        holding_a.enter_context(pacer.slot("a"))
        held.enter_context(pacer.slot("b"))
        got_b = wait_in_thread(pacer, "b", release)
        assert b_turn.waits.acquire(timeout=5)
        holding_a.close()  # a's slot given back
        assert b_turn.notified == 0, "a's waiters only are woken"
        assert not got_b.is_set()
    assert got_b.wait(5), "b's slot given back: b's waiter takes it"
    release.set()


def test_a_freed_total_goes_to_a_host_that_has_room() -> None:
    pacer = HostPacer(start=1, ceiling=1, overrides=(), total=2, max_pause=1)
    release = threading.Event()
    with contextlib.ExitStack() as holding_a:
        holding_a.enter_context(pacer.slot("a"))
        with pacer.slot("b"):
            got_c = wait_in_thread(pacer, "c", release)  # c has room; the total has none
            assert not got_c.wait(0.2)
        assert got_c.wait(5), "b's slot given back frees the total for c"
    release.set()


def test_a_wake_up_that_cannot_be_used_is_passed_on() -> None:
    """Woken for the total, a download whose host has meanwhile been paused passes it on."""
    pacer = HostPacer(start=1, ceiling=1, overrides=(), total=1, max_pause=30)
    total_turn = pacer._total_turn = WatchedTurn(pacer._lock)
    release = threading.Event()
    try:
        with pacer.slot("a"):
            got_b = wait_in_thread(pacer, "b", release)
            assert total_turn.waits.acquire(timeout=5)  # b waits first in the total's queue
            got_c = wait_in_thread(pacer, "c", release)
            assert total_turn.waits.acquire(timeout=5)  # then c
            b = pacer.host("b")
            pacer.record(b, "busy", time.monotonic(), None, 30.0)  # b paused for 30 s
        assert got_c.wait(5), "c got the total's slot that paused b could not use"
        assert not got_b.is_set()
    finally:
        release.set()
        pacer.close()


def test_many_downloads_over_few_hosts_keep_every_limit_and_all_finish() -> None:
    hosts = ["a", "b", "c", "fixed"]
    pacer = HostPacer(start=2, ceiling=2, overrides=(("fixed", 3),), total=3, max_pause=0.05)
    over: list[str] = []
    lock = threading.Lock()
    now = dict.fromkeys(hosts, 0)
    shared = [0]
    rng = random.Random(21)
    plan = [(rng.choice(hosts), rng.random() < 0.05) for _ in range(400)]

    def download(host: str, busy: bool) -> None:
        with pacer.slot(host) as slot:
            with lock:
                now[host] += 1
                shared[0] += host != "fixed"
                if now[host] > (3 if host == "fixed" else 2) or shared[0] > 3:
                    over.append(host)
            time.sleep(0.001)
            with lock:
                now[host] -= 1
                shared[0] -= host != "fixed"
            slot.report(
                "busy" if busy else "neutral", time.monotonic(), None, 0.01 if busy else None
            )

    threads = [threading.Thread(target=download, args=step, daemon=True) for step in plan]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads), "a download never got its turn"
    assert over == []
    assert pacer.total_most <= 3


def test_closing_wakes_every_waiter_of_every_host() -> None:
    pacer = HostPacer(start=1, ceiling=1, overrides=(), total=10, max_pause=1)
    failures: list[BaseException] = []

    def wait_for(host: str) -> None:
        try:
            with pacer.slot(host):
                pass
        except PacerClosed as closed:
            failures.append(closed)

    with pacer.slot("a"), pacer.slot("b"):
        waiters = [threading.Thread(target=wait_for, args=(h,)) for h in "aabb"]
        for waiter in waiters:
            waiter.start()
        pacer.close()
        for waiter in waiters:
            waiter.join(timeout=5)
    assert len(failures) == 4
    with pytest.raises(PacerClosed), pacer.slot("c"):
        pass
