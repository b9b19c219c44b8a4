"""The load balancer: POST /submit forwards the raw upload to one model server chosen by a policy."""

from __future__ import annotations

import argparse
import hmac
import json
import re
import time
from dataclasses import dataclass
from importlib import resources
from urllib.parse import urlencode

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
    run_async,
    run_until_signalled,
    socket_url,
)
from .payload import too_large
from .policies import POLICIES, make_policies
from .pool import BackendState, HealthSettings, Pool
from .upstream import HostPool, ReadTimeout, Response, UpstreamFailure

BALANCER_OPTIONS = [
    "host", "port", "name", "log_level", "backends", "backends_file", "cluster", "policy", "health_interval", "fall",
    "rise", "eject_seconds", "timeout", "connect_timeout", "admin_token", "max_upload_mb", "seed",
]  # fmt: skip

_FORM_FIELD = re.compile(rb'name="(number_backend_servers|policy)"\r\n(?:[^\r\n]*\r\n)*\r\n([^\r\n]{0,64})\r\n')
_HOP_BY_HOP = {b"content-length", b"transfer-encoding", b"connection", b"keep-alive", b"date", b"server"}


_SOURCES = ("backends_file", "cluster")  # where backends come from, merged into `backends`


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
        values = {name: config.OPTIONS[name].default for name in BALANCER_OPTIONS if name not in _SOURCES}
        values["backends"] = []
        return cls(**{**values, **overrides})  # type: ignore[arg-type]

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> BalancerSettings:
        backends = list(ns.backends or [])
        if ns.backends_file:
            backends += config.read_backends_file(ns.backends_file)
        if ns.cluster:
            from .testbed import backends_from_cluster

            backends += backends_from_cluster(ns.cluster)
        if not backends:
            raise ConfigError(
                "no backends: pass --backends URL,URL, --backends-file FILE or --cluster cluster.json "
                "(or IMGCLASS_BACKENDS)."
            )
        values = {name: getattr(ns, name) for name in BALANCER_OPTIONS if name not in _SOURCES}
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
        self.upstreams: dict[str, HostPool] = {}
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
        self._counters: dict[tuple[str, int | str], Counter] = {}
        self.retries = Counter(
            "imgclass_balancer_retries", "Requests retried on another backend", registry=self.registry
        )
        self.no_backend = Counter(
            "imgclass_balancer_no_backend", "Requests refused: no healthy backend", registry=self.registry
        )

    async def start(self) -> None:
        await self.pool.start()

    async def stop(self) -> None:
        await self.pool.stop()
        for upstream in self.upstreams.values():
            upstream.close()

    def count(self, url: str, status: int | str) -> None:
        """requests{backend,status} += 1, with the labelled child cached off the hot path."""
        child = self._counters.get((url, status))
        if child is None:
            child = self._counters[(url, status)] = self.requests.labels(url, str(status))
        child.inc()

    def choose(self, policy: str, first_k: int | None, exclude: BackendState | None = None) -> BackendState:
        candidates = self.pool.candidates(first_k, exclude)
        if not candidates:
            self.no_backend.inc()
            scope = f"among the first {first_k} backends " if first_k else ""
            raise NoBackendAvailable(f"No healthy model server {scope}is available; retry shortly.", retry_after=1)
        return self.policies[policy].choose(candidates)  # type: ignore[return-value]

    async def forward(
        self, backend: BackendState, body: bytes, headers: list[tuple[str, str]], path: bytes
    ) -> tuple[Response, float]:
        """POST the raw body to the backend's /predict; returns its response and the upstream ms."""
        upstream = self.upstreams.get(backend.url)
        if upstream is None:
            upstream = HostPool(backend.url, self.settings.connect_timeout, self.settings.timeout)
            self.upstreams[backend.url] = upstream
        backend.in_flight += 1
        start = time.perf_counter()
        try:
            response = await upstream.request(path, headers, body)
            return response, (time.perf_counter() - start) * 1000
        finally:
            backend.in_flight -= 1


BALANCER_KEY = web.AppKey("balancer", Balancer)


def _request_options(request: web.Request, body: bytes) -> tuple[str, int | None]:
    """policy and number_backend_servers, from the query or a multipart form field (found without parsing)."""
    values = {k: request.query[k] for k in ("policy", "number_backend_servers") if k in request.query}
    # A C-speed substring test first: the regex runs only when such a field is really there.
    if len(values) < 2 and (b'name="number_backend_servers"' in body or b'name="policy"' in body):
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
    path = b"/predict" + (("?" + urlencode(passthrough)).encode() if passthrough else b"")
    headers = [
        ("Content-Type", request.headers.get("Content-Type", "application/octet-stream")),
        (log.REQUEST_ID_HEADER, log.request_id.get()),
    ]
    backend = balancer.choose(policy, first_k)
    try:
        response, upstream_ms = await balancer.forward(backend, body, headers, path)
    except UpstreamFailure as exc:
        # Nothing came back, so the backend cannot have answered; classification is idempotent,
        # so one retry elsewhere is safe (HAProxy's retry-on conn-failure empty-response).
        balancer.pool.record_failure(backend, exc.reason, connection=True)
        balancer.count(backend.url, "error")
        balancer.retries.inc()
        failed = backend
        backend = balancer.choose(policy, first_k, exclude=failed)
        balancer.logger.warning("retry", failed=failed.url, reason=exc.reason, to=backend.url)
        try:
            response, upstream_ms = await balancer.forward(backend, body, headers, path)
        except UpstreamFailure as exc2:
            balancer.pool.record_failure(backend, exc2.reason, connection=True)
            balancer.count(backend.url, "error")
            raise UpstreamError(f"Two model servers failed to answer ({exc2.reason}); retry shortly.") from None
        except ReadTimeout:
            raise _timed_out(balancer, backend) from None
    except ReadTimeout:
        raise _timed_out(balancer, backend) from None

    status = response.status
    balancer.count(backend.url, status)
    if status >= 500:
        balancer.pool.record_failure(backend, f"http_{status}", connection=False)
    else:
        balancer.pool.record_success(backend, upstream_ms)
    out_headers = [
        (k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers if k.lower() not in _HOP_BY_HOP
    ]
    out_headers.append(("X-Backend", backend.url))
    payload = response.body
    if status == 200:
        payload = _annotate(payload, backend.url, upstream_ms, (time.perf_counter() - start) * 1000)
    balancer.latency.observe(time.perf_counter() - start)
    return web.Response(body=payload, status=status, headers=out_headers)


def _timed_out(balancer: Balancer, backend: BackendState) -> UpstreamTimeout:
    balancer.pool.record_failure(backend, "timeout", connection=False)
    balancer.count(backend.url, "timeout")
    return UpstreamTimeout(f"The model server did not answer within {balancer.settings.timeout:g} s.")


def _annotate(payload: bytes, backend_url: str, upstream_ms: float, total_ms: float) -> bytes:
    """Add backend and timing_ms.{upstream,balancer} to the server's JSON answer."""
    extra = f'"upstream":{upstream_ms:.3f},"balancer":{total_ms - upstream_ms:.3f},'.encode()
    at = payload.find(b'"timing_ms":{')
    # Our model server's answer is compact JSON ending in '}': splice instead of a parse and re-encode.
    if at >= 0 and payload.endswith(b"}") and payload[at + 13 : at + 14] == b'"':
        cut = at + 13
        backend = json.dumps(backend_url).encode()
        return payload[:cut] + extra + payload[cut:-1] + b',"backend":' + backend + b"}"
    doc = json.loads(payload)
    doc["backend"] = backend_url
    timing = doc.setdefault("timing_ms", {})
    timing["upstream"] = round(upstream_ms, 3)
    timing["balancer"] = round(total_ms - upstream_ms, 3)
    return json.dumps(doc, separators=(",", ":")).encode()


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
    balancer = request.app[BALANCER_KEY]
    url = raw.rstrip("/")
    balancer.pool.remove(url)
    upstream = balancer.upstreams.pop(url, None)
    if upstream is not None:
        upstream.close()  # its idle keep-alive connections would otherwise stay open
    return json_response({"removed": url})


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
        if request.path in ("/submit", "/predict"):
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
    app.router.add_post("/predict", submit)  # so the model server's curl line works on the balancer too
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
    run_async(run_until_signalled(app, sock, logger))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_options(parser, BALANCER_OPTIONS, overrides={"port": 5000})
