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

    async def close(self) -> None:
        return None


class LocalWorkers(Actuator):
    """Queue workers as child processes of the controller: they join the consumer group by themselves."""

    def __init__(self, worker_args: Sequence[str], logger: log.EventLogger, env: dict[str, str] | None = None) -> None:
        self.worker_args = list(worker_args)
        self.logger = logger
        self.env = env
        self.children: list[Child] = []
        self.serial = 0

    @property
    def ready(self) -> int:
        return sum(1 for c in self.children if c.url is not None and c.alive())

    async def scale_to(self, count: int) -> None:
        self.children = [c for c in self.children if c.alive()]
        while len(self.children) < count:
            self.serial += 1
            name = f"worker{self.serial}"
            child = Child([*self.worker_args, "--name", name], env=self.env)
            self.children.append(child)
            await asyncio.to_thread(child.wait_url)
            self.logger.info("worker_started", worker=name, url=child.url)
        if len(self.children) > count:
            # the newest go first; SIGTERM drains each: it finishes its batch, acknowledges, exits
            surplus, self.children = self.children[count:], self.children[:count]
            await asyncio.to_thread(stop_all, surplus, 70)
            self.logger.info("workers_stopped", count=len(surplus))

    async def close(self) -> None:
        await asyncio.to_thread(stop_all, self.children, 70)
        self.children = []


class LocalServers(Actuator):
    """Model servers as child processes, registered with the balancer through its admin API."""

    def __init__(
        self, server_args: Sequence[str], balancer_url: str, admin_token: str, logger: log.EventLogger,
        env: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        self.server_args = list(server_args)
        self.balancer_url = balancer_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {admin_token}", "Content-Type": "application/json"}
        self.logger = logger
        self.env = env
        self.children: list[Child] = []
        self.serial = 0
        self.session: aiohttp.ClientSession | None = None

    @property
    def ready(self) -> int:
        return sum(1 for c in self.children if c.url is not None and c.alive())

    async def _admin(self, method: str, path: str, body: dict[str, str] | None = None) -> int:
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        data = json.dumps(body).encode() if body is not None else None
        async with self.session.request(method, self.balancer_url + path, data=data, headers=self.headers) as r:
            await r.read()
            return r.status

    async def scale_to(self, count: int) -> None:
        self.children = [c for c in self.children if c.alive()]
        while len(self.children) < count:
            self.serial += 1
            child = Child([*self.server_args, "--name", f"server{self.serial}"], env=self.env)
            await asyncio.to_thread(child.wait_url)  # ready: the model is loaded and warm
            status = await self._admin("POST", "/backends", {"url": child.url or ""})
            if status != 201:
                self.logger.error("register_failed", url=child.url, status=status)
                await asyncio.to_thread(child.stop)
                return
            self.children.append(child)
            self.logger.info("server_added", url=child.url)
        while len(self.children) > count:
            child = self.children.pop()
            # out of the balancer first: nothing new reaches it; then SIGTERM, which lets it answer
            # what it holds before it exits
            await self._admin("DELETE", f"/backends?url={child.url}")
            await asyncio.to_thread(child.stop, 40)
            self.logger.info("server_removed", url=child.url)

    async def close(self) -> None:
        await asyncio.to_thread(stop_all, self.children, 40)
        self.children = []
        if self.session is not None:
            await self.session.close()
