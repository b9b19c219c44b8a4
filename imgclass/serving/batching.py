"""Dynamic batching: a bounded queue drained by worker threads, as TF Serving and Triton batch."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ImgclassError, Overloaded
from .backends import Engine


@dataclass
class Job:
    """One image waiting for a worker."""

    data: bytes
    top: int
    enqueued: float = field(default_factory=time.perf_counter)
    future: asyncio.Future[Any] | None = None


@dataclass(frozen=True)
class Result:
    classes: list[tuple[int, float]]  # (Keras index, probability), best first
    decode_ms: float
    queue_ms: float
    infer_ms: float
    batch_size: int
    service_ms: float | None = None  # an emulated service time, when the engine draws one (sleep backend)


Decoder = Callable[[bytes], np.ndarray]


def top_k(probs: np.ndarray, k: int) -> list[tuple[int, float]]:
    k = min(k, len(probs))
    idx = np.argpartition(-probs, k - 1)[:k]
    idx = idx[np.argsort(-probs[idx], kind="stable")]
    return [(int(i), float(probs[i])) for i in idx]


def run_batch(engine: Engine, decode: Decoder, jobs: list[Job]) -> list[Result | ImgclassError]:
    """Decode and classify `jobs` in the calling (worker) thread.

    queue_ms runs until this thread starts on the jobs, so the hand-off from the event loop counts
    as waiting, and queue + decode + infer is the whole time a job spent in the server's station.
    """
    picked = time.perf_counter()
    out: list[Result | ImgclassError | None] = [None] * len(jobs)
    arrays: list[np.ndarray] = []
    slots: list[int] = []
    decode_ms: dict[int, float] = {}
    for i, job in enumerate(jobs):
        t0 = time.perf_counter()
        try:
            arrays.append(decode(job.data))
            slots.append(i)
        except ImgclassError as exc:
            out[i] = exc
        decode_ms[i] = (time.perf_counter() - t0) * 1000
    if arrays:
        t0 = time.perf_counter()
        probs = engine(np.stack(arrays), min(job.enqueued for job in jobs))
        infer_ms = (time.perf_counter() - t0) * 1000
        for row, i in enumerate(slots):
            job = jobs[i]
            out[i] = Result(
                classes=top_k(probs[row], job.top),
                decode_ms=decode_ms[i],
                queue_ms=(picked - job.enqueued) * 1000,
                infer_ms=infer_ms,
                batch_size=len(arrays),
                service_ms=getattr(engine, "service_ms", None),
            )
    return out  # type: ignore[return-value]


class Batcher:
    """Admits at most `max_queue` waiting jobs; each worker thread takes up to `max_batch` at once."""

    def __init__(
        self,
        engines: list[Engine],
        decode: Decoder,
        *,
        max_batch: int,
        batch_timeout_s: float,
        max_queue: int,
        max_wait_s: float = 0.0,
        on_batch: Callable[[int], None] | None = None,
        on_skip: Callable[[], None] | None = None,
    ) -> None:
        self._engines = engines
        self._decode = decode
        self.max_batch = max_batch
        self.batch_timeout_s = batch_timeout_s
        self.max_queue = max_queue
        self.max_wait_s = max_wait_s  # 0: only max_queue bounds the queue
        self._on_batch = on_batch
        self._on_skip = on_skip
        self._queue: asyncio.Queue[Job] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._executors: list[ThreadPoolExecutor] = []
        self.busy = 0
        # EWMA of per-job service time, for an honest Retry-After
        self._service_s = 0.005

    @property
    def depth(self) -> int:
        return self._queue.qsize() if self._queue else 0

    async def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        for i, engine in enumerate(self._engines):
            executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer{i}")
            self._executors.append(executor)
            self._tasks.append(asyncio.create_task(self._worker(engine, executor), name=f"batcher-{i}"))

    async def stop(self) -> None:
        """Let queued jobs finish, then stop the workers."""
        if self._queue is not None:
            deadline = time.monotonic() + 30
            while (self._queue.qsize() or self.busy) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for executor in self._executors:
            executor.shutdown(wait=True)
        self._tasks.clear()
        self._executors.clear()

    async def submit(self, job: Job) -> Result:
        assert self._queue is not None, "Batcher.start() was not awaited"
        depth = self._queue.qsize()
        wait = depth * self._service_s / len(self._engines)  # how long this one would wait, by recent service
        if depth >= self.max_queue or (self.max_wait_s and wait > self.max_wait_s):
            # Refuse now rather than queue a wait the client would not want: the balancer tries
            # another server, and Retry-After says when this one is likely to have room.
            why = f"{depth} requests queued" if depth >= self.max_queue else f"an expected wait of {wait * 1000:.0f} ms"
            raise Overloaded(f"The server is at capacity ({why}); retry shortly.", retry_after=wait)
        job.future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(job)
        return await job.future

    async def _collect(self, first: Job) -> list[Job]:
        assert self._queue is not None
        jobs = [first]
        if self.max_batch <= 1:
            return jobs
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.batch_timeout_s
        while len(jobs) < self.max_batch:
            try:
                jobs.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                jobs.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return jobs

    async def _worker(self, engine: Engine, executor: ThreadPoolExecutor) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect(await self._queue.get())
            # A client that hung up cancelled its future: skip the work.
            live = [job for job in jobs if job.future is not None and not job.future.done()]
            if self._on_skip is not None:
                for _ in range(len(jobs) - len(live)):
                    self._on_skip()
            jobs = live
            if not jobs:
                continue
            self.busy += 1
            picked = time.perf_counter()
            try:
                results = await loop.run_in_executor(executor, run_batch, engine, self._decode, jobs)
            except Exception as exc:  # an engine failure must fail its jobs, not kill the worker
                results = [exc] * len(jobs)
            finally:
                self.busy -= 1
            self._service_s = 0.9 * self._service_s + 0.1 * (time.perf_counter() - picked) / len(jobs)
            if self._on_batch:
                self._on_batch(len(jobs))
            for job, result in zip(jobs, results, strict=True):
                assert job.future is not None
                if job.future.done():
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)
