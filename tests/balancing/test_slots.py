"""The balancer's slots and central queue, without sockets: FIFO hand-over, bounds, cancellation, scope."""

from __future__ import annotations

import asyncio
import random

import pytest

from imgclass import log
from imgclass.balancing.policies import LeastOutstanding, Random
from imgclass.balancing.pool import HealthSettings, Pool
from imgclass.balancing.slots import Slots
from imgclass.errors import NoBackendAvailable, QueueFull, QueueTimeout


def _pool(n: int) -> Pool:
    return Pool([f"http://b{i}" for i in range(n)], HealthSettings(), log.get_logger("t", "balancer", "WARNING"))


def _setup(n: int, queue_size: int = 1024, queue_timeout: float = 10.0) -> tuple[Pool, Slots, Random]:
    """n backends with one slot each, and a seeded random policy."""
    pool = _pool(n)
    return pool, Slots(pool, 1, queue_size, queue_timeout), Random(random.Random(1))


def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_without_a_limit_nothing_waits() -> None:
    async def go() -> None:
        pool = _pool(2)
        slots = Slots(pool, max_conn=0)
        got = [await slots.acquire(LeastOutstanding(random.Random(1)), None) for _ in range(6)]
        assert [b.in_flight for b in pool.backends] == [3, 3]
        assert not slots.queue
        for b in got:
            slots.release(b)
        assert [b.in_flight for b in pool.backends] == [0, 0]

    _run(go())


def test_full_slots_queue_first_come_first_served() -> None:
    async def go() -> None:
        pool, slots, policy = _setup(2)
        a = await slots.acquire(policy, None)
        b = await slots.acquire(policy, None)
        assert {a.url, b.url} == {"http://b0", "http://b1"}
        order: list[str] = []

        async def waiter(name: str) -> None:
            backend = await slots.acquire(policy, None)
            order.append(f"{name}:{backend.url}")

        tasks = [asyncio.create_task(waiter(x)) for x in ("first", "second", "third")]
        await asyncio.sleep(0.01)
        assert len(slots.queue) == 3 and order == []
        slots.release(b)  # b's slot frees: the first in line gets b, nobody else moves
        await asyncio.sleep(0.01)
        assert order == [f"first:{b.url}"] and len(slots.queue) == 2
        slots.release(a)
        await asyncio.sleep(0.01)
        assert order == [f"first:{b.url}", f"second:{a.url}"]
        # a newcomer does not jump the queue while someone is waiting
        newcomer = asyncio.create_task(slots.acquire(policy, None))
        await asyncio.sleep(0.01)
        assert not newcomer.done() and len(slots.queue) == 2
        slots.release(pool.backends[0])
        await asyncio.sleep(0.01)
        assert order[-1].startswith("third:") and not newcomer.done()
        slots.release(pool.backends[1])
        assert (await newcomer).url == "http://b1"
        await asyncio.gather(*tasks)
        assert [b.in_flight for b in pool.backends] == [1, 1]  # third and the newcomer hold them

    _run(go())


def test_queue_is_bounded_in_length_and_time() -> None:
    async def go() -> None:
        pool, slots, policy = _setup(1, queue_size=2, queue_timeout=0.05)
        await slots.acquire(policy, None)
        waiting = [asyncio.create_task(slots.acquire(policy, None)) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull) as full:
            await slots.acquire(policy, None)
        assert full.value.status == 503 and full.value.http_headers() == {"Retry-After": "1"}
        for task in waiting:
            with pytest.raises(QueueTimeout) as late:
                await task
            assert late.value.status == 503 and late.value.code == "queue_timeout"
        assert not slots.queue and pool.backends[0].in_flight == 1
        assert (slots.refused_full, slots.refused_timeout) == (1, 2)

    _run(go())


def test_a_client_that_leaves_gives_its_place_and_any_slot_back() -> None:
    async def go() -> None:
        pool, slots, policy = _setup(1)
        held = await slots.acquire(policy, None)
        leaving = asyncio.create_task(slots.acquire(policy, None))
        staying = asyncio.create_task(slots.acquire(policy, None))
        await asyncio.sleep(0.01)
        # the slot is handed to the first waiter, which is cancelled before it runs
        slots.release(held)
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        assert (await staying).url == "http://b0"
        assert pool.backends[0].in_flight == 1 and not slots.queue

    _run(go())


def test_a_waiter_keeps_its_place_until_a_slot_in_its_scope_frees() -> None:
    async def go() -> None:
        _, slots, policy = _setup(2)
        b0 = await slots.acquire(policy, 1)  # number_backend_servers=1: only b0
        b1 = await slots.acquire(policy, None)
        assert (b0.url, b1.url) == ("http://b0", "http://b1")
        scoped = asyncio.create_task(slots.acquire(policy, 1))
        anyone = asyncio.create_task(slots.acquire(policy, None))
        await asyncio.sleep(0.01)
        slots.release(b1)  # out of the first waiter's scope: the second one takes it
        assert (await anyone).url == "http://b1" and not scoped.done()
        slots.release(b0)
        assert (await scoped).url == "http://b0"

    _run(go())


def test_queued_requests_go_when_a_backend_comes_up() -> None:
    async def go() -> None:
        pool, slots, policy = _setup(2)
        pool.on_available = slots.kick
        pool.backends[1].healthy = False
        await slots.acquire(policy, None)
        waiting = asyncio.create_task(slots.acquire(policy, None))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        pool.backends[1].healthy = True
        pool.on_available()
        assert (await waiting).url == "http://b1"
        for b in pool.backends:
            b.healthy = False
        with pytest.raises(NoBackendAvailable):
            await slots.acquire(policy, None)

    _run(go())


def test_a_slot_no_waiter_can_use_goes_to_a_newcomer_at_once() -> None:
    async def go() -> None:
        _, slots, policy = _setup(2)
        b0 = await slots.acquire(policy, 1)
        b1 = await slots.acquire(policy, None)
        scoped = asyncio.create_task(slots.acquire(policy, 1))  # can only use b0
        await asyncio.sleep(0.01)
        slots.release(b1)
        assert not scoped.done() and b1.in_flight == 0
        newcomer = await asyncio.wait_for(slots.acquire(policy, None), 0.5)
        assert newcomer is b1 and not scoped.done()
        slots.release(b0)
        assert (await scoped) is b0

    _run(go())
