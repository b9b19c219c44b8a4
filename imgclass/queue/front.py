"""The front in queue mode: the balancer's page and routes, with jobs on Redis instead of chosen servers.

POST /submit keeps its synchronous contract (enqueue, then wait by notification); POST /jobs and
GET /jobs/{id} are the async job API; POST /inference/image and GET /predictions/{uuid} are the
original async API's two routes. /backends lists the live workers, from their heartbeats.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import logging
import time
import uuid
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

from .. import log
from ..balancing.app import load_page
from ..balancing.settings import BalancerSettings
from ..errors import (
    BadBase64,
    BadJSON,
    BadParameter,
    Conflict,
    ImgclassError,
    MissingField,
    NotFound,
    QueueFull,
    UpstreamTimeout,
)
from ..serving.app import parse_top
from ..serving.payload import read_image
from ..web.app import App, Limits, Request, Response, json_response
from ..web.metrics import Buckets, Counts, healthz
from ..web.server import bind_socket, run, serve, socket_url
from .broker import Broker, BrokerUnavailable, client
from .notify import FINAL, Notifier

MAX_WAIT_S = 60.0
IMAGE_TTL_FOREVER = 30 * 86_400  # an image waits at most this long when results are kept forever


class UnknownJob(NotFound):
    code = "unknown_job"


class JobTimeout(UpstreamTimeout):
    """/submit waited --timeout; the job is still queued or running, and can be fetched later."""


class Front:
    """The broker, the notifier and the metrics of one front process."""

    def __init__(self, settings: BalancerSettings, name: str, logger: log.EventLogger) -> None:
        self.settings = settings
        self.name = name
        self.logger = logger
        # Commands fail within a second when Redis is down; the done stream's reader blocks longer.
        self.broker = Broker(client(settings.redis or "", timeout=1.0))
        self.notifier = Notifier(Broker(client(settings.redis or "", timeout=5.0), self.broker.keys), logger)
        self.registry = CollectorRegistry()
        self.requests = Counts("imgclass_front_requests", "Requests by route and status", ["route", "status"],
                               self.registry)  # fmt: skip
        self.latency = Buckets("imgclass_front_submit_seconds", "POST /submit latency as the client sees it",
                               (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30), self.registry)  # fmt: skip
        self.queued = Buckets("imgclass_queue_wait_seconds", "Time jobs waited in the queue before a worker took them",
                              (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30), self.registry)  # fmt: skip
        self.refused = Counts("imgclass_queue_refused", "Jobs refused: queue full or Redis unreachable", ["reason"],
                              self.registry)  # fmt: skip
        self.snapshot: dict[str, int] = {}
        self.registry.register(_QueueCollector(self))

    @property
    def image_ttl(self) -> int:
        return self.settings.result_ttl or IMAGE_TTL_FOREVER

    async def start(self) -> None:
        try:
            await self.broker.ensure_group()
        except RedisError as exc:  # Redis may come up later: the front starts, and answers 503 until then
            self.logger.warning("redis_unavailable", message=str(exc))
        await self.notifier.start()

    async def stop(self) -> None:
        await self.notifier.stop()
        await self.notifier.broker.redis.aclose()
        await self.broker.redis.aclose()

    async def enqueue(self, request: Request, image: bytes, top: int) -> str:
        """Queue one job. Its id is the client's X-Request-ID when it gave a fresh one, else a new
        UUID; either way it becomes the request id, so the logs of the front and of the worker that
        runs it carry it."""
        supplied = "x-request-id" in request.headers and request.id == request.headers["x-request-id"]
        job_id = request.id if supplied else str(uuid.uuid4())
        try:
            for _ in range(2):
                # the job id is the request id everywhere from here on: the worker logs it as such
                outcome = await self.broker.enqueue(job_id, image, top, self.settings.queue_size, self.image_ttl,
                                                    job_id)  # fmt: skip
                if outcome != -1:
                    break
                if supplied:
                    raise Conflict(f"A job with id {job_id!r} exists already; fetch it at /jobs/{job_id}.")
                job_id = str(uuid.uuid4())
        except RedisError as exc:
            self.refused.inc("redis")
            raise BrokerUnavailable("The job queue cannot be reached; retry shortly.", retry_after=1) from exc
        if outcome == 0:
            self.refused.inc("full")
            raise QueueFull(f"{self.settings.queue_size} jobs are waiting; retry shortly.", retry_after=1)
        request.id = job_id
        log.request_id.set(job_id)
        return job_id

    async def fields(self, job_id: str) -> dict[str, str] | None:
        try:
            return await self.broker.job(job_id)
        except RedisError as exc:
            raise BrokerUnavailable("The job queue cannot be reached; retry shortly.", retry_after=1) from exc

    async def wait(self, job_id: str, timeout: float, known: dict[str, str] | None = None) -> dict[str, str] | None:
        try:
            fields = await self.notifier.wait(job_id, timeout, known)
        except RedisError as exc:
            raise BrokerUnavailable("The job queue cannot be reached; retry shortly.", retry_after=1) from exc
        return fields


class _QueueCollector(Collector):
    """Queue depth and the cluster-wide counters, as last read from Redis (at each scrape of /metrics)."""

    def __init__(self, front: Front) -> None:
        self.front = front

    def collect(self) -> list[Metric]:
        s, n = self.front.snapshot, self.front.notifier
        return [
            GaugeMetricFamily("imgclass_queue_length", "Jobs in the stream: waiting or in work", value=s.get("length", 0)),
            GaugeMetricFamily("imgclass_queue_lag", "Jobs no worker has read yet (the group's lag)", value=s.get("lag", 0)),
            GaugeMetricFamily("imgclass_queue_pending", "Jobs read by a worker and not yet acknowledged",
                              value=s.get("pending", 0)),
            GaugeMetricFamily("imgclass_queue_workers", "Live workers (heartbeats)", value=s.get("workers", 0)),
            CounterMetricFamily("imgclass_queue_claimed", "Jobs claimed from workers whose heartbeat lapsed",
                                value=s.get("claimed", 0)),
            CounterMetricFamily("imgclass_queue_dead_lettered", "Jobs failed after too many deliveries",
                                value=s.get("dead_lettered", 0)),
            CounterMetricFamily("imgclass_queue_notification_fallbacks",
                                "Outcomes found by looking, with no notification", value=n.fallbacks),
        ]  # fmt: skip


def _iso(seconds: str | None) -> str | None:
    if not seconds:
        return None
    return datetime.datetime.fromtimestamp(float(seconds), datetime.timezone.utc).isoformat(timespec="milliseconds")


def job_document(fields: dict[str, str]) -> dict[str, Any]:
    """GET /jobs/{id}: status, outcome, worker and timestamps."""
    doc: dict[str, Any] = {
        "id": fields.get("id"),
        "status": fields.get("status"),
        "worker": fields.get("worker"),
        "created": _iso(fields.get("created")),
        "started": _iso(fields.get("started")),
        "finished": _iso(fields.get("finished")),
    }
    if "result" in fields:
        result = json.loads(fields["result"])
        doc["predictions"] = result["predictions"]
        doc["timing_ms"] = result.get("timing_ms")
    if "error" in fields:
        doc["error"] = json.loads(fields["error"])
    return doc


def outcome(fields: dict[str, str]) -> dict[str, Any]:
    """The answer /submit gives for a finished job: the worker's result, or its error as an exception."""
    if fields.get("status") == "failed":
        error = json.loads(fields["error"])
        exc = ImgclassError(error.get("message", "The job failed."))
        exc.status, exc.code = int(error.get("status", 500)), error.get("error", "job_failed")
        raise exc
    return json.loads(fields["result"])


async def submit(front: Front, request: Request) -> Response:
    """POST /submit: the same answer as push mode, through the queue; 504 if it takes over --timeout."""
    start = time.perf_counter()
    top = parse_top(request)
    image = read_image(request.body, request.content_type, front.settings.max_upload_bytes)
    enqueued = time.time()
    job_id = await front.enqueue(request, image, top)
    headers = {"X-Job-ID": job_id}
    fields = await front.wait(job_id, front.settings.timeout, {"id": job_id, "status": "queued",
                                                              "created": repr(enqueued)})  # fmt: skip
    if fields is None or fields.get("status") not in FINAL:
        raise JobTimeout(f"No worker answered within {front.settings.timeout:g} s; the job goes on: "
                         f"fetch it at /jobs/{job_id}.")  # fmt: skip
    doc = outcome(fields)
    timing = doc.setdefault("timing_ms", {})
    front.queued.observe(timing.get("queued", 0.0) / 1000)
    timing["front"] = round((time.perf_counter() - start) * 1000, 3)
    front.latency.observe(time.perf_counter() - start)
    return json_response(doc, headers={**headers, "X-Backend": str(doc.get("backend", ""))})


async def create_job(front: Front, request: Request) -> Response:
    """POST /jobs: 202 with the job's id and where to fetch it."""
    top = parse_top(request)
    image = read_image(request.body, request.content_type, front.settings.max_upload_bytes)
    job_id = await front.enqueue(request, image, top)
    url = f"/jobs/{job_id}"
    return json_response({"id": job_id, "status": "queued", "url": url}, 202,
                         {"Location": url, "X-Job-ID": job_id})  # fmt: skip


async def get_job(front: Front, request: Request) -> Response:
    """GET /jobs/{id}[?wait=S]: the job now, or once it has an outcome (up to S seconds, by notification)."""
    job_id = request.params["id"]
    raw = request.query.get("wait", "0")
    try:
        wait = float(raw)
    except ValueError:
        wait = -1.0
    if not 0 <= wait <= MAX_WAIT_S:
        raise BadParameter(f"wait must be a number of seconds from 0 to {MAX_WAIT_S:g}, not {raw!r}.")
    fields = await (front.wait(job_id, wait) if wait > 0 else front.fields(job_id))
    if fields is None:
        raise UnknownJob(f"No job {job_id!r}: it never existed, or its result expired.")
    return json_response(job_document(fields))


async def inference_image(front: Front, request: Request) -> Response:
    """POST /inference/image {"name": ..., "data": "<base64>"} (the original async API): {"uuid": ...}."""
    try:
        doc = json.loads(request.body)
    except (ValueError, UnicodeDecodeError):
        raise BadJSON('Send JSON {"name": "photo.jpg", "data": "<base64>"}.') from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), str):
        raise MissingField('The JSON body needs "data": the image as base64 (and optionally "name").')
    try:
        image = base64.b64decode(doc["data"], validate=True)
    except (binascii.Error, ValueError):
        raise BadBase64('"data" is not valid base64.') from None
    job_id = await front.enqueue(request, image, 5)
    return json_response({"uuid": job_id, "name": doc.get("name")}, 200, {"X-Job-ID": job_id})


async def get_prediction(front: Front, request: Request) -> Response:
    """GET /predictions/{uuid} (the original async API): the top-1 label and all predictions, or 404."""
    job_id = request.params["uuid"]
    fields = await front.fields(job_id)
    if fields is None or fields.get("status") != "done":
        state = "unknown or expired" if fields is None else fields.get("status")
        raise UnknownJob(f"No prediction for {job_id!r} yet ({state}); try again later.")
    result = json.loads(fields["result"])
    return json_response({"prediction": result["predictions"][0]["label"], "predictions": result["predictions"]})


async def backends(front: Front, request: Request) -> Response:
    """The live workers, in the shape of the push balancer's /backends, for the page's panel."""
    try:
        workers = await front.broker.workers()
    except RedisError as exc:
        raise BrokerUnavailable("The job queue cannot be reached; retry shortly.", retry_after=1) from exc
    return json_response([
        {"url": w.get("url"), "name": w.get("name"), "healthy": True, "available": True,
         "in_flight": w.get("in_batch", 0), "served": w.get("processed", 0), "failures": w.get("failed", 0),
         "ejected_until": None, "latency_p50_ms": None, "backend": w.get("backend")}
        for w in workers
    ])  # fmt: skip


async def labels(front: Front, request: Request) -> Response:
    try:
        raw = await front.broker.redis.get(front.broker.keys.labels)
    except RedisError as exc:
        raise BrokerUnavailable("The job queue cannot be reached; retry shortly.", retry_after=1) from exc
    if raw is None:
        raise BrokerUnavailable("No worker has started yet, so the labels are not known; retry shortly.", retry_after=1)
    return json_response({"labels": json.loads(raw)})


async def readyz(front: Front, request: Request) -> Response:
    try:
        await front.broker.redis.ping()
    except RedisError as exc:
        raise BrokerUnavailable("The job queue cannot be reached.", retry_after=1) from exc
    return json_response({"status": "ready", "dispatch": "queue"})


async def metrics(front: Front, request: Request) -> Response:
    try:
        snapshot = await front.broker.depth()
        snapshot |= await front.broker.stats()
        snapshot["workers"] = len(await front.broker.workers())
        front.snapshot = snapshot
    except RedisError:
        pass  # the last snapshot stands; /readyz says Redis is down
    return Response(generate_latest(front.registry), 200, [(b"content-type", b"text/plain; version=0.0.4")])


def create_app(settings: BalancerSettings, name: str | None = None) -> App:
    """The front as an app: the page and the push balancer's routes, on the job queue."""
    name = name or settings.name or f"{settings.host}:{settings.port}"
    logger = log.get_logger(name, "front", settings.log_level)
    front = Front(settings, name, logger)
    page = load_page()
    verbose = logger.enabled(logging.INFO)
    app = App(logger, Limits(max_upload=settings.max_upload_bytes))
    app.state = front

    def on_done(request: Request, status: int, seconds: float) -> None:
        route = request.path if request.path in app.routes else "other"
        front.requests.inc(route if not route.startswith("/jobs/") else "/jobs/{id}", status)
        if verbose and request.path in ("/submit", "/predict", "/jobs"):
            logger.info("submit", status=status, ms=round(seconds * 1000, 2))

    app.on_done = on_done

    def bind(handler: Any) -> Any:
        async def bound(request: Request) -> Response:
            return await handler(front, request)

        return bound

    async def index(request: Request) -> Response:
        return Response(page, 200, [(b"content-type", b"text/html; charset=utf-8")])

    async def no_icon(request: Request) -> Response:
        return Response(b"", 204)

    app.route("GET", "/", index)
    app.route("GET", "/favicon.ico", no_icon)
    # A client that leaves /submit leaves its job in the queue: it completes and can be fetched.
    app.route("POST", "/submit", bind(submit))
    app.route("POST", "/predict", bind(submit))
    app.route("POST", "/jobs", bind(create_job))
    app.route("GET", "/jobs/{id}", bind(get_job))
    app.route("POST", "/inference/image", bind(inference_image))
    app.route("GET", "/predictions/{uuid}", bind(get_prediction))
    app.route("GET", "/backends", bind(backends))
    app.route("GET", "/labels", bind(labels))
    app.route("GET", "/healthz", healthz)
    app.route("GET", "/readyz", bind(readyz))
    app.route("GET", "/metrics", bind(metrics))
    app.on_startup.append(front.start)
    app.on_shutdown.append(front.stop)
    return app


def main(settings: BalancerSettings) -> None:
    """`imgclass balance --dispatch queue`: the front, until SIGTERM."""
    sock = bind_socket(settings.host, settings.port)
    name = settings.name or socket_url(sock).removeprefix("http://")
    app = create_app(settings, name)
    run(serve(app, sock, settings.server_options))
