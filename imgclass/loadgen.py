"""Open-loop Poisson load generator: requests leave at their scheduled times, latency counts from then."""

from __future__ import annotations

import asyncio
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import numpy as np

from .stats import DROPPED, Records, RunSummary, summarize


def poisson_offsets(
    rate: float, *, duration: float | None = None, requests: int | None = None, seed: int | None = 0
) -> np.ndarray:
    """Send times (s) of a Poisson process of `rate`/s: i.i.d. exponential gaps from a seeded RNG."""
    if rate <= 0:
        raise ValueError("rate must be > 0")
    if duration is None and requests is None:
        raise ValueError("bound the run with duration and/or requests")
    rng = random.Random(seed)
    limit = requests if requests is not None else math.inf
    out: list[float] = []
    t = 0.0
    while len(out) < limit:
        t += rng.expovariate(rate)
        if duration is not None and t >= duration:
            break
        out.append(t)
    return np.asarray(out)


@dataclass(frozen=True)
class Target:
    """What every request sends."""

    url: str
    body: bytes
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)
    # When set, each request goes to one of these, uniformly at random (client-side balancing).
    spread: tuple[str, ...] = ()

    def picker(self, seed: int | None) -> Callable[[], str]:
        if not self.spread:
            return lambda: self.url
        rng = random.Random(None if seed is None else seed + 1)
        urls = self.spread
        return lambda: urls[rng.randrange(len(urls))]


@dataclass(frozen=True)
class LoadSpec:
    rate: float  # requests/s offered
    duration: float | None = None  # seconds of schedule, warm-up included
    requests: int | None = None
    warmup: float = 0.0  # seconds at the start left out of the statistics
    max_in_flight: int = 1000
    seed: int | None = 0
    timeout: float = 60.0


def classify_error(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect_error"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "server_disconnected"
    if isinstance(exc, aiohttp.ClientOSError):
        return f"os_error_{exc.errno}"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "payload_error"
    return type(exc).__name__


def _backend_of(response: aiohttp.ClientResponse) -> str:
    return response.headers.get("X-Backend") or response.headers.get("X-Served-By") or ""


class Progress:
    """A tqdm bar on stderr when it is a terminal, else a line every few seconds."""

    def __init__(self, total: int, label: str, enabled: bool = True) -> None:
        self.enabled = enabled
        self.total = total
        self.label = label
        self._bar = None
        self._last = 0.0
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=label, unit="req", leave=False, file=sys.stderr)

    def update(self, done: int, extra: str = "") -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.n = done
            self._bar.set_postfix_str(extra, refresh=True)
        elif time.monotonic() - self._last > 5 or done == self.total:
            self._last = time.monotonic()
            print(f"{self.label}: {done}/{self.total} {extra}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def make_session(max_connections: int, timeout: float) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=max_connections, limit_per_host=0, enable_cleanup_closed=False)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout),
        skip_auto_headers=("User-Agent",),
    )


async def open_loop(target: Target, spec: LoadSpec, progress: bool = False, label: str = "load") -> Records:
    """Send each request at its scheduled time; never wait for earlier ones (no coordinated omission)."""
    offsets = poisson_offsets(spec.rate, duration=spec.duration, requests=spec.requests, seed=spec.seed)
    records = Records()
    headers = {"Content-Type": target.content_type, **target.headers}
    loop = asyncio.get_running_loop()
    in_flight = 0
    completed = 0
    pending: set[asyncio.Task[None]] = set()
    bar = Progress(len(offsets), label, progress)
    pick = target.picker(spec.seed)

    async with make_session(spec.max_in_flight, spec.timeout) as session:
        start = loop.time()

        async def one(intended: float) -> None:
            nonlocal in_flight, completed
            sent = loop.time() - start
            status, backend, error = 0, "", ""
            try:
                async with session.post(pick(), data=target.body, headers=headers) as response:
                    await response.read()
                    status, backend = response.status, _backend_of(response)
                    if status != 200:
                        error = f"http_{status}"
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                error = classify_error(exc)
            finally:
                in_flight -= 1
                completed += 1
            records.add(intended, sent, loop.time() - start, status, backend, error)

        for intended in offsets.tolist():
            delay = start + intended - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if in_flight >= spec.max_in_flight:
                records.add(intended, math.nan, math.nan, 0, "", DROPPED)
                continue
            in_flight += 1
            task = loop.create_task(one(intended))
            pending.add(task)
            task.add_done_callback(pending.discard)
            if progress and completed % 200 == 0:
                bar.update(completed, f"in flight {in_flight}")
        while pending:
            await asyncio.wait(pending, timeout=0.5)
            bar.update(completed, f"in flight {in_flight}")
    bar.close()
    return records


async def closed_loop(
    target: Target, concurrency: int, duration: float, timeout: float = 60.0
) -> tuple[Records, float]:
    """`concurrency` clients each send their next request as soon as the last answers; for saturation."""
    records = Records()
    headers = {"Content-Type": target.content_type, **target.headers}
    loop = asyncio.get_running_loop()
    async with make_session(concurrency, timeout) as session:
        start = loop.time()
        stop_at = start + duration

        async def client() -> None:
            while loop.time() < stop_at:
                sent = loop.time() - start
                status, backend, error = 0, "", ""
                try:
                    async with session.post(target.url, data=target.body, headers=headers) as response:
                        await response.read()
                        status, backend = response.status, _backend_of(response)
                        if status != 200:
                            error = f"http_{status}"
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                    error = classify_error(exc)
                    await asyncio.sleep(0.01)
                records.add(sent, sent, loop.time() - start, status, backend, error)

        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = loop.time() - start
    return records, elapsed


def run(target: Target, spec: LoadSpec, progress: bool = False, label: str = "load") -> tuple[Records, RunSummary]:
    records = asyncio.run(open_loop(target, spec, progress, label))
    end = spec.duration if spec.duration is not None else (max(records.intended) if len(records) else 0.0)
    if spec.duration is None:
        end = math.nextafter(end, math.inf)
    return records, summarize(records, spec.rate, spec.warmup, end)
