"""The backend pool: membership, in-flight counts, active health checks and passive ejection."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from ..errors import Conflict, NotFound
from ..log import EventLogger


@dataclass(frozen=True)
class HealthSettings:
    interval: float = 1.0
    fall: int = 3  # failed checks in a row before marking down (HAProxy fall)
    rise: int = 2  # passed checks in a row before marking up (HAProxy rise)
    eject_seconds: float = 5.0  # base ejection time; grows with repeated ejections, as Envoy's
    consecutive_5xx: int = 3  # 5xx responses in a row that eject a backend
    check_timeout: float = 1.0


@dataclass
class BackendState:
    url: str
    name: str | None = None  # the model server's own name (its --name), from its /readyz answer
    healthy: bool = True
    in_flight: int = 0
    served: int = 0
    failures: int = 0
    ejected_until: float = 0.0  # time.monotonic(); 0 when not ejected
    ejections: int = 0
    check_passes: int = 0
    check_fails: int = 0
    consecutive_errors: int = 0
    recent_ms: deque[float] = field(default_factory=lambda: deque(maxlen=200))

    def available(self, now: float) -> bool:
        return self.healthy and now >= self.ejected_until

    def snapshot(self, now: float) -> dict[str, object]:
        ejected = self.ejected_until > now
        return {
            "url": self.url,
            "name": self.name,
            "healthy": self.healthy,
            "available": self.available(now),
            "in_flight": self.in_flight,
            "served": self.served,
            "failures": self.failures,
            # wall-clock time, so a reader can compare it with its own clock
            "ejected_until": time.time() + (self.ejected_until - now) if ejected else None,
            "latency_p50_ms": round(statistics.median(self.recent_ms), 3) if self.recent_ms else None,
        }


def _server_name(readyz_body: bytes) -> str | None:
    try:
        name = json.loads(readyz_body).get("server")
    except (ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


class Pool:
    """Ordered backends (order matters for number_backend_servers) and their health."""

    def __init__(self, urls: list[str], settings: HealthSettings, logger: EventLogger) -> None:
        self.settings = settings
        self.logger = logger
        self.backends: list[BackendState] = [BackendState(url) for url in dict.fromkeys(urls)]
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        # called when backends may have become available (up, added, ejection over)
        self.on_available: Callable[[], None] = lambda: None

    def candidates(self, first_k: int | None = None, exclude: BackendState | None = None) -> list[BackendState]:
        now = time.monotonic()
        pool = self.backends if first_k is None else self.backends[:first_k]
        # available(), inlined: this runs for every request
        return [b for b in pool if b.healthy and now >= b.ejected_until and b is not exclude]

    def find(self, url: str) -> BackendState | None:
        return next((b for b in self.backends if b.url == url), None)

    async def add(self, url: str) -> BackendState:
        if self.find(url):
            raise Conflict(f"{url} is already a backend.")
        state = BackendState(url, healthy=False)
        self.backends.append(state)
        self.logger.info("backend_added", url=url)
        if self._session is not None:
            await self._check(state, first=True)
        self.on_available()
        return state

    def remove(self, url: str) -> None:
        state = self.find(url)
        if state is None:
            raise NotFound(f"{url} is not a backend.")
        self.backends.remove(state)
        self.logger.info("backend_removed", url=url)

    # --- passive: what real traffic tells us --------------------------------------------

    def record_success(self, backend: BackendState, upstream_ms: float) -> None:
        backend.served += 1
        backend.consecutive_errors = 0
        backend.ejections = 0
        backend.recent_ms.append(upstream_ms)

    def record_failure(self, backend: BackendState, reason: str, *, connection: bool) -> None:
        """A connection error ejects at once; 5xx responses eject after a run of them."""
        backend.failures += 1
        backend.consecutive_errors += 1
        if connection or backend.consecutive_errors >= self.settings.consecutive_5xx:
            backend.ejections += 1
            seconds = self.settings.eject_seconds * min(backend.ejections, 6)
            backend.ejected_until = time.monotonic() + seconds
            backend.consecutive_errors = 0
            self.logger.warning("backend_ejected", url=backend.url, reason=reason, seconds=seconds)

    # --- active: GET /readyz every interval ---------------------------------------------

    async def start(self, session: aiohttp.ClientSession) -> None:
        """Check every backend once, then keep checking; `session` is the process's one HTTP client."""
        self._session = session
        self._check_timeout = aiohttp.ClientTimeout(total=self.settings.check_timeout)
        await asyncio.gather(*(self._check(b, first=True) for b in list(self.backends)))
        self._task = asyncio.create_task(self._loop(), name="health-checks")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.interval)
            await asyncio.gather(*(self._check(b) for b in list(self.backends)))
            self.on_available()  # ejections run out with time, not with an event

    async def _check(self, backend: BackendState, first: bool = False) -> None:
        assert self._session is not None
        try:
            async with self._session.get(backend.url + "/readyz", timeout=self._check_timeout) as response:
                ok = response.status == 200
                body = await response.read()
            if ok:
                backend.name = _server_name(body) or backend.name
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            ok = False
        if ok:
            backend.check_passes += 1
            backend.check_fails = 0
            if not backend.healthy and (first or backend.check_passes >= self.settings.rise):
                backend.healthy = True
                backend.ejected_until = 0.0
                self.logger.info("backend_up", url=backend.url)
                self.on_available()
        else:
            backend.check_fails += 1
            backend.check_passes = 0
            if backend.healthy and (first or backend.check_fails >= self.settings.fall):
                backend.healthy = False
                self.logger.warning("backend_down", url=backend.url, failed_checks=backend.check_fails)
