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
from .frontend import App, CountByLabels, Reply, Request, Response, healthz, json_response, metrics_handler
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
        self.app: App  # set by create_app: the async paths run as its tasks
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
        self._count = CountByLabels(self.requests)
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
        self._count.inc(url, status)

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

    def upstream(self, url: str) -> HostPool:
        upstream = self.upstreams.get(url)
        if upstream is None:
            upstream = self.upstreams[url] = HostPool(url, self.settings.connect_timeout, self.settings.timeout)
        return upstream

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
        upstream = self.upstream(backend.url)
        start = time.perf_counter()
        try:
            response = await upstream.request(path, headers, body)
            return response, (time.perf_counter() - start) * 1000
        finally:
            self.slots.release(backend)


def _request_options(balancer: Balancer, request: Request) -> tuple[str, int | None]:
    """policy and number_backend_servers, from the query or a multipart form field."""
    query = request.query if request.query_string else {}
    values = {k: query[k] for k in _OPTIONS if k in query}
    if len(values) < 2:
        for name, value in form_fields(request.body, request.content_type, _OPTIONS).items():
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


def submit(balancer: Balancer, request: Request, reply: Reply) -> None:
    """POST /submit. The common case (a free backend, an idle connection to it) runs from protocol
    callbacks, with no task, future or extra turn of the event loop; this took bench/balancer.py's
    added p50 from 1.4-1.9 ms to 0.6-1.0 ms (README). Queueing, connecting and retrying go async.
    """
    exchange = _Exchange(balancer, request, reply)
    backend = balancer.take_now(exchange.policy, exchange.first_k)
    if backend is not None:
        exchange.sent = time.perf_counter()
        exchange.backend = backend
        if balancer.upstream(backend.url).start(exchange.path, exchange.headers, request.body, exchange.answered):
            return
    balancer.app.complete(request, exchange.run(backend), reply)


class _Exchange:
    """One forwarded request, from choosing a backend to the annotated answer."""

    __slots__ = ("backend", "balancer", "first_k", "headers", "path", "policy", "queued_ms", "reply", "request",
                 "sent", "start")  # fmt: skip

    def __init__(self, balancer: Balancer, request: Request, reply: Reply) -> None:
        self.start = time.perf_counter()
        self.balancer = balancer
        self.request = request
        self.reply = reply
        self.policy, self.first_k = _request_options(balancer, request)
        # Our own parameters stay here; anything else (e.g. top=) goes to the model server.
        path = b"/predict"
        if request.query_string:
            passthrough = [(k, v) for k, v in request.query.items() if k not in _OPTIONS]
            if passthrough:
                path += ("?" + urlencode(passthrough)).encode()
        self.path = path
        self.headers = [
            ("Content-Type", request.content_type or "application/octet-stream"),
            (log.REQUEST_ID_HEADER, request.id),
        ]
        self.queued_ms = 0.0
        self.backend: BackendState | None = None
        self.sent = 0.0

    def answered(self, response: UpstreamResponse | None, exc: Exception | None) -> None:
        """The fast path's upstream callback."""
        balancer, backend = self.balancer, self.backend
        assert backend is not None
        log.request_id.set(self.request.id)  # this runs in the upstream protocol's callback, not ours
        upstream_ms = (time.perf_counter() - self.sent) * 1000
        balancer.slots.release(backend)
        if exc is not None:
            balancer.app.complete(self.request, self.recover(backend, exc), self.reply)
            return
        try:
            out = self.finish(backend, response, upstream_ms)  # type: ignore[arg-type]
        except Exception as error:  # e.g. a 200 whose body is not JSON
            out = balancer.app.error(self.request, error)
        self.reply(out)

    async def run(self, backend: BackendState | None) -> Response:
        """The async path: wait for a slot, open a connection, or both."""
        balancer = self.balancer
        if backend is None:
            backend, self.queued_ms = await balancer.acquire(self.policy, self.first_k)
        try:
            response, upstream_ms = await balancer.forward(backend, self.request.body, self.headers, self.path)
        except (UpstreamFailure, ReadTimeout) as exc:
            return await self.recover(backend, exc)
        return self.finish(backend, response, upstream_ms)

    async def recover(self, backend: BackendState, exc: Exception) -> Response:
        """After no answer from `backend`: a timeout is final; a failed connection is retried once elsewhere."""
        balancer = self.balancer
        if not isinstance(exc, UpstreamFailure):
            raise _timed_out(balancer, backend)
        # Nothing came back, so the backend cannot have answered; classification is idempotent,
        # so one retry elsewhere is safe (HAProxy's retry-on conn-failure empty-response).
        _connection_failed(balancer, backend, exc.reason)
        balancer.retries.inc()
        failed = backend
        backend, waited = await balancer.acquire(self.policy, self.first_k, exclude=failed)
        self.queued_ms += waited
        balancer.logger.warning("retry", failed=failed.url, reason=exc.reason, to=backend.url)
        try:
            response, upstream_ms = await balancer.forward(backend, self.request.body, self.headers, self.path)
        except UpstreamFailure as exc2:
            _connection_failed(balancer, backend, exc2.reason)
            raise UpstreamError(f"Two model servers failed to answer ({exc2.reason}); retry shortly.") from None
        except ReadTimeout:
            raise _timed_out(balancer, backend) from None
        return self.finish(backend, response, upstream_ms)

    def finish(self, backend: BackendState, response: UpstreamResponse, upstream_ms: float) -> Response:
        balancer = self.balancer
        status = response.status
        balancer.count(backend.url, status)
        if status >= 500:
            balancer.pool.record_failure(backend, f"http_{status}", connection=False)
        else:
            balancer.pool.record_success(backend, upstream_ms)
        out_headers = [(k, v) for k, v in response.headers if k.lower() not in _HOP_BY_HOP]
        out_headers.append((b"X-Backend", backend.url.encode()))
        payload = response.body
        total = time.perf_counter() - self.start
        if status == 200:
            payload = _annotate(payload, backend.url, upstream_ms, self.queued_ms, total * 1000)
        balancer.latency.observe(total)
        return Response(payload, status, out_headers)


def _connection_failed(balancer: Balancer, backend: BackendState, reason: str) -> None:
    balancer.pool.record_failure(backend, reason, connection=True)
    balancer.count(backend.url, "error")


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
    balancer.app = app

    def bind(handler: Callable[[Balancer, Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        return functools.partial(handler, balancer)

    async def index(request: Request) -> Response:
        return Response(page, 200, [(b"Content-Type", b"text/html; charset=utf-8")])

    app.route("GET", "/", index)
    app.route_direct("POST", "/submit", functools.partial(submit, balancer))
    # /predict too, so that the model server's curl line works on the balancer
    app.route_direct("POST", "/predict", functools.partial(submit, balancer))
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
