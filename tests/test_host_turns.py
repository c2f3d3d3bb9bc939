"""Waiting for a host's turn: each host wakes only its own waiters, and no freed slot is left idle.

These drive `HostPacer` directly from asyncio tasks on one loop, as the fetcher
does; the limits themselves (halving, growth, overrides) are tested against a
real host in test_host_limits.py.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import pytest

from enrichment.media.hosts import HostPacer, PacerClosed, Slot


@asynccontextmanager
async def held(pacer: HostPacer, host: str) -> AsyncIterator[Slot]:
    """A slot at `host` for the block, as a download holds one (`HostPacer.acquire`)."""
    taken = await pacer.acquire(host)
    try:
        yield taken
    finally:
        taken.release()


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 10))


async def until(done: Callable[[], bool]) -> bool:
    """Let the other tasks run until `done()` holds (or they have had ample turns)."""
    for _ in range(100):
        if done():
            return True
        await asyncio.sleep(0)
    return done()


def waiting(queue: Any) -> list[asyncio.Future[bool]]:
    """The downloads still waiting in a pacer's queue (woken, timed-out, cancelled ones left)."""
    return [waiter for waiter in queue if not waiter.done()]


class Holder:
    """A download in a task of its own that takes a slot at `host` and holds it until let go."""

    def __init__(self, pacer: HostPacer, host: str) -> None:
        self.got = asyncio.Event()
        self.go = asyncio.Event()
        self.task = asyncio.create_task(self.hold(pacer, host))

    async def hold(self, pacer: HostPacer, host: str) -> None:
        async with held(pacer, host):
            self.got.set()
            await self.go.wait()

    async def let_go(self) -> None:
        self.go.set()
        await self.task


async def cleanup(holders: list[Holder]) -> None:
    for holder in holders:
        holder.go.set()
    await asyncio.gather(*(holder.task for holder in holders), return_exceptions=True)


def test_a_slot_given_back_wakes_its_own_host_only() -> None:
    async def test() -> None:
        pacer = HostPacer(start=1, ceiling=1, overrides=(), total=10, max_pause=1)
        holding_a, holding_b = Holder(pacer, "a"), Holder(pacer, "b")
        assert await until(lambda: holding_a.got.is_set() and holding_b.got.is_set())
        next_a, next_b = Holder(pacer, "a"), Holder(pacer, "b")
        assert await until(lambda: len(waiting(pacer.hosts["b"].turn)) == 1)
        [b_waiter] = waiting(pacer.hosts["b"].turn)
        await holding_a.let_go()  # a's slot given back
        assert await until(next_a.got.is_set), "a's waiter takes a's slot"
        assert not b_waiter.done(), "a's waiters only are woken"
        assert not next_b.got.is_set()
        await holding_b.let_go()
        assert await until(next_b.got.is_set), "b's slot given back: b's waiter takes it"
        await cleanup([next_a, next_b])

    run(test)


def test_a_freed_total_goes_to_a_host_that_has_room() -> None:
    async def test() -> None:
        pacer = HostPacer(start=1, ceiling=1, overrides=(), total=2, max_pause=1)
        holding_a, holding_b = Holder(pacer, "a"), Holder(pacer, "b")
        assert await until(lambda: pacer.total_in_use == 2)
        c = Holder(pacer, "c")  # c has room; the total has none
        assert await until(lambda: len(waiting(pacer._total_turn)) == 1)
        assert not c.got.is_set()
        await holding_b.let_go()
        assert await until(c.got.is_set), "b's slot given back frees the total for c"
        assert pacer.total_most == 2
        await cleanup([holding_a, c])

    run(test)


def test_a_wake_up_that_cannot_be_used_is_passed_on() -> None:
    """Woken for the total, a download whose host has meanwhile been paused passes it on."""

    async def test() -> None:
        pacer = HostPacer(start=1, ceiling=1, overrides=(), total=1, max_pause=30)
        holding_a = Holder(pacer, "a")
        assert await until(holding_a.got.is_set)
        b = Holder(pacer, "b")
        assert await until(lambda: len(waiting(pacer._total_turn)) == 1)  # b waits first
        c = Holder(pacer, "c")
        assert await until(lambda: len(waiting(pacer._total_turn)) == 2)  # then c
        pacer.record(pacer.host("b"), "busy", time.monotonic(), None, 30.0)  # b paused 30 s
        await holding_a.let_go()
        assert await until(c.got.is_set), "c got the total's slot that paused b could not use"
        assert not b.got.is_set()
        pacer.close()
        with pytest.raises(PacerClosed):
            await b.task
        await cleanup([c])

    run(test)


def test_many_downloads_over_few_hosts_keep_every_limit_and_all_finish() -> None:
    hosts = ["a", "b", "c", "fixed"]
    pacer = HostPacer(start=2, ceiling=2, overrides=(("fixed", 3),), total=3, max_pause=0.05)
    over: list[str] = []
    now = dict.fromkeys(hosts, 0)
    shared = [0]
    rng = random.Random(21)
    plan = [(rng.choice(hosts), rng.random() < 0.05) for _ in range(400)]

    async def download(host: str, busy: bool) -> None:
        async with held(pacer, host) as slot:
            now[host] += 1
            shared[0] += host != "fixed"
            if now[host] > (3 if host == "fixed" else 2) or shared[0] > 3:
                over.append(host)
            await asyncio.sleep(0.001)
            now[host] -= 1
            shared[0] -= host != "fixed"
            slot.report(
                "busy" if busy else "neutral", time.monotonic(), None, 0.01 if busy else None
            )

    async def test() -> None:
        downloads = [asyncio.create_task(download(*step)) for step in plan]
        done, pending = await asyncio.wait(downloads, timeout=8)
        assert not pending, "a download never got its turn"
        assert all(task.exception() is None for task in done)

    run(test)
    assert over == []
    assert pacer.total_most == 3, "the total is both kept and used"
    assert pacer.hosts["fixed"].most == 3, "a fixed limit counts only against itself"


def test_closing_wakes_every_waiter_of_every_host() -> None:
    async def test() -> None:
        pacer = HostPacer(start=1, ceiling=1, overrides=(), total=2, max_pause=1)
        holders = [Holder(pacer, "a"), Holder(pacer, "b")]
        assert await until(lambda: pacer.total_in_use == 2)
        waiters = [Holder(pacer, host) for host in "aabbc"]  # c waits in the total's queue
        assert await until(
            lambda: (
                [len(waiting(q)) for q in (pacer.hosts["a"].turn, pacer.hosts["b"].turn)] == [2, 2]
                and len(waiting(pacer._total_turn)) == 1
            )
        )
        pacer.close()
        ends = await asyncio.gather(*(w.task for w in waiters), return_exceptions=True)
        assert [type(end) for end in ends] == [PacerClosed] * 5
        with pytest.raises(PacerClosed):
            async with held(pacer, "d"):
                pass
        await cleanup(holders)

    run(test)


def test_a_waiter_cancelled_after_it_was_woken_passes_the_wake_up_on() -> None:
    async def test() -> None:
        pacer = HostPacer(start=1, ceiling=1, overrides=(), total=10, max_pause=1)
        async with held(pacer, "h"):
            first, second = Holder(pacer, "h"), Holder(pacer, "h")
            assert await until(lambda: len(waiting(pacer.hosts["h"].turn)) == 2)
            [woken, _] = waiting(pacer.hosts["h"].turn)
        assert woken.done(), "the slot given back woke the first waiter"
        first.task.cancel()  # before it could take the slot (the fetcher closing, say)
        assert await until(second.got.is_set), "the second waiter took the slot instead"
        assert first.task.cancelled()
        assert pacer.hosts["h"].in_use == 1
        await cleanup([second])
        assert pacer.hosts["h"].in_use == 0

    run(test)


def test_a_cancelled_waiter_that_was_never_woken_leaves_the_queue() -> None:
    async def test() -> None:
        pacer = HostPacer(start=1, ceiling=1, overrides=(), total=10, max_pause=1)

        async def with_a_deadline() -> None:
            async with asyncio.timeout(0.05), held(pacer, "h"):
                pass

        async with held(pacer, "h"):
            late = asyncio.create_task(with_a_deadline())  # its deadline passes while it waits
            cancelled, live = Holder(pacer, "h"), Holder(pacer, "h")
            assert await until(lambda: len(waiting(pacer.hosts["h"].turn)) == 3)
            cancelled.task.cancel()
            with pytest.raises(TimeoutError):
                await late
            assert cancelled.task.cancelled()
            assert not live.got.is_set()
        assert await until(live.got.is_set), "the slot given back went to the live waiter"
        await cleanup([live])

    run(test)
