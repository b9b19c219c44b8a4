"""Connection slots per backend and the balancer's central FIFO queue (HAProxy's maxconn and backend queue)."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

from ..errors import NoBackendAvailable, QueueFull, QueueTimeout
from .policies import Policy
from .pool import BackendState, Pool


@dataclass
class _Waiter:
    future: asyncio.Future[BackendState]
    policy: Policy
    first_k: int | None
    exclude: BackendState | None


class Slots:
    """Hands out backends; with `max_conn`, at most that many requests are in flight on each.

    Without a limit (max_conn 0) a request goes to a backend at once and waits in that server's
    own queue. With a limit, a request that finds every slot taken waits here, first come first
    served, and takes the first slot that frees. With max_conn 1 on identical servers this is
    one queue in front of c servers: the M/M/c of the theory overlay, whatever the policy.
    The queue is bounded in length (503 when full) and in time (503 after queue_timeout),
    so overload is refused instead of piling up.
    """

    def __init__(self, pool: Pool, max_conn: int = 0, queue_size: int = 1024, queue_timeout: float = 10.0) -> None:
        self.pool = pool
        self.max_conn = max_conn
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
        self.queue: deque[_Waiter] = deque()
        self.refused_full = 0
        self.refused_timeout = 0

    def _free(self, first_k: int | None, exclude: BackendState | None) -> tuple[list[BackendState], bool]:
        """(backends with a free slot, whether any backend is available at all) for this scope."""
        candidates = self.pool.candidates(first_k, exclude)
        if not self.max_conn:
            return candidates, bool(candidates)
        return [b for b in candidates if b.in_flight < self.max_conn], bool(candidates)

    def take_now(self, policy: Policy, first_k: int | None, exclude: BackendState | None = None) -> BackendState | None:
        """A backend with a slot taken, if one is free without waiting; None if the request must queue."""
        free, any_available = self._free(first_k, exclude)
        if not any_available:
            scope = f"among the first {first_k} backends " if first_k else ""
            raise NoBackendAvailable(f"No healthy model server {scope}is available; retry shortly.", retry_after=1)
        if free and self.queue:
            self._dispatch()  # those ahead in line go first; what none of them can use is ours
            free, _ = self._free(first_k, exclude)
        return self._take(policy, free) if free else None

    async def acquire(self, policy: Policy, first_k: int | None, exclude: BackendState | None = None) -> BackendState:
        """A backend with one of its slots taken for this request; release() gives it back."""
        backend = self.take_now(policy, first_k, exclude)
        if backend is not None:
            return backend
        if len(self.queue) >= self.queue_size:
            self.refused_full += 1
            raise QueueFull(
                f"All {self.max_conn}-request slots are busy and {self.queue_size} requests are queued; retry shortly.",
                retry_after=1,
            )
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future(), policy, first_k, exclude)
        self.queue.append(waiter)
        timer = loop.call_later(self.queue_timeout, self._expire, waiter)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            # the client left: a slot handed over in the meantime goes to the next in line
            if waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                self.release(waiter.future.result())
            raise
        finally:
            timer.cancel()
            if waiter in self.queue:
                self.queue.remove(waiter)

    def release(self, backend: BackendState) -> None:
        backend.in_flight -= 1
        if self.queue:
            self._dispatch()

    def kick(self) -> None:
        """Backends came up or were added: queued requests may go now."""
        if self.queue:
            self._dispatch()

    def _take(self, policy: Policy, free: list[BackendState]) -> BackendState:
        backend = policy.choose(free)
        backend.in_flight += 1  # type: ignore[attr-defined]
        return backend  # type: ignore[return-value]

    def _dispatch(self) -> None:
        """Give free slots to waiters in arrival order; a waiter whose scope has none keeps its place."""
        for waiter in list(self.queue):
            if waiter.future.done():
                self.queue.remove(waiter)
                continue
            free, _ = self._free(waiter.first_k, waiter.exclude)
            if free:
                self.queue.remove(waiter)
                waiter.future.set_result(self._take(waiter.policy, free))
            elif waiter.first_k is None and waiter.exclude is None:
                return  # no slot free anywhere: nobody behind can go either

    def _expire(self, waiter: _Waiter) -> None:
        if not waiter.future.done():
            self.refused_timeout += 1
            waiter.future.set_exception(
                QueueTimeout(
                    f"Waited {self.queue_timeout:g} s in the balancer's queue without a free model server; "
                    "retry shortly.",
                    retry_after=1,
                )
            )
