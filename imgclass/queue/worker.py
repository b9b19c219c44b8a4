"""`imgclass worker`: pull jobs from the Redis stream in batches, classify them, write each result once.

A worker is one consumer of the group. It blocks on XREADGROUP (no polling), then keeps reading
for up to --batch-timeout-ms until it has --max-batch jobs, since a blocking read returns as soon
as one entry exists. It runs the batch through the same decoder and backends as the model server,
and writes each outcome with the broker's finish step (once, with its notification, then the
acknowledgement). It keeps a heartbeat key alive; the jobs of a worker whose heartbeat lapsed are
claimed by a live one, so a SIGKILLed worker loses nothing. On SIGTERM it stops reading, finishes
its batch and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Gauge
from redis.exceptions import RedisError

from .. import log
from ..errors import ImgclassError
from ..serving.backends import Backend, BackendOptions, Engine, load_backend
from ..serving.batching import Job, Result, run_batch
from ..serving.images import decode
from ..web.app import App, Limits, Request, Response, json_response
from ..web.metrics import Buckets, Counts, healthz, metrics_handler
from ..web.server import bind_socket, run, serve, socket_url
from .broker import GROUP, Broker, Outcome, client
from .settings import WorkerSettings

BLOCK_MS = 1000  # how long one blocking read waits before the worker looks at its stop flag


@dataclass
class Delivery:
    """One stream entry, delivered to this worker."""

    entry: str
    job_id: str


class Worker:
    """One consumer of the job stream; `run()` until `stop()`."""

    def __init__(self, settings: WorkerSettings, name: str, url: str, logger: log.EventLogger) -> None:
        self.settings = settings
        self.name = name
        self.url = url  # where its /metrics are
        self.logger = logger
        self.backend: Backend = load_backend(
            settings.backend,
            BackendOptions(settings.model_dir, settings.weights, settings.service_time, settings.seed),
        )
        self.max_batch = min(settings.max_batch or self.backend.default_max_batch, self.backend.max_batch_allowed())
        self.engine: Engine = self.backend.engine(0)
        self.backend.warm_up(self.engine, self.max_batch)
        self.decode = functools.partial(decode, max_pixels=settings.max_pixels)
        self.broker = Broker(client(settings.redis or "", timeout=BLOCK_MS / 1000 + 5))
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="infer")
        self.stopping = False
        self.started = time.time()
        self.in_batch = 0
        self.processed = 0
        self.failed = 0
        self.next_reclaim = 0.0
        # Entries delivered to this consumer name and not yet acknowledged: a result whose write
        # failed while Redis was away, a batch fetched ahead and dropped, or the jobs of an earlier
        # process with the same name. Read again (XREADGROUP from an id, the stream's own way to
        # recover) at start and after every Redis error; the cursor keeps one pass from rereading
        # what it already took.
        self.recover_from: str | None = "0"
        self.service_s: float | None = None  # EWMA of seconds per job when busy, for people
        # the autoscaler's mu: differences of these two between heartbeats give a sliding mean
        self.busy_s = 0.0
        self.served = 0
        self.tasks: list[asyncio.Task[None]] = []
        self.registry = CollectorRegistry()
        self.jobs = Counts("imgclass_worker_jobs", "Jobs finished by this worker, by outcome", ["outcome"],
                           self.registry)  # fmt: skip
        self.batch_sizes = Buckets("imgclass_worker_batch_size", "Jobs per inference batch",
                                   (1, 2, 4, 8, 16, 32, 64), self.registry)  # fmt: skip
        self.infer_seconds = Buckets("imgclass_worker_infer_seconds", "Decode and inference time per batch",
                                     (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5), self.registry)  # fmt: skip
        self.claimed = Counts("imgclass_worker_claimed", "Jobs claimed from workers whose heartbeat lapsed", [],
                              self.registry)  # fmt: skip
        Gauge("imgclass_worker_in_batch", "Jobs in the batch being run", registry=self.registry).set_function(
            lambda: self.in_batch
        )

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name, "url": self.url, "backend": self.settings.backend, "model": self.backend.model_name,
            "max_batch": self.max_batch, "started": self.started, "processed": self.processed,
            "failed": self.failed, "in_batch": self.in_batch, "pid": os.getpid(), "host": socket.gethostname(),
            "service_s": self.service_s, "busy_s": round(self.busy_s, 6), "served": self.served,
        }  # fmt: skip

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        await self.broker.ensure_group()
        await self.broker.redis.set(self.broker.keys.labels, json.dumps(self.backend.labels))
        await self._beat()
        self.tasks = [
            asyncio.create_task(self._heartbeat(), name="heartbeat"),
            asyncio.create_task(self._consume(), name="consume"),
        ]
        self.logger.info("ready", **{k: v for k, v in self.describe().items() if k in ("backend", "max_batch")})

    async def stop(self) -> None:
        """Stop reading, finish the batch in hand, and leave no heartbeat behind."""
        self.stopping = True
        consume = next((t for t in self.tasks if t.get_name() == "consume"), None)
        if consume is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(consume), BLOCK_MS / 1000 + 60)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        with contextlib.suppress(RedisError):
            await self.broker.redis.delete(self.broker.keys.worker(self.name))
        await self.broker.redis.aclose()
        self.executor.shutdown(wait=True)

    async def _beat(self) -> None:
        ttl_ms = int(self.settings.heartbeat_ttl * 1000)
        await self.broker.redis.set(self.broker.keys.worker(self.name), json.dumps(self.describe()), px=ttl_ms)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_ttl / 3)
            try:
                await self._beat()
            except RedisError as exc:
                self.logger.warning("heartbeat_failed", message=str(exc))

    # --- consuming --------------------------------------------------------------------------

    async def _consume(self) -> None:
        """Fetch a batch, run it; while it runs, fetch the next, so the engine never waits on Redis."""
        ahead: asyncio.Task[Batch] | None = None
        while not self.stopping or ahead is not None:
            try:
                batch = await ahead if ahead is not None else await self._fetch()
                ahead = None
                if not batch.jobs:
                    await self._write(batch, [])
                    continue
                self.in_batch = len(batch.jobs)
                running = asyncio.ensure_future(self._infer(batch))
                if not self.stopping:
                    ahead = asyncio.create_task(self._fetch())
                results = await running
                self.in_batch = 0
                await self._write(batch, results)
            except RedisError as exc:
                # Redis restarting or unreachable: try again shortly; pending entries stay pending,
                # and this worker (or another) takes them up again.
                self.logger.warning("redis_unavailable", message=str(exc))
                if ahead is not None:
                    ahead.cancel()
                    await asyncio.gather(ahead, return_exceptions=True)
                ahead = None
                self.in_batch = 0
                self.recover_from = "0"
                await asyncio.sleep(0.5)

    async def _fetch(self) -> Batch:
        """The next batch: entries of dead workers first, else new ones; started in one round trip."""
        deliveries = await self._recover() or await self._reclaim() or await self._read()
        batch = Batch()
        if not deliveries:
            return batch
        started = await self.broker.start([d.job_id for d in deliveries], self.name)
        for delivery, begun in zip(deliveries, started, strict=True):
            if begun is None:  # another worker finished it: nothing to redo, nothing to write
                batch.discard.append(delivery)
                continue
            fields, image = begun
            if int(fields.get("deliveries", "1")) > self.settings.max_deliveries:
                batch.failed.append(_error(delivery, "poison_job", f"Delivered {fields['deliveries']} times without "
                                           "a result; the job is dead-lettered.", 500, dead_letter=True))  # fmt: skip
            elif image is None:
                batch.failed.append(_error(delivery, "image_missing", "The job's image expired before a worker "
                                           "took it.", 410))  # fmt: skip
            else:
                batch.jobs.append((delivery, fields, Job(image, int(fields.get("top", "5")))))
        return batch

    async def _infer(self, batch: Batch) -> list[Result | Exception]:
        started = time.perf_counter()
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self.executor, run_batch, self.engine, self.decode, [job for _, _, job in batch.jobs]
            )
        except Exception as exc:  # an engine failure fails the batch; the jobs are not lost
            self.logger.error("batch_failed", type=type(exc).__name__, message=str(exc))
            results = [exc] * len(batch.jobs)
        elapsed = time.perf_counter() - started
        self.infer_seconds.observe(elapsed)
        self.batch_sizes.observe(len(batch.jobs))
        self.busy_s += elapsed
        self.served += len(batch.jobs)
        per_job = elapsed / max(1, len(batch.jobs))
        self.service_s = per_job if self.service_s is None else 0.8 * self.service_s + 0.2 * per_job
        return results  # type: ignore[return-value]

    async def _write(self, batch: Batch, results: list[Result | Exception]) -> None:
        """Every outcome of the batch, once, in one round trip; then the entries to skip."""
        outcomes = list(batch.failed)
        for (delivery, fields, _), result in zip(batch.jobs, results, strict=True):
            if isinstance(result, Result):
                outcomes.append(Outcome(delivery.entry, delivery.job_id, result=self._result(fields, result)))
            elif isinstance(result, ImgclassError):
                outcomes.append(_error(delivery, result.code, result.message, result.status))
            else:
                outcomes.append(_error(delivery, "internal_error", "An unexpected error occurred; it has been logged.",
                                       500))  # fmt: skip
        if outcomes:
            wrote = await self.broker.finish(outcomes, self.name, self.settings.result_ttl)
            for outcome, written in zip(outcomes, wrote, strict=True):
                log.request_id.set(outcome.job_id)
                kind = ("done" if outcome.error is None else "failed") if written else "already_done"
                self.jobs.inc(kind)
                if outcome.error is None:
                    self.processed += written
                else:
                    self.failed += written
                    self.logger.warning("failed", job=outcome.job_id, code=outcome.error["error"])
                if self.logger.enabled(logging.INFO) or not written:
                    self.logger.info(kind, job=outcome.job_id, batch=len(batch.jobs))
        for delivery in batch.discard:
            await self.broker.discard(delivery.entry)

    async def _read(self) -> list[Delivery]:
        """Up to max_batch entries: block for the first, then keep reading for the batch window."""
        redis_client, stream = self.broker.redis, self.broker.keys.jobs
        got = _deliveries(await redis_client.xreadgroup(GROUP, self.name, {stream: ">"}, count=self.max_batch,
                                                        block=BLOCK_MS))  # fmt: skip
        if not got or len(got) >= self.max_batch or self.settings.batch_timeout_ms <= 0:
            return got
        deadline = time.monotonic() + self.settings.batch_timeout_ms / 1000
        while len(got) < self.max_batch and (left := deadline - time.monotonic()) > 0:
            more = _deliveries(
                await redis_client.xreadgroup(
                    GROUP, self.name, {stream: ">"}, count=self.max_batch - len(got), block=max(1, int(left * 1000))
                )
            )
            if not more:
                break
            got += more
        return got

    async def _recover(self) -> list[Delivery]:
        """This consumer's own pending entries, after the cursor; [] (and recovery ends) when none are left."""
        if self.recover_from is None:
            return []
        response = await self.broker.redis.xreadgroup(GROUP, self.name, {self.broker.keys.jobs: self.recover_from},
                                                      count=self.max_batch)  # fmt: skip
        entries = [entry for _, stream_entries in response or [] for entry, _ in stream_entries]
        if not entries:
            self.recover_from = None
            return []
        self.recover_from = _text(entries[-1])
        deliveries = _deliveries(response)
        if deliveries:
            self.logger.warning("recovered", count=len(deliveries))
        return deliveries

    async def _reclaim(self) -> list[Delivery]:
        """The pending entries of workers whose heartbeat has lapsed (a slow but live worker keeps its own)."""
        now = time.monotonic()
        if now < self.next_reclaim:
            return []
        self.next_reclaim = now + min(1.0, self.settings.heartbeat_ttl / 2)
        redis_client, keys = self.broker.redis, self.broker.keys
        pending = await redis_client.xpending_range(keys.jobs, GROUP, min="-", max="+", count=self.max_batch * 8)
        owners = {_text(p["consumer"]) for p in pending} - {self.name}
        dead = {o for o in owners if not await redis_client.exists(keys.worker(o))}
        ids = [p["message_id"] for p in pending if _text(p["consumer"]) in dead][: self.max_batch]
        if not ids:
            return []
        # min_idle_time: of two live workers claiming the same entry, only the first gets it
        claimed = await redis_client.xclaim(keys.jobs, GROUP, self.name, min_idle_time=500, message_ids=ids)
        deliveries = _deliveries([(keys.jobs, claimed)])
        if deliveries:
            self.claimed.inc()
            await self.broker.count("claimed", len(deliveries))
            self.logger.warning("claimed", count=len(deliveries), from_workers=",".join(sorted(dead)))
        return deliveries

    def _result(self, fields: dict[str, str], result: Result) -> dict[str, Any]:
        now = time.time()
        created = float(fields.get("created", now))
        started = float(fields.get("started", now))
        labels = self.backend.labels
        timing = {
            "queued": round((started - created) * 1000, 3),
            "decode": round(result.decode_ms, 3),
            "infer": round(result.infer_ms, 3),
            "total": round((now - created) * 1000, 3),
        }
        if result.service_ms is not None:
            timing["service"] = round(result.service_ms, 3)  # the sleep backend's drawn service time
        return {
            "predictions": [{"index": i, "label": labels[i], "score": round(p, 6)} for i, p in result.classes],
            "model": self.backend.model_name,
            "server": self.name,
            "worker": self.name,
            "backend": self.url,
            "timing_ms": timing,
            "batch_size": result.batch_size,
        }


@dataclass
class Batch:
    """What one fetch gave: jobs to run, outcomes already known, and entries to skip."""

    jobs: list[tuple[Delivery, dict[str, str], Job]] = field(default_factory=list)
    failed: list[Outcome] = field(default_factory=list)
    discard: list[Delivery] = field(default_factory=list)


def _error(delivery: Delivery, code: str, message: str, status: int, *, dead_letter: bool = False) -> Outcome:
    return Outcome(delivery.entry, delivery.job_id, error={"error": code, "message": message, "status": status},
                   dead_letter=dead_letter)  # fmt: skip


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _deliveries(response: Any) -> list[Delivery]:
    """[(stream, [(entry id, {b'id': job id}), ...])] as XREADGROUP and XCLAIM give them."""
    out = []
    for _, entries in response or []:
        for entry, fields in entries:
            if fields and b"id" in fields:
                out.append(Delivery(_text(entry), _text(fields[b"id"])))
    return out


def create_app(settings: WorkerSettings, name: str, url: str) -> App:
    """The worker's own small app: /metrics, /healthz and / (what it is doing); the worker runs with it."""
    logger = log.get_logger(name, "worker", settings.log_level)
    worker = Worker(settings, name, url, logger)
    app = App(logger, Limits(max_upload=1))
    app.state = worker

    async def info(request: Request) -> Response:
        return json_response(worker.describe())

    app.route("GET", "/", info)
    app.route("GET", "/healthz", healthz)
    app.route("GET", "/metrics", metrics_handler(worker.registry))
    app.on_startup.append(worker.start)
    app.on_shutdown.append(worker.stop)
    return app


def main(settings: WorkerSettings) -> None:
    """`imgclass worker`: load the model, consume until SIGTERM, then drain."""
    sock = bind_socket(settings.host, settings.port)
    url = socket_url(sock)
    name = settings.name or f"{socket.gethostname()}-{os.getpid()}"
    app = create_app(settings, name, url)
    run(serve(app, sock, settings.server_options))
