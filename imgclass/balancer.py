"""The load balancer: POST /submit forwards the raw upload to one model server chosen by a policy."""

from __future__ import annotations

import argparse
import functools
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from urllib.parse import urlencode

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from . import config, log
from .errors import (
    BadJSON,
    BadParameter,
    ConfigError,
    Forbidden,
    NoBackendAvailable,
    QueueFull,
    QueueTimeout,
    Unauthorized,
    UpstreamError,
    UpstreamTimeout,
)
from .frontend import App, Request, Response, healthz, json_response, metrics_handler
from .frontend import serve as serve_app
from .httpapp import bind_socket, run_async, socket_url
from .payload import form_fields
from .policies import POLICIES, make_policies
from .pool import BackendState, HealthSettings, Pool
from .slots import Slots
from .upstream import HostPool, ReadTimeout, UpstreamFailure
from .upstream import Response as UpstreamResponse

BALANCER_OPTIONS = [
    "host", "port", "name", "log_level", "backends", "backends_file", "cluster", "policy", "health_interval", "fall",
    "rise", "eject_seconds", "timeout", "connect_timeout", "max_conn", "queue_size", "queue_timeout", "admin_token",
    "max_upload_mb", "seed",
]  # fmt: skip

_OPTIONS = frozenset({"policy", "number_backend_servers"})
# x-request-id: the app sets it; the backend echoes the same one
_HOP_BY_HOP = {
    b"content-length",
    b"transfer-encoding",
    b"connection",
    b"keep-alive",
    b"date",
    b"server",
    b"x-request-id",
}


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
    max_conn: int
    queue_size: int
    queue_timeout: float
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
        self.slots = Slots(self.pool, settings.max_conn, settings.queue_size, settings.queue_timeout)
        self.pool.on_available = self.slots.kick
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
        self.queue_wait = Histogram(
            "imgclass_balancer_queue_seconds", "Wait for a free backend slot (with --max-conn)",
            buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10), registry=self.registry,
        )  # fmt: skip
        self.queue_length = Gauge(
            "imgclass_balancer_queued", "Requests waiting for a free backend slot", registry=self.registry
        )
        self.queue_length.set_function(lambda: len(self.slots.queue))
        self.refused = Counter(
            "imgclass_balancer_queue_refused", "Requests refused by the queue", ["reason"], registry=self.registry
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

    async def forward(
        self, backend: BackendState, body: bytes, headers: list[tuple[str, str]], path: bytes
    ) -> tuple[UpstreamResponse, float]:
        """POST the raw body to the backend's /predict; returns its response and the upstream ms."""
        upstream = self.upstreams.get(backend.url)
        if upstream is None:
            upstream = HostPool(backend.url, self.settings.connect_timeout, self.settings.timeout)
            self.upstreams[backend.url] = upstream
        start = time.perf_counter()
        try:
            response = await upstream.request(path, headers, body)
            return response, (time.perf_counter() - start) * 1000
        finally:
            self.slots.release(backend)


def _request_options(balancer: Balancer, request: Request, body: bytes) -> tuple[str, int | None]:
    """policy and number_backend_servers, from the query or a multipart form field."""
    query = request.query if request.query_string else {}
    values = {k: query[k] for k in _OPTIONS if k in query}
    if len(values) < 2:
        for name, value in form_fields(body, request.content_type, _OPTIONS).items():
            values.setdefault(name, value)
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


async def submit(balancer: Balancer, request: Request) -> Response:
    start = time.perf_counter()
    body = request.body  # already bounded by the front end
    policy, first_k = _request_options(balancer, request, body)
    # Our own parameters stay here; anything else (e.g. top=) goes to the model server.
    path = b"/predict"
    if request.query_string:
        passthrough = [(k, v) for k, v in request.query.items() if k not in _OPTIONS]
        if passthrough:
            path += ("?" + urlencode(passthrough)).encode()
    headers = [
        ("Content-Type", request.content_type or "application/octet-stream"),
        (log.REQUEST_ID_HEADER, log.request_id.get()),
    ]
    backend, queued_ms = await balancer.acquire(policy, first_k)
    try:
        response, upstream_ms = await balancer.forward(backend, body, headers, path)
    except UpstreamFailure as exc:
        # Nothing came back, so the backend cannot have answered; classification is idempotent,
        # so one retry elsewhere is safe (HAProxy's retry-on conn-failure empty-response).
        balancer.pool.record_failure(backend, exc.reason, connection=True)
        balancer.count(backend.url, "error")
        balancer.retries.inc()
        failed = backend
        backend, waited = await balancer.acquire(policy, first_k, exclude=failed)
        queued_ms += waited
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
    out_headers = [(k, v) for k, v in response.headers if k.lower() not in _HOP_BY_HOP]
    out_headers.append((b"X-Backend", backend.url.encode()))
    payload = response.body
    if status == 200:
        payload = _annotate(payload, backend.url, upstream_ms, queued_ms, (time.perf_counter() - start) * 1000)
    balancer.latency.observe(time.perf_counter() - start)
    return Response(payload, status, out_headers)


def _timed_out(balancer: Balancer, backend: BackendState) -> UpstreamTimeout:
    balancer.pool.record_failure(backend, "timeout", connection=False)
    balancer.count(backend.url, "timeout")
    return UpstreamTimeout(f"The model server did not answer within {balancer.settings.timeout:g} s.")


@functools.lru_cache(maxsize=1024)
def _backend_member(backend_url: str) -> bytes:
    return b',"backend":' + json.dumps(backend_url).encode() + b"}"


def _annotate(payload: bytes, backend_url: str, upstream_ms: float, queued_ms: float, total_ms: float) -> bytes:
    """Add backend and timing_ms.{upstream,queued,balancer} to the server's JSON answer.

    balancer is all the time spent at the balancer outside the upstream call; queued is the part
    of it spent waiting for a free slot (0 without --max-conn).
    """
    balancer_ms = total_ms - upstream_ms
    extra = f'"upstream":{upstream_ms:.3f},"queued":{queued_ms:.3f},"balancer":{balancer_ms:.3f},'.encode()
    at = payload.find(b'"timing_ms":{')
    # Our model server's answer is compact JSON ending in '}': splice instead of a parse and re-encode.
    if at >= 0 and payload.endswith(b"}") and payload[at + 13 : at + 14] == b'"':
        cut = at + 13
        return b"".join((payload[:cut], extra, payload[cut:-1], _backend_member(backend_url)))
    doc = json.loads(payload)
    doc["backend"] = backend_url
    timing = doc.setdefault("timing_ms", {})
    timing["upstream"] = round(upstream_ms, 3)
    timing["queued"] = round(queued_ms, 3)
    timing["balancer"] = round(balancer_ms, 3)
    return json.dumps(doc, separators=(",", ":")).encode()


def _require_admin(balancer: Balancer, request: Request) -> None:
    token = balancer.settings.admin_token
    if not token:
        raise Forbidden(
            "Membership changes are disabled: start the balancer with --admin-token or IMGCLASS_ADMIN_TOKEN."
        )
    supplied = request.headers.get("authorization", "")
    if not hmac.compare_digest(supplied.encode(), f"Bearer {token}".encode()):
        raise Unauthorized("Send 'Authorization: Bearer <admin token>' to change the backends.")


async def list_backends(balancer: Balancer, request: Request) -> Response:
    now = time.monotonic()
    return json_response([b.snapshot(now) for b in balancer.pool.backends])


async def add_backend(balancer: Balancer, request: Request) -> Response:
    _require_admin(balancer, request)
    try:
        doc = json.loads(request.body)
        raw = doc["url"]
    except (ValueError, KeyError, TypeError):
        raise BadJSON('Send JSON {"url": "http://host:port"}.') from None
    try:
        url = config.url(str(raw))
    except ValueError as exc:
        raise BadParameter(f"{exc}.") from None
    state = await balancer.pool.add(url)
    return json_response(state.snapshot(time.monotonic()), 201)


async def remove_backend(balancer: Balancer, request: Request) -> Response:
    _require_admin(balancer, request)
    raw = request.query.get("url")
    if not raw:
        raise BadParameter("Pass the backend to remove as ?url=http://host:port.")
    url = raw.rstrip("/")
    balancer.pool.remove(url)
    upstream = balancer.upstreams.pop(url, None)
    if upstream is not None:
        upstream.close()  # its idle keep-alive connections would otherwise stay open
    return json_response({"removed": url})


def load_page() -> bytes:
    return resources.files("imgclass").joinpath("templates/index.html").read_bytes()


def create_app(settings: BalancerSettings, name: str | None = None) -> App:
    """The balancer as an app on the llhttp front end; its pool starts with the app."""
    name = name or settings.name or f"{settings.host}:{settings.port}"
    logger = log.get_logger(name, "balancer", settings.log_level)
    balancer = Balancer(settings, name, logger)
    page = load_page()

    verbose = logger.enabled(logging.INFO)

    def on_done(request: Request, status: int, seconds: float) -> None:
        if verbose and request.path in ("/submit", "/predict"):
            logger.info("submit", status=status, ms=round(seconds * 1000, 2))

    app = App(logger, int(settings.max_upload_mb * 1_000_000), on_done)

    def bind(handler: Callable[[Balancer, Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        return functools.partial(handler, balancer)

    async def index(request: Request) -> Response:
        return Response(page, 200, [(b"Content-Type", b"text/html; charset=utf-8")])

    app.route("GET", "/", index)
    app.route("POST", "/submit", bind(submit))
    app.route("POST", "/predict", bind(submit))  # so the model server's curl line works on the balancer too
    app.route("GET", "/backends", bind(list_backends))
    app.route("POST", "/backends", bind(add_backend))
    app.route("DELETE", "/backends", bind(remove_backend))
    app.route("GET", "/healthz", healthz)
    app.route("GET", "/metrics", metrics_handler(balancer.registry))

    async def start() -> None:
        await balancer.start()
        healthy = sum(b.healthy for b in balancer.pool.backends)
        logger.info("ready", backends=len(balancer.pool.backends), healthy=healthy, policy=settings.policy)

    app.on_startup.append(start)
    app.on_shutdown.append(balancer.stop)
    return app


def serve(settings: BalancerSettings) -> None:
    sock = bind_socket(settings.host, settings.port)
    name = settings.name or socket_url(sock).removeprefix("http://")
    app = create_app(settings, name)
    run_async(serve_app(app, sock, app.logger))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_options(parser, BALANCER_OPTIONS, overrides={"port": 5000})
