"""Integration: queue mode with a real redis-server and real worker and front processes."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
from PIL import Image

from imgclass.queue.redis_server import RedisServer

from ..conftest import PHOTOS, descendants, http, multipart, post_image, post_json

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def small_jpeg(images_dir: Path) -> bytes:
    buf = io.BytesIO()
    Image.open(images_dir / "parrot.jpg").convert("RGB").resize((64, 64)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def worker(spawn, url: str, *args: str, wait: bool = True):
    return spawn("worker", "--port", "0", "--redis", url, *args, wait=wait)


def sleep_worker(spawn, url: str, service: str, *args: str, wait: bool = True):
    return worker(spawn, url, "--backend", "sleep", "--service-time", service, *args, wait=wait)


def front(spawn, url: str, *args: str) -> str:
    return spawn("balance", "--dispatch", "queue", "--port", "0", "--redis", url, *args).url


def job(url: str, job_id: str, wait: float = 0) -> tuple[int, dict]:
    status, _, raw = http("GET", f"{url}/jobs/{job_id}?wait={wait:g}", timeout=90)
    return status, json.loads(raw)


def new_job(url: str, data: bytes, **headers: str) -> str:
    body, ctype = multipart({"image": ("x.jpg", data, "image/jpeg")})
    status, h, raw = http("POST", url + "/jobs", body, {"Content-Type": ctype, **headers})
    doc = json.loads(raw)
    assert status == 202 and h["Location"] == doc["url"] == f"/jobs/{doc['id']}", doc
    return doc["id"]


def metric(url: str, name: str) -> float:
    for line in http("GET", url + "/metrics")[2].decode().splitlines():
        if line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_every_photo_through_submit_and_jobs(spawn, redis_server: RedisServer, images_dir: Path) -> None:
    for _ in range(2):
        worker(spawn, redis_server.url, wait=False)
    url = front(spawn, redis_server.url)
    for photo, expected in PHOTOS.items():
        data = (images_dir / photo).read_bytes()
        status, headers, doc = post_image(url + "/submit", data, photo)
        assert status == 200 and doc["predictions"][0]["index"] == expected, (photo, doc)
        assert doc["worker"] and doc["timing_ms"]["queued"] >= 0 and headers["X-Job-ID"]
        job_id = new_job(url, data)
        status, got = job(url, job_id, wait=30)
        assert status == 200 and got["status"] == "done" and got["predictions"][0]["index"] == expected
        assert got["worker"] and got["created"] <= got["started"] <= got["finished"]
    status, _, raw = http("GET", url + "/jobs/no-such-job")
    assert status == 404 and json.loads(raw)["error"] == "unknown_job"
    assert len(json.loads(http("GET", url + "/backends")[2])) == 2  # the page's panel: the live workers
    assert len(json.loads(http("GET", url + "/labels")[2])["labels"]) == 1000


def test_the_original_async_api(spawn, redis_server: RedisServer, images_dir: Path) -> None:
    worker(spawn, redis_server.url, wait=False)
    url = front(spawn, redis_server.url)
    import base64

    data = base64.b64encode((images_dir / "parrot.jpg").read_bytes()).decode()
    status, _, doc = post_json(url + "/inference/image", {"name": "parrot.jpg", "data": data})
    assert status == 200 and doc["uuid"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status, _, raw = http("GET", f"{url}/predictions/{doc['uuid']}")
        if status == 200:
            break
        assert status == 404
        time.sleep(0.1)
    answer = json.loads(raw)
    assert answer["prediction"] == "macaw" and answer["predictions"][0]["index"] == 88
    assert http("GET", f"{url}/predictions/unknown")[0] == 404
    status, _, doc = post_json(url + "/inference/image", {"name": "x", "data": "@@"})
    assert status == 400 and doc["error"] == "bad_base64"


def test_a_worker_killed_mid_batch_loses_and_duplicates_nothing(
    spawn, redis_server: RedisServer, small_jpeg: bytes
) -> None:
    victim = sleep_worker(spawn, redis_server.url, "const:200ms", "--max-batch", "4", "--batch-timeout-ms", "20",
                          "--heartbeat-ttl", "1")  # fmt: skip
    sleep_worker(spawn, redis_server.url, "const:200ms", "--max-batch", "4", "--batch-timeout-ms", "20",
                 "--heartbeat-ttl", "1")  # fmt: skip
    url = front(spawn, redis_server.url)
    ids = [new_job(url, small_jpeg) for _ in range(30)]
    submits: list[tuple[int, dict]] = []

    def submit_one(_: int) -> None:
        status, _, doc = post_image(url + "/submit", small_jpeg)
        submits.append((status, doc))

    with ThreadPoolExecutor(10) as pool:
        futures = [pool.submit(submit_one, i) for i in range(10)]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and metric(url, "imgclass_queue_pending") == 0:
            time.sleep(0.02)
        time.sleep(0.1)  # the victim is in the middle of a batch
        victim.proc.send_signal(signal.SIGKILL)
        for future in futures:
            future.result()
    assert [s for s, _ in submits] == [200] * 10  # no client of /submit saw an error
    first = {i: job(url, i, wait=30)[1] for i in ids}
    assert all(doc["status"] == "done" for doc in first.values()), [d["status"] for d in first.values()]
    assert metric(url, "imgclass_queue_claimed_total") >= 1
    time.sleep(1.5)
    again = {i: job(url, i)[1] for i in ids}
    assert again == first  # written once: the same worker, the same times, the same answer


def test_a_frozen_worker_writes_no_second_result(spawn, redis_server: RedisServer, small_jpeg: bytes) -> None:
    frozen = sleep_worker(spawn, redis_server.url, "const:500ms", "--heartbeat-ttl", "1")
    url = front(spawn, redis_server.url)
    job_id = new_job(url, small_jpeg)
    deadline = time.monotonic() + 10
    while (running := job(url, job_id)[1])["status"] != "running" and time.monotonic() < deadline:
        time.sleep(0.02)
    frozen.proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(1.5)  # past the heartbeat's 1 s
        rescuer = sleep_worker(spawn, redis_server.url, "const:10ms", "--heartbeat-ttl", "1")
        status, doc = job(url, job_id, wait=20)
        assert status == 200 and doc["status"] == "done" and doc["worker"] != running["worker"]
    finally:
        frozen.proc.send_signal(signal.SIGCONT)
    time.sleep(1.5)  # the frozen worker finishes its 500 ms and tries to write
    assert job(url, job_id)[1] == doc
    text = http("GET", frozen.url + "/metrics")[2].decode()
    assert 'imgclass_worker_jobs_total{outcome="already_done"} 1.0' in text
    assert rescuer.alive()


def test_redis_killed_and_restarted_on_its_aof(spawn, redis_server: RedisServer, small_jpeg: bytes) -> None:
    url = front(spawn, redis_server.url, "--timeout", "5")
    ids = [new_job(url, small_jpeg) for _ in range(5)]  # no worker yet: they wait in the queue
    time.sleep(1.5)  # appendfsync everysec: on disk after a second
    redis_server.kill()
    started = time.monotonic()
    status, _, doc = post_image(url + "/submit", small_jpeg)
    assert status == 503 and doc["error"] == "queue_unavailable" and time.monotonic() - started < 2.5
    assert http("GET", url + "/readyz")[0] == 503
    redis_server.start()  # the same directory, the same port: it reloads its AOF
    sleep_worker(spawn, redis_server.url, "const:5ms")
    for job_id in ids:
        status, got = job(url, job_id, wait=20)
        assert status == 200 and got["status"] == "done", got
    deadline = time.monotonic() + 10
    while post_image(url + "/submit", small_jpeg)[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.2)  # the front recovers by itself
    assert post_image(url + "/submit", small_jpeg)[0] == 200


def test_a_poison_job_fails_after_max_deliveries(spawn, redis_server: RedisServer, small_jpeg: bytes) -> None:
    url = front(spawn, redis_server.url)
    job_id = new_job(url, small_jpeg)
    client = redis.Redis.from_url(redis_server.url)
    args = ("const:3s", "--heartbeat-ttl", "0.5", "--max-deliveries", "2")
    for attempt in range(3):
        w = sleep_worker(spawn, redis_server.url, *args)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            fields = client.hgetall(f"imgclass:job:{job_id}")
            if fields.get(b"status") == b"failed" or (
                fields.get(b"status") == b"running" and int(fields.get(b"deliveries", 0)) == attempt + 1
            ):
                break
            time.sleep(0.02)
        if fields.get(b"status") == b"failed":
            break
        w.proc.send_signal(signal.SIGKILL)  # the worker "dies on it", every time
        w.proc.wait(5)
    _, doc = job(url, job_id, wait=15)
    assert doc["status"] == "failed" and doc["error"]["error"] == "poison_job", doc
    assert int(client.hget(f"imgclass:job:{job_id}", "deliveries")) == 3
    assert client.xlen("imgclass:dead") == 1 and metric(url, "imgclass_queue_dead_lettered_total") == 1


def test_overload_is_refused_past_queue_size_and_redis_memory_stays_bounded(
    spawn, redis_server: RedisServer, small_jpeg: bytes
) -> None:
    sleep_worker(spawn, redis_server.url, "const:1s")
    url = front(spawn, redis_server.url, "--queue-size", "100")
    client = redis.Redis.from_url(redis_server.url)
    before = client.info("memory")["used_memory"]
    body, ctype = multipart({"image": ("x.jpg", small_jpeg, "image/jpeg")})

    def one(_: int) -> int:
        return http("POST", url + "/jobs", body, {"Content-Type": ctype})[0]

    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(one, range(10_000)))
    # a hundred waiting, plus the few the worker took off the queue meanwhile (one a second)
    assert statuses.count(503) >= 9_800 and set(statuses) == {202, 503}, (statuses.count(202), statuses.count(503))
    assert client.xlen("imgclass:jobs") <= 100
    grown = client.info("memory")["used_memory"] - before
    assert grown < 101 * len(small_jpeg) * 2 + 5_000_000, grown  # the accepted images, not ten thousand


def test_a_client_that_leaves_submit_can_fetch_its_answer(spawn, redis_server: RedisServer, small_jpeg: bytes) -> None:
    sleep_worker(spawn, redis_server.url, "const:800ms")
    url = front(spawn, redis_server.url)
    body, ctype = multipart({"image": ("x.jpg", small_jpeg, "image/jpeg")})
    import socket

    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(b"POST /submit HTTP/1.1\r\nHost: x\r\nX-Request-ID: leaving-client-1\r\nContent-Type: "
                     + ctype.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)  # fmt: skip
        time.sleep(0.2)  # and it hangs up before the answer
    status, doc = job(url, "leaving-client-1", wait=20)
    assert status == 200 and doc["status"] == "done" and doc["predictions"]


def test_up_dispatch_queue_leaves_nothing_behind(model_dir: Path, small_jpeg: bytes, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgclass", "up", "--dispatch", "queue", "--workers", "2", "--backend", "sleep",
         "--service-time", "const:2ms", "--port", "0", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "IMGCLASS_MODEL_DIR": str(model_dir)},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "imgclass is up" in line, line
        url = line.split(" front at ")[1].split("/  ")[0]
        status, _, doc = post_image(url + "/submit", small_jpeg)
        assert status == 200 and doc["worker"] in ("worker1", "worker2")
        children = descendants(proc.pid)
        assert len(children) == 4  # redis-server, two workers, the front
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        time.sleep(0.3)
        assert [p for p in children if Path(f"/proc/{p}").exists()] == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]


def test_workers_batch_from_the_queue(spawn, redis_server: RedisServer, small_jpeg: bytes) -> None:
    w = sleep_worker(spawn, redis_server.url, "const:100ms", "--max-batch", "8", "--batch-timeout-ms", "50")
    url = front(spawn, redis_server.url)
    barrier = threading.Barrier(16)

    def one(_: int) -> dict:
        barrier.wait()
        return post_image(url + "/submit", small_jpeg)[2]

    with ThreadPoolExecutor(16) as pool:
        docs = list(pool.map(one, range(16)))
    assert max(d["batch_size"] for d in docs) >= 4
    assert "imgclass_worker_batch_size_bucket" in http("GET", w.url + "/metrics")[2].decode()


def test_the_notification_carries_when_the_job_started(redis_server: RedisServer) -> None:
    # A waiter that looked at its job while it was queued merges only what the notification brings:
    # without 'started' in it, GET /jobs/{id}?wait= answered "started": null for a done job (CI saw it).
    import asyncio

    from imgclass.queue.broker import Broker, Outcome, client

    async def scenario() -> tuple[dict[str, str], dict[str, str]]:
        broker = Broker(client(redis_server.url))
        try:
            await broker.ensure_group()
            assert await broker.enqueue("j1", b"image", 5, 0, 60, "r1") == 1
            assert "started" not in (await broker.job("j1") or {})
            [(entry, _)] = await broker.redis.xrange(broker.keys.jobs)
            await broker.start(["j1"], "w1")
            await broker.finish([Outcome(entry.decode(), "j1", result={"predictions": []})], "w1")
            [(_, raw)] = await broker.redis.xrange(broker.keys.done)
            notified = {k.decode(): v.decode() for k, v in raw.items()}
            return notified, await broker.job("j1") or {}
        finally:
            await broker.redis.aclose()

    notified, stored = asyncio.run(scenario())
    assert notified["started"] == stored["started"] and float(stored["started"]) <= float(notified["finished"])
    assert notified["status"] == "done" and notified["worker"] == "w1"
