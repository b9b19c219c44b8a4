"""Which model server holds which pre-declared server slot; membership changed at run time, without a reload.

Adding a server assigns it a free slot: its address in every backend that has the slot, its check
port, then health checks from "down", so it takes traffic only once --rise checks pass. Removing one
drains it (no new requests) until its current and queued requests are 0, then puts the slot back in
maintenance. HAProxy 2.6.12's `add server` / `del server` are not used: `del server` lacks later
crash fixes, and slots need neither.
"""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

from ...errors import BadParameter, ConfigError, Conflict, ImgclassError, NotFound
from ...log import EventLogger
from ..settings import BalancerSettings
from .config import Layout, SlotLine, backend_name, policies, primary, server_name
from .runtime import RuntimeAPI

EMPTY = "-"  # a free slot's URL in the X-Backend map: every slot keeps its key, so updates are `set map`
DRAIN_POLL_S = 0.1


@dataclass
class Member:
    url: str
    address: str  # the IP address HAProxy connects to (host names are resolved when added)
    port: int
    slot: int
    name: str | None = None  # the model server's own --name, from its /readyz
    draining: bool = False


async def resolve(url: str) -> tuple[str, int]:
    """(IP address, port) of a model server URL; HAProxy forwards to host:port, so a path is refused."""
    parts = urlsplit(url)
    if parts.path not in ("", "/"):
        raise BadParameter(f"{url} has a path; engine mode forwards to a server's host and port only: "
                           "give http://host:port.")  # fmt: skip
    host, port = parts.hostname or "", parts.port or 80
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise BadParameter(f"cannot resolve {host!r} ({exc.strerror}); give an address that resolves.") from None
    return str(infos[0][4][0]), port


class Membership:
    """Slots and their members; every change goes through the runtime API, under the engine's lock."""

    def __init__(self, settings: BalancerSettings, layout: Layout, api: RuntimeAPI, lock: asyncio.Lock,
                 logger: EventLogger) -> None:  # fmt: skip
        self.settings = settings
        self.layout = layout
        self.api = api
        self.lock = lock
        self.logger = logger
        self.primary = primary(settings, layout)
        self.slots: list[Member | None] = [None] * layout.slots
        self._drains: set[asyncio.Task[None]] = set()
        self._prefixes: dict[str, str] = {}  # the prefix map as HAProxy has it

    # --- what the configuration and the maps say ------------------------------------------

    def members(self) -> list[Member]:
        """The servers in service or joining, in slot order (number_backend_servers counts in it)."""
        return [m for m in self.slots if m is not None and not m.draining]

    def find(self, url: str) -> Member | None:
        return next((m for m in self.members() if m.url == url), None)

    def lines(self) -> list[SlotLine]:
        return [SlotLine(m.address, m.port, not m.draining) if m else SlotLine() for m in self.slots]

    def urls(self) -> dict[str, str]:
        return {server_name(i): m.url if m else EMPTY for i, m in enumerate(self.slots)}

    def prefixes(self) -> dict[str, str]:
        """k -> the shortest prefix of slots holding k members (0: no such k), and 'count'."""
        entries = {"count": str(len(self.members()))}
        found = 0
        for j, member in enumerate(self.slots, start=1):
            if member is not None and not member.draining:
                found += 1
                entries[str(found)] = str(j)
        for k in range(found + 1, self.layout.slots + 1):
            entries[str(k)] = "0"
        return entries

    def rendered(self) -> None:
        """The maps were just written with the configuration: HAProxy starts with them."""
        self._prefixes = self.prefixes()

    def forget_draining(self) -> None:
        """A restarted HAProxy has no requests in flight: removals in progress are done."""
        for i, member in enumerate(self.slots):
            if member is not None and member.draining:
                self.slots[i] = None

    async def assign(self, urls: list[str]) -> None:
        """The starting backends, in order, before HAProxy first starts."""
        for i, url in enumerate(dict.fromkeys(urls)):
            address, port = await resolve(url)
            self.slots[i] = Member(url, address, port, i)

    # --- changes at run time --------------------------------------------------------------------

    def _backends_with(self, slot: int) -> list[str]:
        return [backend_name(p, j) for p in policies() for j in range(slot + 1, self.layout.slots + 1)]

    async def add(self, url: str) -> Member:
        async with self.lock:
            if self.find(url) is not None:
                raise Conflict(f"{url} is already a backend.")
            address, port = await resolve(url)
            free = next((i for i, m in enumerate(self.slots) if m is None), None)
            if free is None:
                raise Conflict(f"All {self.layout.slots} server slots are taken; start the balancer with a larger "
                               "--slots to hold more backends.")  # fmt: skip
            member = Member(url, address, port, free)
            self.slots[free] = member
            s = f"{self.primary}/{server_name(free)}"
            try:
                # From maintenance through drain, with health "down": it takes traffic only once
                # --rise checks have passed (leaving maintenance straight to ready would be "up").
                await self.api.run([
                    *(f"set server {b}/{server_name(free)} addr {address} port {port}" for b in self._backends_with(free)),
                    f"set server {s} check-port {port}",
                    f"set server {s} state drain",
                    f"set server {s} health down",
                    f"enable health {s}",
                    f"set server {s} state ready",
                    f"set map {self.layout.backend_map} {server_name(free)} {url}",
                ])  # fmt: skip
                await self._sync_prefixes()
            except ImgclassError:
                self.slots[free] = None
                raise
        self.logger.info("backend_added", url=url, slot=server_name(free), address=f"{address}:{port}")
        return member

    async def remove(self, url: str) -> Member:
        async with self.lock:
            member = self.find(url)
            if member is None:
                raise NotFound(f"{url} is not a backend.")
            member.draining = True
            try:
                await self.api.run([f"set server {self.primary}/{server_name(member.slot)} state drain"])
                await self._sync_prefixes()
            except ImgclassError:
                member.draining = False
                raise
        self.logger.info("backend_removed", url=url, slot=server_name(member.slot), draining=True)
        task = asyncio.create_task(self._finish_removal(member), name=f"drain {url}")
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)
        return member

    async def _finish_removal(self, member: Member) -> None:
        """Wait until no request is in flight or queued on its slot, in any backend; then maintenance."""
        name = server_name(member.slot)
        while True:
            rows = await self.api.stats(servers_only=True)
            if sum(int(r["scur"] or 0) + int(r["qcur"] or 0) for r in rows if r["svname"] == name) == 0:
                break
            await asyncio.sleep(DRAIN_POLL_S)
        async with self.lock:
            if self.slots[member.slot] is not member:
                return  # a restart finished it
            await self.api.run([f"set server {self.primary}/{name} state maint",
                                f"set map {self.layout.backend_map} {name} {EMPTY}"])  # fmt: skip
            self.slots[member.slot] = None
        self.logger.info("backend_drained", url=member.url, slot=name)

    async def _sync_prefixes(self) -> None:
        wanted = self.prefixes()
        changed = [f"set map {self.layout.prefix_map} {k} {v}" for k, v in wanted.items() if self._prefixes.get(k) != v]
        if changed:
            await self.api.run(changed)
        self._prefixes = wanted

    async def stop(self) -> None:
        for task in list(self._drains):
            task.cancel()
        await asyncio.gather(*self._drains, return_exceptions=True)

    # --- the model servers' own names ---------------------------------------------------------

    async def learn_names(self, session: aiohttp.ClientSession, timeout: float) -> None:
        """Each member's --name, from one /readyz answer (HAProxy's checks do not keep bodies)."""

        async def one(member: Member) -> None:
            try:
                async with session.get(member.url + "/readyz", timeout=aiohttp.ClientTimeout(total=timeout)) as answer:
                    name = json.loads(await answer.read()).get("server")
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, AttributeError):
                return
            if isinstance(name, str):
                member.name = name

        await asyncio.gather(*(one(m) for m in self.members() if m.name is None))


def check_urls(urls: list[str]) -> None:
    """The starting backends as engine mode takes them, host and port only, before anything starts."""
    for url in urls:
        if urlsplit(url).path not in ("", "/"):
            raise ConfigError(f"backend {url} has a path; engine mode forwards to a server's host and port only: "
                              "give http://host:port.")  # fmt: skip
