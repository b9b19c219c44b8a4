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
    rise: int = 2  # passed checks in a row before marking up (HAProxy rise), or ending an ejection
    eject_seconds: float = 5.0  # base ejection time; grows with repeated ejection events, as Envoy's
    consecutive_5xx: int = 3  # 5xx responses in a row that eject a backend (503 never counts: it is shedding)
    check_timeout: float = 1.0
    max_ejection_percent: int = 50  # Envoy's max_ejection_percent: never eject more of the pool at once
    panic_threshold: int = 50  # Envoy's healthy_panic_threshold: below it, ejections are disregarded


@dataclass
class BackendState:
    url: str
    name: str | None = None  # the model server's own name (its --name), from its /readyz answer
    healthy: bool = True
    in_flight: int = 0
    served: int = 0
    failures: int = 0
    ejected_until: float = 0.0  # time.monotonic(); 0 when not ejected
    ejections: int = 0  # ejection events in a row, without a success between them
    check_passes: int = 0
    check_fails: int = 0
    passes_while_ejected: int = 0
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
        self._checkers: dict[str, asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None
        self.ejections_total = 0
        self.panics_total = 0
        # called when backends may have become available (up, added, ejection over)
        self.on_available: Callable[[], None] = lambda: None

    def candidates(self, first_k: int | None = None, exclude: BackendState | None = None) -> list[BackendState]:
        """The backends a request may go to now: healthy and not ejected, among the first k.

        In panic (fewer than panic_threshold percent of the healthy backends are not ejected),
        ejections are disregarded and every healthy backend takes traffic, as Envoy does: the
        alternative is to pile the whole load onto the few that are left.
        """
        now = time.monotonic()
        scope = self.backends if first_k is None else self.backends[:first_k]
        # available(), inlined: this runs for every request
        ready = [b for b in scope if b.healthy and now >= b.ejected_until and b is not exclude]
        healthy = len(ready) if len(ready) == len(scope) else sum(b.healthy for b in scope)
        if len(ready) * 100 < self.settings.panic_threshold * healthy:
            self.panics_total += 1
            return [b for b in scope if b.healthy and b is not exclude]
        return ready

    def in_service(self) -> int:
        now = time.monotonic()
        return sum(1 for b in self.backends if b.healthy and now >= b.ejected_until)

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
            self._watch(state)
        self.on_available()
        return state

    def remove(self, url: str) -> None:
        state = self.find(url)
        if state is None:
            raise NotFound(f"{url} is not a backend.")
        self.backends.remove(state)
        checker = self._checkers.pop(url, None)
        if checker is not None:
            checker.cancel()
        self.logger.info("backend_removed", url=url)

    # --- passive: what real traffic tells us --------------------------------------------

    def record_success(self, backend: BackendState, upstream_ms: float) -> None:
        backend.served += 1
        backend.consecutive_errors = 0
        backend.ejections = 0
        backend.recent_ms.append(upstream_ms)

    def record_failure(self, backend: BackendState, reason: str, *, connection: bool) -> None:
        """A connection error ejects at once; other 5xx answers eject after a run of them.

        One failure event, one ejection: the requests that were in flight on a backend when it
        failed fail too, within milliseconds, and must neither eject it again nor lengthen the
        ejection. At most max_ejection_percent of the pool is ejected at once, and never the last
        backend in service.
        """
        backend.failures += 1
        now = time.monotonic()
        if backend.ejected_until > now:
            return
        backend.consecutive_errors += 1
        if not connection and backend.consecutive_errors < self.settings.consecutive_5xx:
            return
        backend.consecutive_errors = 0
        ejected = sum(1 for b in self.backends if b.ejected_until > now)
        cap = max(1, self.settings.max_ejection_percent * len(self.backends) // 100)
        in_service = sum(1 for b in self.backends if b is not backend and b.healthy and b.ejected_until <= now)
        if ejected >= cap or in_service < 1:
            self.logger.warning("ejection_skipped", url=backend.url, reason=reason, ejected=ejected, cap=cap,
                                in_service=in_service)  # fmt: skip
            return
        backend.ejections += 1
        seconds = self.settings.eject_seconds * min(backend.ejections, 6)
        backend.ejected_until = now + seconds
        backend.passes_while_ejected = 0
        self.ejections_total += 1
        self.logger.warning("backend_ejected", url=backend.url, reason=reason, seconds=seconds)

    # --- active: GET /readyz, every backend on its own period -----------------------------

    async def start(self, session: aiohttp.ClientSession) -> None:
        """Check every backend once, then keep checking; `session` is the process's one HTTP client."""
        self._session = session
        self._check_timeout = aiohttp.ClientTimeout(total=self.settings.check_timeout)
        await asyncio.gather(*(self._check(b, first=True) for b in list(self.backends)))
        for backend in self.backends:
            self._watch(backend)

    async def stop(self) -> None:
        checkers = list(self._checkers.values())
        self._checkers.clear()
        for task in checkers:
            task.cancel()
        await asyncio.gather(*checkers, return_exceptions=True)

    def _watch(self, backend: BackendState) -> None:
        self._checkers[backend.url] = asyncio.create_task(self._checks(backend), name=f"health {backend.url}")

    async def _checks(self, backend: BackendState) -> None:
        """One backend's checks, on a fixed period: a hung backend delays no other backend's checks,
        and its own checks still run every interval, each bounded by check_timeout."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            due += self.settings.interval
            await asyncio.sleep(max(0.0, due - loop.time()))
            await self._check(backend)
            self.on_available()  # ejections run out with time, not with an event
            due = max(due, loop.time() - self.settings.interval)  # after a stall, don't fire a burst

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
            elif backend.ejected_until > time.monotonic():
                # rise passing checks since the ejection began end it early (Envoy: a passing active
                # check ends an ejection); a server restarted in a second serves again in seconds.
                backend.passes_while_ejected += 1
                if backend.passes_while_ejected >= self.settings.rise:
                    backend.ejected_until = 0.0
                    self.logger.info("ejection_ended", url=backend.url, passes=backend.passes_while_ejected)
                    self.on_available()
        else:
            backend.check_fails += 1
            backend.check_passes = 0
            backend.passes_while_ejected = 0
            if backend.healthy and (first or backend.check_fails >= self.settings.fall):
                backend.healthy = False
                self.logger.warning("backend_down", url=backend.url, failed_checks=backend.check_fails)
