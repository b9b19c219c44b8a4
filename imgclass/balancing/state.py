"""The balancer's state: its backends and their health, slots, policies, one HTTP client, and metrics."""

from __future__ import annotations

import time

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .. import log
from ..errors import NoBackendAvailable, QueueFull, QueueTimeout
from ..web.metrics import Buckets, CountedBy, Counts
from .policies import make_policies
from .pool import BackendState, HealthSettings, Pool
from .settings import BalancerSettings
from .slots import Slots


class Balancer:
    """Pool, policies, the upstream session and the metrics of one balancer app."""

    def __init__(self, settings: BalancerSettings, name: str, logger: log.EventLogger) -> None:
        self.settings = settings
        self.name = name
        self.logger = logger
        self.pool = Pool(
            settings.backends,
            HealthSettings(
                interval=settings.health_interval,
                fall=settings.fall,
                rise=settings.rise,
                eject_seconds=settings.eject_seconds,
                check_timeout=min(2.0, max(0.2, settings.health_interval)),
                max_ejection_percent=settings.max_ejection_percent,
                panic_threshold=settings.panic_threshold,
            ),
            logger,
        )
        self.slots = Slots(self.pool, settings.max_conn, settings.queue_size, settings.queue_timeout)
        self.pool.on_available = self.slots.kick
        self.policies = make_policies(settings.seed)
        # One client for the whole process: forwarding and health checks share its keep-alive pools.
        self.session: aiohttp.ClientSession | None = None
        self.labels: bytes | None = None  # the model's class list, from a model server's /labels
        # sock_read is a read timeout (the longest silence from a backend), as --timeout promises
        self.timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=settings.connect_timeout, sock_read=settings.timeout
        )
        self.registry = CollectorRegistry()
        self.requests = Counts(
            "imgclass_balancer_requests", "Forwarded requests by backend and status", ["backend", "status"],
            self.registry,
        )  # fmt: skip
        self.latency = Buckets(
            "imgclass_balancer_request_seconds", "POST /submit latency as the client sees it",
            (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30), self.registry,
        )  # fmt: skip
        self.retries = Counts(
            "imgclass_balancer_retries", "Requests retried on another backend, by why: no_response (connection "
            "refused, reset or closed), overloaded (a 503 from a shedding server), try_timeout", ["reason"],
            self.registry,
        )  # fmt: skip
        self.retries_refused = Counts(
            "imgclass_balancer_retries_refused", "Retries not made because the retry budget was spent", ["reason"],
            self.registry,
        )  # fmt: skip
        # In flight, and of those, retries of shed or timed-out tries: the retry budget (Envoy's)
        # lets the second be at most retry_budget percent of the first, so retries never multiply
        # an overload.
        self.active = 0
        self.retrying = 0
        self.retrying_peak = 0
        Gauge("imgclass_balancer_in_flight", "Requests being handled", registry=self.registry).set_function(
            lambda: self.active
        )
        Gauge(
            "imgclass_balancer_retries_in_flight_peak", "The most budgeted retries ever in flight at once",
            registry=self.registry,
        ).set_function(lambda: self.retrying_peak)
        CountedBy("imgclass_balancer_ejections", "Backends ejected for failing (one per failure event)",
                  lambda: self.pool.ejections_total, self.registry)  # fmt: skip
        CountedBy("imgclass_balancer_panics", "Requests routed in panic: too few backends were not ejected",
                  lambda: self.pool.panics_total, self.registry)  # fmt: skip
        Gauge(
            "imgclass_balancer_backends_in_service", "Backends healthy and not ejected", registry=self.registry
        ).set_function(self.pool.in_service)
        self.no_backend = Counter(
            "imgclass_balancer_no_backend", "Requests refused: no healthy backend", registry=self.registry
        )
        self.queue_wait = Histogram(
            "imgclass_balancer_queue_seconds", "Wait for a free backend slot (with --max-conn)",
            buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10), registry=self.registry,
        )  # fmt: skip
        Gauge(
            "imgclass_balancer_queued", "Requests waiting for a free backend slot", registry=self.registry
        ).set_function(lambda: len(self.slots.queue))
        self.refused = Counter(
            "imgclass_balancer_queue_refused", "Requests refused by the queue", ["reason"], registry=self.registry
        )
        self.client_gone = Counter(
            "imgclass_balancer_client_gone", "Requests whose client left: queued (its place freed) or "
            "forwarding (its slot freed, the upstream call cancelled)", ["stage"], registry=self.registry,
        )  # fmt: skip

    async def start(self) -> None:
        # No pool limit: --max-conn and the queue bound what is in flight, not the client library.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30.0)
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=self.timeout, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )  # fmt: skip
        await self.pool.start(self.session)

    async def stop(self) -> None:
        await self.pool.stop()
        if self.session is not None:
            await self.session.close()

    def may_retry(self, reason: str) -> bool:
        """Whether one more budgeted retry fits: at most retry_budget percent of the requests in
        flight are retries, and at least 3 may always be (Envoy's min_retry_concurrency)."""
        if self.retrying < max(3.0, self.settings.retry_budget * self.active / 100):
            return True
        self.retries_refused.inc(reason)
        return False

    def count(self, url: str, status: int | str) -> None:
        self.requests.inc(url, status)

    def take_now(self, policy: str, first_k: int | None) -> BackendState | None:
        """A backend with a slot taken if one is free now; None if the request must wait in the queue."""
        try:
            backend = self.slots.take_now(self.policies[policy], first_k)
        except NoBackendAvailable:
            self.no_backend.inc()
            raise
        if backend is not None and self.settings.max_conn:
            self.queue_wait.observe(0.0)
        return backend

    async def acquire(
        self, policy: str, first_k: int | None, exclude: BackendState | None = None
    ) -> tuple[BackendState, float]:
        """A backend with a slot taken for this request, and the ms spent waiting for it."""
        start = time.perf_counter()
        try:
            backend = await self.slots.acquire(self.policies[policy], first_k, exclude)
        except NoBackendAvailable:
            self.no_backend.inc()
            raise
        except QueueFull:
            self.refused.labels("full").inc()
            raise
        except QueueTimeout:
            self.refused.labels("timeout").inc()
            raise
        waited = time.perf_counter() - start
        if self.settings.max_conn:
            self.queue_wait.observe(waited)
        return backend, waited * 1000
