"""The model server's app: POST /predict, readiness and metrics, built by a factory that loads the model."""

from __future__ import annotations

import functools
import logging
import os
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .. import log
from ..errors import BadParameter, ConfigError, NotReady
from ..web.app import App, Limits, Request, Response, json_response
from ..web.metrics import Buckets, Counts, healthz, metrics_handler
from ..web.server import bind_socket, run, serve, socket_url
from . import protocols
from .backends import Backend, BackendOptions, load_backend
from .batching import Batcher, Job, Result
from .images import decode
from .payload import read_image
from .settings import ServerSettings

MAX_TOP = 20
LATENCY_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1, 2, 5)


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
        self.requests = Counts(
            "imgclass_server_requests", "Requests by route and status", ["route", "status"], self.registry
        )
        self.latency = Buckets("imgclass_server_predict_seconds", "POST /predict latency", LATENCY_BUCKETS, self.registry)
        # per image, decode and its share of the batch's inference: what an autoscaler takes as 1 / mu
        self.service = Buckets("imgclass_server_service_seconds", "Service time per image, without queueing",
                               LATENCY_BUCKETS, self.registry)  # fmt: skip
        self.batch_sizes = Histogram(
            "imgclass_server_batch_size", "Images per inference batch",
            buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry,
        )  # fmt: skip
        self.client_gone = Counter(
            "imgclass_server_client_gone", "Requests whose client disconnected before the answer",
            registry=self.registry,
        )  # fmt: skip
        self.dropped = Counter(
            "imgclass_server_dropped_before_inference",
            "Queued images skipped because their client had gone", registry=self.registry,
        )  # fmt: skip
        self.batcher = Batcher(
            engines,
            functools.partial(decode, max_pixels=settings.max_pixels),
            max_batch=max_batch,
            batch_timeout_s=settings.batch_timeout_ms / 1000,
            max_queue=settings.max_queue or self.backend.queue_per_worker * self.threads,
            max_wait_s=settings.max_wait_ms / 1000 if self.backend.bounded_wait else 0.0,
            on_batch=self.batch_sizes.observe,
            on_skip=self.dropped.inc,
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
            "max_wait_ms": self.batcher.max_wait_s * 1000,
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
    server.service.observe((result.decode_ms + result.infer_ms / result.batch_size) / 1000)
    return json_response(server.response_body(result, total_ms), headers={"X-Served-By": server.name})


async def readyz(server: ModelServer, request: Request) -> Response:
    if not server.ready:
        raise NotReady("The model is not loaded yet, or the server is shutting down.", retry_after=1)
    return json_response({"status": "ready", **server.describe()})


async def info(server: ModelServer, request: Request) -> Response:
    return json_response(server.describe())


async def labels(server: ModelServer, request: Request) -> Response:
    """The classes the model knows, index i being the Keras/ImageNet class index in /predict."""
    return json_response({"model": server.backend.model_name, "labels": server.backend.labels})


def create_app(settings: ServerSettings, name: str | None = None) -> App:
    """Load and warm up the model, then return the app. Nothing is loaded at import time."""
    name = name or settings.name or f"{settings.host}:{settings.port}"
    logger = log.get_logger(name, "server", settings.log_level)
    server = ModelServer(settings, name)
    app = App(logger, Limits(max_upload=settings.max_upload_bytes))
    # A client that leaves while its image waits in the queue cancels it: no inference for nobody.
    app.route("POST", "/predict", functools.partial(predict, server), watch=0.0)
    app.route("GET", "/readyz", functools.partial(readyz, server))
    app.route("GET", "/", functools.partial(info, server))
    app.route("GET", "/labels", functools.partial(labels, server))
    app.route("GET", "/healthz", healthz)
    app.route("GET", "/metrics", metrics_handler(server.registry))
    protocols.add_routes(app, server)  # Open Inference Protocol v2 and TF Serving REST
    requests = server.requests
    verbose = logger.enabled(logging.INFO)
    known = set(app.routes)

    def on_done(request: Request, status: int, seconds: float) -> None:
        route = request.path if request.path in known else "other"
        requests.inc(route, status)
        if verbose and route == "/predict":
            logger.info("predict", status=status, ms=f"{seconds * 1000:.2f}")

    app.on_done = on_done
    app.on_client_gone = lambda request: server.client_gone.inc()

    async def start() -> None:
        await server.batcher.start()
        server.ready = True
        logger.info("ready", **server.describe())

    async def stop() -> None:
        server.ready = False
        await server.batcher.stop()

    app.on_startup.append(start)
    app.on_shutdown.append(stop)
    app.state = server
    return app


def main(settings: ServerSettings) -> None:
    """`imgclass serve`: bind, load the model, serve until SIGTERM."""
    sock = bind_socket(settings.host, settings.port)
    name = settings.name or socket_url(sock).removeprefix("http://")
    logger = log.get_logger(name, "server", settings.log_level)
    logger.info("loading", backend=settings.backend, model_dir=os.path.abspath(settings.model_dir))
    app = create_app(settings, name)
    run(serve(app, sock, settings.server_options))
