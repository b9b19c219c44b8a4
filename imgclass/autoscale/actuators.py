"""How the controller changes the pool, behind one interface: local processes, or testbed nodes over SSH.

Scaling in must lose nothing: a queue worker is stopped with SIGTERM and finishes its batch first;
a model server is first removed from the balancer (no new request goes to it), and only then
stopped, and SIGTERM lets it answer what it holds.
"""

from __future__ import annotations

import asyncio
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence

import aiohttp

from .. import log
from ..process import Child, stop_all


class Actuator(ABC):
    """A pool of interchangeable workers; `scale_to` changes its size, `ready` counts those serving."""

    @abstractmethod
    async def scale_to(self, count: int) -> None: ...

    @property
    @abstractmethod
    def ready(self) -> int: ...

    async def adopt(self) -> None:
        """Take over what already serves, before the first decision (nothing, for local processes)."""
        return None

    async def close(self) -> None:
        return None


class LocalPool(Actuator):
    """Child processes started together and stopped in the background.

    New ones start at once and are waited for together: a step from 1 to 8 takes one start-up, not
    eight. Removed ones leave the pool at once but drain in the background, so the controller keeps
    evaluating while they finish what they hold.
    """

    stop_timeout = 70.0

    def __init__(self, args: Sequence[str], prefix: str, logger: log.EventLogger,
                 env: dict[str, str] | None = None) -> None:  # fmt: skip
        self.args = list(args)
        self.prefix = prefix
        self.logger = logger
        self.env = env
        self.children: list[Child] = []
        self.serial = 0
        self.stopping: set[asyncio.Future[None]] = set()

    @property
    def ready(self) -> int:
        return sum(1 for c in self.children if c.url is not None and c.alive())

    async def admit(self, child: Child) -> bool:
        """Put a started child in service; False if that failed (it is then stopped)."""
        return True

    async def retire(self, child: Child) -> None:
        """Take a child out of service before it is stopped."""

    async def scale_to(self, count: int) -> None:
        self.children = [c for c in self.children if c.alive()]
        new = []
        for _ in range(count - len(self.children)):
            self.serial += 1
            new.append(Child([*self.args, "--name", f"{self.prefix}{self.serial}"], env=self.env))
        started = await asyncio.gather(*(asyncio.to_thread(c.wait_url) for c in new), return_exceptions=True)
        for child, result in zip(new, started, strict=True):
            if isinstance(result, BaseException) or not await self.admit(child):
                self.logger.error("start_failed", role=self.prefix, message=str(result)[:500])
                await asyncio.to_thread(child.stop)
                continue
            self.children.append(child)
            self.logger.info("started", role=self.prefix, url=child.url)
        if len(self.children) > count:
            # the newest go first
            surplus, self.children = self.children[count:], self.children[:count]
            for child in surplus:
                await self.retire(child)
            task = asyncio.ensure_future(asyncio.to_thread(stop_all, surplus, self.stop_timeout))
            self.stopping.add(task)
            task.add_done_callback(self.stopping.discard)
            self.logger.info("stopping", role=self.prefix, count=len(surplus))

    async def close(self) -> None:
        if self.stopping:
            await asyncio.gather(*self.stopping, return_exceptions=True)
        await asyncio.to_thread(stop_all, self.children, self.stop_timeout)
        self.children = []


class LocalWorkers(LocalPool):
    """Queue workers as child processes: they join the consumer group by themselves, and SIGTERM
    drains each (it finishes and acknowledges its batch, then exits)."""

    def __init__(self, worker_args: Sequence[str], logger: log.EventLogger, env: dict[str, str] | None = None) -> None:
        super().__init__(worker_args, "worker", logger, env)


class BalancerAdmin:
    """The balancer's admin API, as the actuators use it: add a server once ready, remove it before
    it stops."""

    def __init__(self, balancer_url: str, admin_token: str, logger: log.EventLogger) -> None:
        self.balancer_url = balancer_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {admin_token}", "Content-Type": "application/json"}
        self.logger = logger
        self.session: aiohttp.ClientSession | None = None

    async def _call(self, method: str, path: str, body: dict[str, str] | None = None) -> int:
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        data = json.dumps(body).encode() if body is not None else None
        async with self.session.request(method, self.balancer_url + path, data=data, headers=self.headers) as r:
            await r.read()
            return r.status

    async def add(self, url: str) -> bool:
        try:
            status = await self._call("POST", "/backends", {"url": url})
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.logger.error("register_failed", url=url, message=str(exc))
            return False
        if status == 409:  # listed already (a deploy's --backends, or an earlier controller)
            return True
        if status != 201:
            self.logger.error("register_failed", url=url, status=status)
        return status == 201

    async def remove(self, url: str) -> None:
        try:
            await self._call("DELETE", f"/backends?url={url}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.logger.error("deregister_failed", url=url, message=str(exc))

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


class LocalServers(LocalPool):
    """Model servers as child processes, registered with the balancer through its admin API once
    ready, and removed from it before they are stopped."""

    stop_timeout = 40.0

    def __init__(
        self, server_args: Sequence[str], balancer_url: str, admin_token: str, logger: log.EventLogger,
        env: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(server_args, "server", logger, env)
        self.admin = BalancerAdmin(balancer_url, admin_token, logger)

    async def admit(self, child: Child) -> bool:
        return await self.admin.add(child.url or "")

    async def retire(self, child: Child) -> None:
        # out of the balancer first: nothing new reaches it; then SIGTERM lets it answer what it holds
        await self.admin.remove(child.url or "")

    async def close(self) -> None:
        await super().close()
        await self.admin.close()
