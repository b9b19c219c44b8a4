"""The model server: an app factory for POST /predict, health, readiness and metrics, on the llhttp front end."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from . import config, log
from .backends import Backend, BackendOptions, load_backend
from .batching import Batcher, Job, Result
from .errors import BadParameter, ConfigError, NotReady
from .frontend import App, CountByLabels, Request, Response, healthz, json_response, metrics_handler
from .frontend import serve as serve_app
from .httpapp import bind_socket, run_async, socket_url
from .images import decode
from .payload import read_image

SERVER_OPTIONS = [
    "host", "port", "name", "log_level", "backend", "model_dir", "weights", "threads", "max_batch",
    "batch_timeout_ms", "max_queue", "max_upload_mb", "max_pixels", "service_time", "seed",
]  # fmt: skip

MAX_TOP = 20
LATENCY_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1, 2, 5)


@dataclass(frozen=True)
class ServerSettings:
    """Resolved model-server options; defaults live only in config.OPTIONS."""

    host: str
    port: int
    name: str | None
    log_level: str
    backend: str
    model_dir: str
    weights: str
    threads: int
    max_batch: int
    batch_timeout_ms: float
    max_queue: int
    max_upload_mb: float
    max_pixels: int
    service_time: str
    seed: int | None

    @classmethod
    def make(cls, **overrides: object) -> ServerSettings:
        """Settings from the option table's defaults, with `overrides` (for tests and `imgclass up`)."""
        values = {name: config.OPTIONS[name].default for name in SERVER_OPTIONS}
        return cls(**{**values, **overrides})  # type: ignore[arg-type]

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> ServerSettings:
        return cls(**{name: getattr(ns, name) for name in SERVER_OPTIONS})

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1_000_000)


class ModelServer:
    """Holds the loaded backend, its batcher and its metrics for one app."""

    def __init__(self, settings: ServerSettings, name: str) -> None:
        self.settings = settings
        self.name = name
        self.backend: Backend = load_backend(
            settings.backend,
            BackendOptions(settings.model_dir, settings.weights, settings.service_time, settings.seed),
        )
        self.threads = settings.threads or self.backend.default_threads()
        max_batch = settings.max_batch or self.backend.default_max_batch
        if max_batch > self.backend.max_batch_allowed():
            raise ConfigError(
                f"--max-batch {max_batch} is more than the {settings.backend} backend accepts "
                f"({self.backend.max_batch_allowed()}); lower it."
            )
        engines = [self.backend.engine(i) for i in range(self.threads)]
        for engine in engines:
            self.backend.warm_up(engine, max_batch)
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "imgclass_server_requests", "Requests by route and status", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "imgclass_server_predict_seconds", "POST /predict latency", buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.batch_sizes = Histogram(
            "imgclass_server_batch_size", "Images per inference batch",
            buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry,
        )  # fmt: skip
        self.batcher = Batcher(
            engines,
            functools.partial(decode, max_pixels=settings.max_pixels),
            max_batch=max_batch,
            batch_timeout_s=settings.batch_timeout_ms / 1000,
            max_queue=settings.max_queue,
            on_batch=self.batch_sizes.observe,
        )
        Gauge("imgclass_server_queue_depth", "Requests waiting for a worker", registry=self.registry).set_function(
            lambda: self.batcher.depth
        )
        Gauge("imgclass_server_busy_workers", "Worker threads running a batch", registry=self.registry).set_function(
            lambda: self.batcher.busy
        )
        self.ready = False

    def describe(self) -> dict[str, object]:
        return {
            "server": self.name,
            "backend": self.settings.backend,
            "model": self.backend.model_name,
            "threads": self.threads,
            "max_batch": self.batcher.max_batch,
            "max_queue": self.batcher.max_queue,
        }

    def response_body(self, result: Result, total_ms: float) -> dict[str, object]:
        labels = self.backend.labels
        timing = {
            "decode": round(result.decode_ms, 3),
            "queue": round(result.queue_ms, 3),
            "infer": round(result.infer_ms, 3),
            "total": round(total_ms, 3),
        }
        if result.service_ms is not None:
            timing["service"] = round(result.service_ms, 3)  # the sleep backend's drawn service time
        return {
            "predictions": [{"index": i, "label": labels[i], "score": round(p, 6)} for i, p in result.classes],
            "model": self.backend.model_name,
            "server": self.name,
            "timing_ms": timing,
            "batch_size": result.batch_size,
        }


def parse_top(request: Request) -> int:
    raw = request.query.get("top", "5")
    try:
        top = int(raw)
    except ValueError:
        top = 0
    if not 1 <= top <= MAX_TOP:
        raise BadParameter(f"top must be a whole number from 1 to {MAX_TOP}, not {raw!r}.")
    return top


async def predict(server: ModelServer, request: Request) -> Response:
    start = time.perf_counter()
    if not server.ready:
        raise NotReady("The server is starting or shutting down; retry shortly.", retry_after=1)
    top = parse_top(request)
    data = read_image(request.body, request.content_type, server.settings.max_upload_bytes)
    result = await server.batcher.submit(Job(data, top))
    total_ms = (time.perf_counter() - start) * 1000
    server.latency.observe(total_ms / 1000)
    return json_response(server.response_body(result, total_ms), headers={"X-Served-By": server.name})


async def readyz(server: ModelServer, request: Request) -> Response:
    if not server.ready:
        raise NotReady("The model is not loaded yet, or the server is shutting down.", retry_after=1)
    return json_response({"status": "ready", **server.describe()})


async def info(server: ModelServer, request: Request) -> Response:
    return json_response(server.describe())


ROUTES = [
    ("POST", "/predict", predict),
    ("GET", "/readyz", readyz),
    ("GET", "/", info),
]


def create_app(settings: ServerSettings, name: str | None = None) -> App:
    """Load and warm up the model, then return the app. Nothing is loaded at import time."""
    name = name or settings.name or f"{settings.host}:{settings.port}"
    logger = log.get_logger(name, "server", settings.log_level)
    server = ModelServer(settings, name)
    app = App(logger, settings.max_upload_bytes)
    for method, path, handler in ROUTES:
        app.route(method, path, functools.partial(handler, server))
    app.route("GET", "/healthz", healthz)
    app.route("GET", "/metrics", metrics_handler(server.registry))
    requests = CountByLabels(server.requests)
    verbose = logger.enabled(logging.INFO)

    def on_done(request: Request, status: int, seconds: float) -> None:
        route = request.path if request.path in app.routes else "other"
        requests.inc(route, status)
        if verbose and route == "/predict":
            logger.info("predict", status=status, ms=f"{seconds * 1000:.2f}")

    app.on_done = on_done

    async def start() -> None:
        await server.batcher.start()
        server.ready = True
        logger.info("ready", **server.describe())

    async def stop() -> None:
        server.ready = False
        await server.batcher.stop()

    app.on_startup.append(start)
    app.on_shutdown.append(stop)
    return app


def serve(settings: ServerSettings) -> None:
    sock = bind_socket(settings.host, settings.port)
    name = settings.name or socket_url(sock).removeprefix("http://")
    logger = log.get_logger(name, "server", settings.log_level)
    logger.info("loading", backend=settings.backend, model_dir=os.path.abspath(settings.model_dir))
    app = create_app(settings, name)
    run_async(serve_app(app, sock, logger))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_options(parser, SERVER_OPTIONS)
