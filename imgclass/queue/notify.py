"""Waiting for a job's outcome by notification: one blocking reader per front process on the done stream.

Workers add a line to the done stream as they write each outcome (in the same atomic step). Each
front process reads that stream with one blocking XREAD and wakes the requests waiting for those
jobs. A waiter also looks at the job itself after `fallback_s`, then at doubling intervals up to 16
times that, in case a notification was missed
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
        # a waiter's future gets the job's outcome fields, which the notification carries
        self.waiters: dict[str, list[asyncio.Future[dict[str, str]]]] = defaultdict(list)
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
                for entry, raw in entries:
                    last = entry.decode() if isinstance(entry, bytes) else entry
                    fields = {k.decode(): v.decode() for k, v in raw.items()}
                    self.notifications += 1
                    for future in self.waiters.pop(fields.get("id", ""), []):
                        if not future.done():
                            future.set_result(fields)

    async def wait(self, job_id: str, timeout: float, known: dict[str, str] | None = None) -> dict[str, str] | None:
        """The job's fields once it has an outcome, or its last known fields after `timeout` s.

        `known`: what the caller knows of the job already (one it has just queued), so that the
        first look at Redis is saved; the outcome itself comes with the notification.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        fields = known
        # The look at the job backs off (1, 2, 4 ... 16 s): a thousand requests waiting on a long
        # queue must not cost Redis and this process a thousand lookups a second for what is only
        # a safety net under the notifications.
        delay = self.fallback_s
        while True:
            # Listen before looking, so that an outcome written in between is not missed.
            future: asyncio.Future[dict[str, str]] = loop.create_future()
            self.waiters[job_id].append(future)
            try:
                if fields is None:
                    fields = await self.broker.job(job_id)
                if fields is None or fields.get("status") in FINAL:
                    return fields
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return fields
                try:
                    notified = await asyncio.wait_for(future, min(remaining, delay))
                    return {**fields, **notified}
                except asyncio.TimeoutError:
                    pass
            finally:
                self._forget(job_id, future)
            delay = min(delay * 2, 16 * self.fallback_s)
            try:
                looked = await self.broker.job(job_id)
            except RedisError:
                continue  # a failed look is not the job's fault: keep waiting for the notification
            if looked is not None:
                fields = looked
            if fields is not None and fields.get("status") in FINAL:
                self.fallbacks += 1  # finished, and no notification told us
                return fields

    def _forget(self, job_id: str, future: asyncio.Future[dict[str, str]]) -> None:
        waiting = self.waiters.get(job_id)
        if waiting is not None:
            with contextlib.suppress(ValueError):
                waiting.remove(future)
            if not waiting:
                del self.waiters[job_id]
