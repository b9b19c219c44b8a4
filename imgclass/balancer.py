"""The load balancer: POST /submit forwards the raw upload to one model server chosen by a policy."""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import re
import time
from dataclasses import dataclass
from importlib import resources

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram

from . import config, log
from .errors import (
    BadJSON,
    BadParameter,
    ConfigError,
    Forbidden,
    NoBackendAvailable,
    Unauthorized,
    UpstreamError,
    UpstreamTimeout,
)
from .httpapp import (
    LOGGER_KEY,
    REGISTRY_KEY,
    bind_socket,
    healthz,
    json_response,
    make_middleware,
    metrics_handler,
    run_until_signalled,
    socket_url,
)
from .payload import too_large
from .policies import POLICIES, make_policies
from .pool import BackendState, HealthSettings, Pool

BALANCER_OPTIONS = [
    "host", "port", "name", "log_level", "backends", "backends_file", "policy", "health_interval", "fall",
    "rise", "eject_seconds", "timeout", "connect_timeout", "admin_token", "max_upload_mb", "seed",
]  # fmt: skip

# Upstream failures where the model server cannot have answered: safe to retry on another backend.
# Classification is idempotent, so an empty response (HAProxy's retry-on empty-response) counts too.
RETRYABLE = (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)
_FORM_FIELD = re.compile(rb'name="(number_backend_servers|policy)"\r\n(?:[^\r\n]*\r\n)*\r\n([^\r\n]{0,64})\r\n')
_HOP_BY_HOP = {"content-length", "transfer-encoding", "connection", "keep-alive", "date", "server"}


@dataclass(frozen=True)
class BalancerSettings:
    """Resolved balancer options; defaults live only in config.OPTIONS."""

    host: str
    port: int
    name: str | None
    log_level: str
    backends: list[str]
    policy: str
    health_interval: float
    fall: int
    rise: int
    eject_seconds: float
    timeout: float
    connect_timeout: float
    admin_token: str | None
    max_upload_mb: float
    seed: int | None

    @classmethod
    def make(cls, **overrides: object) -> BalancerSettings:
        values = {name: config.OPTIONS[name].default for name in BALANCER_OPTIONS if name != "backends_file"}
        values["backends"] = []
        return cls(**{**values, **overrides})  # type: ignore[arg-type]

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> BalancerSettings:
        backends = list(ns.backends or [])
        if ns.backends_file:
            backends += config.read_backends_file(ns.backends_file)
        if not backends:
            raise ConfigError("no backends: pass --backends URL,URL or --backends-file FILE (or IMGCLASS_BACKENDS).")
        values = {name: getattr(ns, name) for name in BALANCER_OPTIONS if name != "backends_file"}
        values["backends"] = backends
        return cls(**values)


class Balancer:
    """Pool, policies, upstream session and metrics of one balancer app."""

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
            ),
            logger,
        )
        self.policies = make_policies(settings.seed)
        self.session: aiohttp.ClientSession | None = None
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "imgclass_balancer_requests", "Forwarded requests by backend and status", ["backend", "status"],
            registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "imgclass_balancer_request_seconds", "POST /submit latency as the client sees it",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30),
            registry=self.registry,
        )  # fmt: skip
        self.retries = Counter(
            "imgclass_balancer_retries", "Requests retried on another backend", registry=self.registry
        )
        self.no_backend = Counter(
            "imgclass_balancer_no_backend", "Requests refused: no healthy backend", registry=self.registry
        )

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60)
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None, connect=self.settings.connect_timeout, sock_read=self.settings.timeout
            ),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )
        await self.pool.start()

    async def stop(self) -> None:
        await self.pool.stop()
        if self.session is not None:
            await self.session.close()

    def choose(self, policy: str, first_k: int | None, exclude: BackendState | None = None) -> BackendState:
        candidates = self.pool.candidates(first_k, exclude)
        if not candidates:
            self.no_backend.inc()
            scope = f"among the first {first_k} backends " if first_k else ""
            raise NoBackendAvailable(f"No healthy model server {scope}is available; retry shortly.", retry_after=1)
        return self.policies[policy].choose(candidates)  # type: ignore[return-value]

    async def forward(
        self, backend: BackendState, body: bytes, headers: dict[str, str], query: str
    ) -> tuple[int, bytes, dict[str, str], float]:
        """POST the raw body to backend /predict; returns status, body, headers, upstream ms."""
        assert self.session is not None
        backend.in_flight += 1
        start = time.perf_counter()
        try:
            async with self.session.post(backend.url + "/predict" + query, data=body, headers=headers) as response:
                payload = await response.read()
                return response.status, payload, dict(response.headers), (time.perf_counter() - start) * 1000
        finally:
            backend.in_flight -= 1


BALANCER_KEY = web.AppKey("balancer", Balancer)


def _request_options(request: web.Request, body: bytes) -> tuple[str, int | None]:
    """policy and number_backend_servers, from the query or a multipart form field (found without parsing)."""
    values = {k: request.query[k] for k in ("policy", "number_backend_servers") if k in request.query}
    if len(values) < 2 and request.content_type == "multipart/form-data" and b'name="' in body:
        for name, value in _FORM_FIELD.findall(body):
            values.setdefault(name.decode(), value.decode("latin-1").strip())
    balancer = request.app[BALANCER_KEY]
    policy = values.get("policy", balancer.settings.policy)
    if policy not in POLICIES:
        raise BadParameter(f"policy must be one of {', '.join(POLICIES)}, not {policy!r}.")
    first_k = None
    if "number_backend_servers" in values:
        raw = values["number_backend_servers"]
        if not raw.isdigit() or int(raw) < 1:
            raise BadParameter(f"number_backend_servers must be a whole number of at least 1, not {raw!r}.")
        first_k = int(raw)
    return policy, first_k


async def submit(request: web.Request) -> web.Response:
    balancer = request.app[BALANCER_KEY]
    start = time.perf_counter()
    limit = request.app[LIMIT_KEY]
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large(limit) from None
    policy, first_k = _request_options(request, body)
    # Our own parameters stay here; anything else (e.g. top=) goes to the model server.
    passthrough = [(k, v) for k, v in request.query.items() if k not in ("policy", "number_backend_servers")]
    query = "?" + "&".join(f"{k}={v}" for k, v in passthrough) if passthrough else ""
    headers = {"Content-Type": request.headers.get("Content-Type", "application/octet-stream")}
    headers[log.REQUEST_ID_HEADER] = log.request_id.get()

    backend = balancer.choose(policy, first_k)
    try:
        status, payload, up_headers, upstream_ms = await balancer.forward(backend, body, headers, query)
    except RETRYABLE as exc:
        balancer.pool.record_failure(backend, type(exc).__name__, connection=True)
        balancer.requests.labels(backend.url, "error").inc()
        balancer.retries.inc()
        failed = backend
        backend = balancer.choose(policy, first_k, exclude=failed)
        balancer.logger.warning("retry", failed=failed.url, reason=type(exc).__name__, to=backend.url)
        try:
            status, payload, up_headers, upstream_ms = await balancer.forward(backend, body, headers, query)
        except RETRYABLE as exc2:
            balancer.pool.record_failure(backend, type(exc2).__name__, connection=True)
            balancer.requests.labels(backend.url, "error").inc()
            raise UpstreamError(f"Two model servers failed to answer ({type(exc2).__name__}); retry shortly.") from None
        except asyncio.TimeoutError:
            balancer.pool.record_failure(backend, "timeout", connection=False)
            raise UpstreamTimeout(f"The model server did not answer within {balancer.settings.timeout:g} s.") from None
    except asyncio.TimeoutError:
        balancer.pool.record_failure(backend, "timeout", connection=False)
        balancer.requests.labels(backend.url, "timeout").inc()
        raise UpstreamTimeout(f"The model server did not answer within {balancer.settings.timeout:g} s.") from None

    balancer.requests.labels(backend.url, str(status)).inc()
    if status >= 500:
        balancer.pool.record_failure(backend, f"http_{status}", connection=False)
    else:
        balancer.pool.record_success(backend, upstream_ms)
    out_headers = {k: v for k, v in up_headers.items() if k.lower() not in _HOP_BY_HOP}
    out_headers["X-Backend"] = backend.url
    if status == 200:
        doc = json.loads(payload)
        doc["backend"] = backend.url
        total_ms = (time.perf_counter() - start) * 1000
        timing = doc.setdefault("timing_ms", {})
        timing["upstream"] = round(upstream_ms, 3)
        timing["balancer"] = round(total_ms - upstream_ms, 3)
        payload = json.dumps(doc, separators=(",", ":")).encode()
    balancer.latency.observe(time.perf_counter() - start)
    return web.Response(body=payload, status=status, headers=out_headers)


def _require_admin(request: web.Request) -> None:
    token = request.app[BALANCER_KEY].settings.admin_token
    if not token:
        raise Forbidden(
            "Membership changes are disabled: start the balancer with --admin-token or IMGCLASS_ADMIN_TOKEN."
        )
    supplied = request.headers.get("Authorization", "")
    if not hmac.compare_digest(supplied.encode(), f"Bearer {token}".encode()):
        raise Unauthorized("Send 'Authorization: Bearer <admin token>' to change the backends.")


async def list_backends(request: web.Request) -> web.Response:
    pool = request.app[BALANCER_KEY].pool
    now = time.monotonic()
    return json_response([b.snapshot(now) for b in pool.backends])


async def add_backend(request: web.Request) -> web.Response:
    _require_admin(request)
    try:
        doc = await request.json()
        raw = doc["url"]
    except (ValueError, KeyError, TypeError):
        raise BadJSON('Send JSON {"url": "http://host:port"}.') from None
    try:
        url = config.url(str(raw))
    except ValueError as exc:
        raise BadParameter(f"{exc}.") from None
    state = await request.app[BALANCER_KEY].pool.add(url)
    return json_response(state.snapshot(time.monotonic()), 201)


async def remove_backend(request: web.Request) -> web.Response:
    _require_admin(request)
    raw = request.query.get("url")
    if not raw:
        raise BadParameter("Pass the backend to remove as ?url=http://host:port.")
    request.app[BALANCER_KEY].pool.remove(raw.rstrip("/"))
    return json_response({"removed": raw.rstrip("/")})


async def index(request: web.Request) -> web.Response:
    return web.Response(body=request.app[PAGE_KEY], content_type="text/html", charset="utf-8")


LIMIT_KEY = web.AppKey("limit", int)
PAGE_KEY = web.AppKey("page", bytes)


def load_page() -> bytes:
    return resources.files("imgclass").joinpath("templates/index.html").read_bytes()


def create_app(settings: BalancerSettings, name: str | None = None) -> web.Application:
    name = name or settings.name or f"{settings.host}:{settings.port}"
    logger = log.get_logger(name, "balancer", settings.log_level)
    balancer = Balancer(settings, name, logger)
    limit = int(settings.max_upload_mb * 1_000_000)

    def on_done(request: web.Request, status: int, seconds: float) -> None:
        if request.path == "/submit":
            logger.info("submit", status=status, ms=f"{seconds * 1000:.2f}")

    # the body limit leaves room for the multipart envelope around a max-size image
    app = web.Application(client_max_size=limit + 65536, middlewares=[make_middleware(on_done)])
    app[BALANCER_KEY] = balancer
    app[LOGGER_KEY] = logger
    app[REGISTRY_KEY] = balancer.registry
    app[LIMIT_KEY] = limit + 65536
    app[PAGE_KEY] = load_page()
    app.router.add_get("/", index)
    app.router.add_post("/submit", submit)
    app.router.add_get("/backends", list_backends)
    app.router.add_post("/backends", add_backend)
    app.router.add_delete("/backends", remove_backend)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_handler)

    async def start(app: web.Application) -> None:
        await balancer.start()
        healthy = sum(b.healthy for b in balancer.pool.backends)
        logger.info("ready", backends=len(balancer.pool.backends), healthy=healthy, policy=settings.policy)

    async def cleanup(app: web.Application) -> None:
        await balancer.stop()

    app.on_startup.append(start)
    app.on_cleanup.append(cleanup)
    return app


def serve(settings: BalancerSettings) -> None:
    sock = bind_socket(settings.host, settings.port)
    name = settings.name or socket_url(sock).removeprefix("http://")
    logger = log.get_logger(name, "balancer", settings.log_level)
    app = create_app(settings, name)
    asyncio.run(run_until_signalled(app, sock, logger))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_options(parser, BALANCER_OPTIONS, overrides={"port": 5000})
