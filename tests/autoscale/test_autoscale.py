"""Integration: the autoscaler with real workers, servers, balancers and redis-server, on ephemeral ports."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis

from imgclass import log
from imgclass.autoscale.actuators import LocalServers, LocalWorkers
from imgclass.queue.redis_server import RedisServer

from ..conftest import descendants, http, multipart
from .conftest import load

pytestmark = pytest.mark.integration

SLEEP = ("--backend", "sleep", "--log-level", "WARNING")


def metrics(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in http("GET", url + "/metrics")[2].decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_for(check: Callable[[], bool], timeout: float, what: str, every: float = 0.1) -> float:
    """Seconds until `check()` held; fails after `timeout`."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            pytest.fail(f"not within {timeout:g} s: {what}")
        time.sleep(every)
    return time.monotonic() - started


def new_job(url: str, data: bytes) -> str:
    body, ctype = multipart({"image": ("x.jpg", data, "image/jpeg")})
    status, _, raw = http("POST", url + "/jobs", body, {"Content-Type": ctype})
    assert status == 202, raw
    return json.loads(raw)["id"]


def done(url: str, job_id: str) -> dict:
    status, _, raw = http("GET", f"{url}/jobs/{job_id}?wait=60", timeout=90)
    doc = json.loads(raw)
    assert status == 200 and doc["status"] == "done", doc
    return doc


def test_queue_burst_scales_up_within_delay_plus_interval_and_down_after_the_window(
    spawn, redis_server: RedisServer, small_jpeg: bytes
) -> None:
    delay, interval, window = 1.0, 0.5, 4.0
    front = spawn("balance", "--dispatch", "queue", "--port", "0", "--redis", redis_server.url).url
    scaler = spawn("autoscale", "--port", "0", "--dispatch", "queue", "--redis", redis_server.url, "--policy",
                   "target", "--target", "2", "--upscale-delay", str(delay), "--downscale-window", str(window),
                   "--interval", str(interval), "--min", "1", "--max", "4", "--service-time", "const:300ms",
                   *SLEEP).url  # fmt: skip
    wait_for(lambda: metrics(scaler)["imgclass_autoscale_current"] == 1, 30, "the first worker")
    ids = [new_job(front, small_jpeg) for _ in range(40)]  # 12 s of work for one worker
    burst = time.monotonic()
    # one evaluation sees it, the delay runs, the next evaluation acts; 1 s for reading /metrics
    up = wait_for(lambda: metrics(scaler)["imgclass_autoscale_desired"] == 4, delay + 2 * interval + 1.0, "desired 4")
    assert up >= delay - interval  # and not before the delay (less the evaluation it began in)
    wait_for(lambda: metrics(scaler)["imgclass_autoscale_current"] == 4, 30, "four workers running")
    wait_for(lambda: len(json.loads(http("GET", front + "/backends")[2])) == 4, 10, "the front lists four workers")
    answered = [done(front, job_id) for job_id in ids]
    assert len({doc["id"] for doc in answered}) == 40
    assert len({doc["worker"] for doc in answered}) > 1  # the new workers took jobs
    finished = time.monotonic()
    assert finished - burst < 12  # faster than the one worker alone would have been
    down = wait_for(lambda: metrics(scaler)["imgclass_autoscale_desired"] == 1, window + 2 * interval + 3, "down to 1")
    # the recommendation falls below 4 at most ~1 s before the last answer (8 jobs left for 4 workers)
    assert down >= window - 1.0 - interval
    wait_for(lambda: metrics(scaler)["imgclass_autoscale_current"] == 1, 30, "back to one worker")
    text = http("GET", scaler + "/metrics")[2].decode()
    assert 'action="up"' in text and 'action="down"' in text


def test_queue_scale_in_under_load_costs_no_error_and_loses_no_job(
    spawn, redis_server: RedisServer, small_jpeg: bytes
) -> None:
    front = spawn("balance", "--dispatch", "queue", "--port", "0", "--redis", redis_server.url).url
    workers = LocalWorkers(["worker", "--port", "0", "--redis", redis_server.url, "--service-time", "const:150ms",
                            *SLEEP], log.get_logger("t", "autoscale", "WARNING"),
                           env={"IMGCLASS_LOG_LEVEL": "WARNING"})  # fmt: skip
    body, ctype = multipart({"image": ("x.jpg", small_jpeg, "image/jpeg")})
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(workers.scale_to(4))
        assert workers.ready == 4
        result: dict[str, list[int]] = {}
        thread = threading.Thread(target=lambda: result.update(s=load(front + "/submit", body, ctype, 12, 6)))
        thread.start()
        time.sleep(2.0)
        loop.run_until_complete(workers.scale_to(1))  # three drain while jobs keep coming
        thread.join(90)
        assert workers.ready == 1
    finally:
        loop.run_until_complete(workers.close())
        loop.close()
    assert len(result["s"]) == 72 and set(result["s"]) == {200}
    stats = redis.Redis.from_url(redis_server.url).hgetall("imgclass:stats")
    counts = {k.decode(): int(v) for k, v in stats.items()}
    assert counts.get("enqueued") == counts.get("finished") == 72, counts
    assert not counts.get("dead_lettered"), counts


def test_push_scale_in_under_load_costs_no_error(spawn, small_jpeg: bytes) -> None:
    token = secrets.token_hex(16)
    balancer = spawn("balance", "--port", "0", "--health-interval", "0.5", "--policy", "least_outstanding",
                     env={"IMGCLASS_ADMIN_TOKEN": token}).url  # fmt: skip
    servers = LocalServers(["serve", "--port", "0", "--threads", "1", "--service-time", "const:100ms", *SLEEP],
                           balancer, token, log.get_logger("t", "autoscale", "WARNING"),
                           env={"IMGCLASS_LOG_LEVEL": "WARNING"})  # fmt: skip
    body, ctype = multipart({"image": ("x.jpg", small_jpeg, "image/jpeg")})
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(servers.scale_to(4))
        assert len(json.loads(http("GET", balancer + "/backends")[2])) == 4
        result: dict[str, list[int]] = {}
        thread = threading.Thread(target=lambda: result.update(s=load(balancer + "/predict", body, ctype, 15, 6)))
        thread.start()
        time.sleep(2.0)
        loop.run_until_complete(servers.scale_to(1))  # out of the balancer, then drained
        assert len(json.loads(http("GET", balancer + "/backends")[2])) == 1
        thread.join(90)
    finally:
        loop.run_until_complete(servers.close())
        loop.close()
    assert len(result["s"]) == 90 and set(result["s"]) == {200}


def test_the_controller_holds_its_size_while_redis_is_down(spawn, redis_server: RedisServer, small_jpeg: bytes) -> None:
    front = spawn("balance", "--dispatch", "queue", "--port", "0", "--redis", redis_server.url, "--timeout", "5").url
    # no stabilization: a controller that read an outage as "no load" would drop to 1 at once
    scaler = spawn("autoscale", "--port", "0", "--dispatch", "queue", "--redis", redis_server.url, "--policy",
                   "queue_depth", "--per-worker", "5", "--downscale-window", "0", "--interval", "0.3", "--min", "1",
                   "--max", "3", "--service-time", "const:2s", *SLEEP).url  # fmt: skip
    ids = [new_job(front, small_jpeg) for _ in range(30)]
    wait_for(lambda: metrics(scaler)["imgclass_autoscale_desired"] == 3, 10, "desired 3")
    time.sleep(1.5)  # the AOF is written every second
    redis_server.kill()
    try:
        seen = set()
        until = time.monotonic() + 3.0
        while time.monotonic() < until:
            seen.add(metrics(scaler)["imgclass_autoscale_desired"])
            time.sleep(0.1)
        assert seen == {3.0}
        assert metrics(scaler)['imgclass_autoscale_decisions_total{action="hold_unreadable"}'] > 0
    finally:
        redis_server.start()  # the same port and directory: the jobs come back from the AOF
    for job_id in ids:
        done(front, job_id)
    wait_for(lambda: metrics(scaler)["imgclass_autoscale_desired"] == 1, 20, "down to 1 once the queue is empty")


def test_the_controller_holds_its_size_while_the_balancer_is_frozen(spawn, small_jpeg: bytes) -> None:
    token = secrets.token_hex(16)
    balancer = spawn("balance", "--port", "0", "--health-interval", "0.5", "--policy", "least_outstanding",
                     "--timeout", "120", "--queue-timeout", "120", env={"IMGCLASS_ADMIN_TOKEN": token})  # fmt: skip
    scaler = spawn("autoscale", "--port", "0", "--dispatch", "push", "--balancer", balancer.url, "--policy",
                   "queue_depth", "--per-worker", "4", "--downscale-window", "0", "--interval", "0.3", "--min", "1",
                   "--max", "3", "--service-time", "const:3s", "--max-queue", "100", *SLEEP,
                   env={"IMGCLASS_ADMIN_TOKEN": token}).url  # fmt: skip
    wait_for(lambda: metrics(scaler)["imgclass_autoscale_current"] == 1, 30, "the first server")
    body, ctype = multipart({"image": ("x.jpg", small_jpeg, "image/jpeg")})
    with ThreadPoolExecutor(16) as pool:
        # 48 s of work: at least 12 requests stay in the balancer for the next 12 s, so a true reading
        # keeps asking for 3 servers, and a failed one read as "no load" would ask for 1
        answers = [pool.submit(http, "POST", balancer.url + "/predict", body, {"Content-Type": ctype}, 120)
                   for _ in range(16)]  # fmt: skip
        wait_for(lambda: metrics(scaler)["imgclass_autoscale_current"] == 3, 15, "three servers registered")
        balancer.signal(signal.SIGSTOP)  # unreachable: every read times out
        try:
            seen = set()
            until = time.monotonic() + 5.0
            while time.monotonic() < until:
                seen.add(metrics(scaler)["imgclass_autoscale_desired"])
                time.sleep(0.1)
            assert seen == {3.0}
            assert metrics(scaler)['imgclass_autoscale_decisions_total{action="hold_unreadable"}'] > 0
        finally:
            balancer.signal(signal.SIGCONT)
        assert [a.result()[0] for a in answers] == [200] * 16


def test_up_autoscale_follows_a_burst_in_the_backends_panel_and_leaves_nothing_behind(
    model_dir: Path, small_jpeg: bytes, tmp_path: Path
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgclass", "up", "--dispatch", "queue", "--autoscale", "1:4", "--autoscale-policy",
         "queue_depth", "--per-worker", "3", "--downscale-window", "2", "--scale-interval", "0.5", "--backend",
         "sleep", "--service-time", "const:300ms", "--port", "0", "--log-level", "warning",
         "--redis-dir", str(tmp_path / "redis")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "IMGCLASS_MODEL_DIR": str(model_dir)},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "imgclass is up: 1 to 4 sleep worker(s)" in line, line
        url = line.split(" front at ")[1].split("/  ")[0]
        scaler_line = proc.stdout.readline()
        assert scaler_line.startswith("  autoscaler (queue_depth policy): http://"), scaler_line
        scaler = scaler_line.split(": ", 1)[1].strip().removesuffix("/metrics")

        def workers() -> int:
            return len(json.loads(http("GET", url + "/backends")[2]))

        wait_for(lambda: workers() == 1, 20, "one worker in /backends")
        ids = [new_job(url, small_jpeg) for _ in range(30)]
        wait_for(lambda: workers() == 4, 20, "four workers in /backends", every=0.25)
        assert metrics(scaler)["imgclass_autoscale_desired"] == 4
        for job_id in ids:
            done(url, job_id)
        wait_for(lambda: workers() == 1, 30, "back to one worker in /backends", every=0.25)
        # redis-server, the front, the autoscaler and its one worker, once the others have drained
        wait_for(lambda: len(descendants(proc.pid)) == 4, 15, "the stopped workers exit")
        children = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0
        time.sleep(0.3)
        assert [p for p in children if Path(f"/proc/{p}").exists()] == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
