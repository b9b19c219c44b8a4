"""Waiting for a job's outcome by notification: one blocking reader per front process on the done stream.

Workers add a line to the done stream as they write each outcome (in the same atomic step). Each
front process reads that stream with one blocking XREAD and wakes the requests waiting for those
jobs. A waiter also looks at the job itself every `fallback_s`, in case a notification was missed
(the front was reconnecting to Redis, or the stream was trimmed past it); each outcome found that
way is counted, so a missed-notification problem shows on /metrics instead of as slow answers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict

from redis.exceptions import RedisError

from .. import log
from .broker import Broker

FINAL = ("done", "failed")


class Notifier:
    """Futures per job id, resolved by the done stream's reader."""

    def __init__(self, broker: Broker, logger: log.EventLogger, fallback_s: float = 1.0) -> None:
        self.broker = broker
        self.logger = logger
        self.fallback_s = fallback_s
        self.waiters: dict[str, list[asyncio.Future[None]]] = defaultdict(list)
        self.fallbacks = 0
        self.notifications = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._read(), name="done-stream")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _read(self) -> None:
        last = "$"  # only what is finished from now on: earlier outcomes are in the job hashes
        redis_client, stream = self.broker.redis, self.broker.keys.done
        while True:
            try:
                response = await redis_client.xread({stream: last}, block=1000, count=512)
            except RedisError as exc:
                self.logger.warning("notifications_unavailable", message=str(exc))
                await asyncio.sleep(0.5)
                continue
            for _, entries in response or []:
                for entry, fields in entries:
                    last = entry.decode() if isinstance(entry, bytes) else entry
                    job_id = fields.get(b"id", b"").decode()
                    self.notifications += 1
                    for future in self.waiters.pop(job_id, []):
                        if not future.done():
                            future.set_result(None)

    async def wait(self, job_id: str, timeout: float) -> dict[str, str] | None:
        """The job's fields once it has an outcome, or its last known fields after `timeout` s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            # Listen before looking, so that an outcome written in between is not missed.
            future: asyncio.Future[None] = loop.create_future()
            self.waiters[job_id].append(future)
            try:
                fields = await self.broker.job(job_id)
                if fields is None or fields.get("status") in FINAL:
                    return fields
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return fields
                try:
                    await asyncio.wait_for(future, min(remaining, self.fallback_s))
                    continue  # notified: read the outcome
                except asyncio.TimeoutError:
                    pass
            finally:
                self._forget(job_id, future)
            fields = await self.broker.job(job_id)
            if fields is not None and fields.get("status") in FINAL:
                self.fallbacks += 1  # finished, and no notification told us
                return fields

    def _forget(self, job_id: str, future: asyncio.Future[None]) -> None:
        waiting = self.waiters.get(job_id)
        if waiting is not None:
            with contextlib.suppress(ValueError):
                waiting.remove(future)
            if not waiting:
                del self.waiters[job_id]
