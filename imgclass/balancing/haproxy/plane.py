"""The control plane: HAProxy rendered, validated, started and supervised; its membership and its state, as one object."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry

from ...errors import ConfigError, EngineUnavailable
from ...log import EventLogger
from ...web.server import ServerOptions
from ..settings import BalancerSettings
from .config import COUNTED, Layout, render, server_name, validate, write_map
from .membership import Member, Membership
from .process import Binary, HaproxyProcess, Supervisor
from .runtime import RuntimeAPI
from .state import EngineMetrics, slot_stats, snapshot

START_TIMEOUT_S = 10.0  # from exec to an answer on the runtime API; HAProxy takes tens of milliseconds
MIN_SLOTS = 8


def slot_count(settings: BalancerSettings) -> int:
    starting = len(dict.fromkeys(settings.backends))
    slots = settings.slots or max(MIN_SLOTS, 2 * starting)
    if starting > slots:
        raise ConfigError(f"{starting} backends do not fit in --slots {slots}; raise --slots to at least {starting}.")
    return slots


class ControlPlane:
    """Everything engine mode runs besides HAProxy itself; the app's routes read and change it."""

    def __init__(self, settings: BalancerSettings, name: str, binary: Binary, public: socket.socket, directory: Path,
                 logger: EventLogger) -> None:  # fmt: skip
        self.settings = settings
        self.name = name
        self.binary = binary
        self.logger = logger
        self.layout = Layout(directory, public.fileno(), slot_count(settings))
        self.api = RuntimeAPI(self.layout.stats_socket)
        self.lock = asyncio.Lock()  # membership changes and (re)starts, one at a time
        self.membership = Membership(settings, self.layout, self.api, self.lock, logger)
        self.supervisor = Supervisor(self.launch, logger)
        self.check_timeout = min(2.0, max(0.2, settings.health_interval))  # as the Python engine's checks
        self.session: aiohttp.ClientSession | None = None  # for /labels, names and the protocols' GETs
        self.labels: bytes | None = None
        self.registry = CollectorRegistry()
        self.metrics = EngineMetrics(self.membership.primary, self.membership.members, lambda: self.supervisor.restarts)
        self.registry.register(self.metrics)
        self._names: asyncio.Task[None] | None = None
        self._stopped = False

    @property
    def process(self) -> HaproxyProcess | None:
        return self.supervisor.current

    async def start(self) -> None:
        await self.membership.assign(self.settings.backends)
        self.session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(),
                                             timeout=aiohttp.ClientTimeout(total=self.check_timeout))  # fmt: skip
        await self.supervisor.start()
        self.learn_names()

    async def launch(self) -> HaproxyProcess:
        """Render haproxy.cfg and its maps from the current membership, check it, start HAProxy and wait
        for its runtime API; used for the first start and for every restart."""
        async with self.lock:
            self.membership.forget_draining()
            self.layout.cfg.write_text(render(self.settings, self.layout, self.membership.lines()))
            write_map(self.layout.backend_map, self.membership.urls())
            write_map(self.layout.prefix_map, self.membership.prefixes())
            self.membership.rendered()
            await asyncio.to_thread(validate, self.binary.path, self.layout)
            with contextlib.suppress(FileNotFoundError):
                self.layout.stats_socket.unlink()  # the last one's, so that "ready" means this one
            process = await HaproxyProcess.start(self.binary, self.layout, self.logger, self.membership.primary)
            try:
                await self._ready(process)
            except BaseException:
                await process.stop(0)
                raise
            self.logger.info("haproxy_started", pid=process.pid, slots=self.layout.slots,
                             backends=len(self.membership.members()))  # fmt: skip
            return process

    async def _ready(self, process: HaproxyProcess) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        while not await self.api.ready():
            if not process.alive():
                code = await process.wait()
                raise EngineUnavailable(f"HAProxy exited at start (status {code}): "
                                        f"{' / '.join(list(process.lines)[-3:]) or 'no message'}.")  # fmt: skip
            if loop.time() > deadline:
                raise EngineUnavailable(f"HAProxy did not answer on {self.layout.stats_socket} within "
                                        f"{START_TIMEOUT_S:g} s: {' / '.join(list(process.lines)[-3:])}.")  # fmt: skip
            await asyncio.sleep(0.02)

    async def _learn_names(self) -> None:
        """Until every member has told its name; started again when one is added."""
        assert self.session is not None
        while any(m.name is None for m in self.membership.members()):
            await self.membership.learn_names(self.session, self.check_timeout)
            await asyncio.sleep(self.settings.health_interval)

    def learn_names(self) -> None:
        if self._names is None or self._names.done():
            self._names = asyncio.create_task(self._learn_names(), name="model server names")

    # --- state, read back from HAProxy ---------------------------------------------------------

    async def backends(self) -> list[dict[str, object]]:
        stats = slot_stats(await self.api.stats(servers_only=True), self.membership.primary)
        return [snapshot(m, stats.get(server_name(m.slot))) for m in self.membership.members()]

    async def candidates(self) -> list[Member]:
        """The members HAProxy has up now, in slot order."""
        stats = slot_stats(await self.api.stats(self.membership.primary, servers_only=True), self.membership.primary)
        return [m for m in self.membership.members() if (s := stats.get(server_name(m.slot))) and s.healthy]

    async def scrape(self) -> None:
        """Read every counter once, for the /metrics answer that follows."""
        self.metrics.rows = await self.api.stats()
        self.metrics.counts = {name: await self.api.counter(name) for name in COUNTED}

    # --- stopping ---------------------------------------------------------------------------------

    async def drain(self) -> None:
        """HAProxy stops listening and finishes what is in flight (up to uvicorn's own drain time)."""
        await self.supervisor.stop(ServerOptions().graceful_s)

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._names is not None:
            self._names.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._names
        await self.membership.stop()
        await self.supervisor.stop(0)
        if self.session is not None:
            await self.session.close()
