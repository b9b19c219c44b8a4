"""Integration: the balancer under overload and faults, with real server processes on ephemeral ports."""

from __future__ import annotations

import io
import json
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from imgclass.measure import loadgen
from imgclass.measure.experiment import multipart as experiment_multipart

from ..conftest import http, post_image

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def small_jpeg(images_dir: Path) -> bytes:
    buf = io.BytesIO()
    Image.open(images_dir / "parrot.jpg").convert("RGB").resize((64, 64)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def metric(url: str, name: str) -> float:
    for line in http("GET", url + "/metrics")[2].decode().splitlines():
        if line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sleep_server(spawn, service: str, threads: int = 1, max_queue: int = 4, port: int = 0, **kw):
    return spawn("serve", "--port", str(port), "--backend", "sleep", "--service-time", service, "--threads",
                 str(threads), "--max-queue", str(max_queue), **kw)  # fmt: skip


def test_a_2x_overload_is_shed_without_ejecting_anyone(spawn, small_jpeg: bytes) -> None:
    # 3 servers of 20 ms with one worker: 150 req/s in all. Twice that, open loop, for 4 s.
    servers = [sleep_server(spawn, "const:20ms", wait=False) for _ in range(3)]
    urls = [s.wait_url() for s in servers]
    url = spawn("balance", "--port", "0", "--backends", ",".join(urls), "--health-interval", "0.2").url
    body, ctype = experiment_multipart(small_jpeg)
    spec = loadgen.LoadSpec(rate=300, duration=4.0, warmup=0.5, seed=5)
    records, _ = loadgen.run(loadgen.Target(url + "/submit", body, ctype), spec)
    statuses = set(records.status)
    assert statuses <= {200, 503}, statuses
    assert metric(url, "imgclass_balancer_ejections_total") == 0
    assert metric(url, "imgclass_balancer_no_backend_total") == 0  # no client saw no_backend
    assert metric(url, 'imgclass_balancer_retries_total{reason="overloaded"}') > 0
    # completed throughput stays at the servers' capacity (150/s), measured after the warm-up
    ok = sum(1 for t, s in zip(records.intended, records.status, strict=True) if s == 200 and t >= 0.5)
    assert ok / 3.5 >= 0.85 * 150, ok / 3.5
    assert all(b["available"] for b in json.loads(http("GET", url + "/backends")[2]))


def test_when_every_server_sheds_retries_stay_within_the_budget(spawn, small_jpeg: bytes) -> None:
    # Two servers that hold one image in service and one in queue: a burst of 30 gets ~26 503s.
    urls = [sleep_server(spawn, "const:300ms", max_queue=1).url for _ in range(2)]
    url = spawn("balance", "--port", "0", "--backends", ",".join(urls), "--retry-budget", "20").url
    with ThreadPoolExecutor(30) as pool:
        results = list(pool.map(lambda _: post_image(url + "/submit", small_jpeg), range(30)))
    shed = [(h, doc) for status, h, doc in results if status == 503]
    assert len(shed) >= 20
    assert all(doc["error"] == "overloaded" and int(h["Retry-After"]) >= 1 for h, doc in shed)
    retried = metric(url, 'imgclass_balancer_retries_total{reason="overloaded"}')
    refused = metric(url, 'imgclass_balancer_retries_refused_total{reason="overloaded"}')
    peak = metric(url, "imgclass_balancer_retries_in_flight_peak")
    assert refused > 0 and retried > 0
    assert 1 <= peak <= max(3, 0.2 * 30), peak  # 20% of the requests in flight, at least 3
    assert metric(url, "imgclass_balancer_ejections_total") == 0


def test_a_killed_server_restarted_takes_traffic_within_rise_checks(spawn, small_jpeg: bytes) -> None:
    port = free_port()
    victim = sleep_server(spawn, "const:100ms", threads=8, max_queue=64, port=port)
    other = sleep_server(spawn, "const:100ms", threads=8, max_queue=64)
    url = spawn("balance", "--port", "0", "--backends", f"{victim.url},{other.url}", "--health-interval", "0.2",
                "--rise", "2", "--eject-seconds", "5").url  # fmt: skip
    with ThreadPoolExecutor(8) as pool:
        pending = [pool.submit(post_image, url + "/submit", small_jpeg) for _ in range(16)]
        time.sleep(0.15)  # requests are in flight on both
        victim.proc.send_signal(signal.SIGKILL)
        assert all(f.result()[0] == 200 for f in pending)  # the in-flight ones were retried elsewhere
    ejections = metric(url, "imgclass_balancer_ejections_total")
    assert ejections == 1, ejections  # one failure event, one ejection, however many requests failed
    restarted = sleep_server(spawn, "const:100ms", threads=8, max_queue=64, port=port)
    ready = time.monotonic()
    assert restarted.url == victim.url
    deadline = ready + 0.2 * 2 + 1.0 + 1.0  # rise x interval + 1 s, and a second of slack for this host
    while time.monotonic() < deadline:
        state = {b["url"]: b for b in json.loads(http("GET", url + "/backends")[2])}
        if state[victim.url]["available"]:
            break
        time.sleep(0.05)
    waited = time.monotonic() - ready
    assert state[victim.url]["available"], state[victim.url]
    assert waited <= 0.2 * 2 + 1.0, waited  # not the 5 s ejection, nor an escalated one
    served = state[victim.url]["served"]
    for _ in range(6):
        post_image(url + "/submit?policy=round_robin", small_jpeg)
    assert {b["url"]: b for b in json.loads(http("GET", url + "/backends")[2])}[victim.url]["served"] > served


def test_a_hung_server_delays_no_other_check_and_try_timeout_moves_its_requests(spawn, small_jpeg: bytes) -> None:
    hung = sleep_server(spawn, "const:5ms")
    others = [sleep_server(spawn, "const:5ms") for _ in range(2)]
    url = spawn("balance", "--port", "0", "--backends", ",".join([hung.url] + [o.url for o in others]),
                "--health-interval", "0.2", "--try-timeout", "0.5", "--fall", "3").url  # fmt: skip
    hung.proc.send_signal(signal.SIGSTOP)
    try:
        checks = [metric(o.url, 'imgclass_server_requests_total{route="/readyz",status="200"}') for o in others]
        started = time.monotonic()
        # round robin sends every third request to the hung server: each waits out the 0.5 s try
        # timeout, then goes to another server and succeeds
        results = [post_image(url + "/submit?policy=round_robin", small_jpeg) for _ in range(6)]
        assert [status for status, _, _ in results] == [200] * 6
        assert all(doc["backend"] != hung.url for _, _, doc in results)
        time.sleep(max(0.0, 2.0 - (time.monotonic() - started)))
        elapsed = time.monotonic() - started
        after = [metric(o.url, 'imgclass_server_requests_total{route="/readyz",status="200"}') for o in others]
        for before_n, after_n in zip(checks, after, strict=True):
            # one check every 0.2 s: the hung server's checks, each waiting out its timeout, delay none
            assert after_n - before_n >= 0.7 * elapsed / 0.2, (before_n, after_n, elapsed)
        state = {b["url"]: b for b in json.loads(http("GET", url + "/backends")[2])}
        assert state[hung.url]["healthy"] is False
        assert metric(url, 'imgclass_balancer_retries_total{reason="try_timeout"}') >= 1
    finally:
        hung.proc.send_signal(signal.SIGCONT)


def test_request_ids_and_admin_input_are_checked(spawn, small_jpeg: bytes) -> None:
    backend = sleep_server(spawn, "const:2ms")
    front = spawn("balance", "--port", "0", "--backends", backend.url, "--log-level", "INFO",
                  env={"IMGCLASS_ADMIN_TOKEN": "s3cret"})  # fmt: skip
    body, ctype = experiment_multipart(small_jpeg)
    forged = "abc status=200 path=/admin forged=1"
    for supplied in (forged, "x" * 50_000, 'quote"and\\backslash'):
        status, headers, _ = http("POST", front.url + "/submit", body, {"Content-Type": ctype, "X-Request-ID": supplied})
        assert status == 200 and headers["X-Request-ID"] != supplied and len(headers["X-Request-ID"]) <= 128
    status, headers, _ = http("POST", front.url + "/submit", body, {"Content-Type": ctype, "X-Request-ID": "ok-id.1"})
    assert headers["X-Request-ID"] == "ok-id.1"
    time.sleep(0.3)
    assert not any(" forged=1" in line for line in front.lines)  # no input adds a field to a log line
    auth = {"Authorization": "bearer s3cret", "Content-Type": "application/json"}  # the scheme is case-insensitive
    status, _, raw = http("POST", front.url + "/backends", json.dumps({"url": "http://user:pw@127.0.0.1:9"}).encode(),
                          auth)  # fmt: skip
    assert status == 400 and json.loads(raw)["error"] == "bad_parameter" and "pw" not in raw.decode()
    assert "credentials" in json.loads(raw)["message"]
    status, _, _ = http("POST", front.url + "/backends", json.dumps({"url": "https://127.0.0.1:9"}).encode(), auth)
    assert status == 400
    assert all(b["url"] == backend.url for b in json.loads(http("GET", front.url + "/backends")[2]))


@pytest.mark.slow
def test_a_slow_but_honest_15_mb_upload_succeeds(spawn, images_dir: Path) -> None:
    # ~230 KB/s for 65 s: past the 60 s whole-request deadline of the old front end; reads never
    # pause for 60 s, so nginx's client_body_timeout semantics let it through.
    backend = spawn("serve", "--port", "0", "--backend", "sleep", "--service-time", "const:5ms")
    front = spawn("balance", "--port", "0", "--backends", backend.url)
    side = 2240
    photo = io.BytesIO()
    Image.effect_noise((side, side), 60).convert("RGB").save(photo, "BMP")
    data = photo.getvalue()
    assert len(data) > 15_000_000
    port = int(front.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=70) as conn:
        conn.sendall(b"POST /submit HTTP/1.1\r\nHost: x\r\nContent-Type: image/bmp\r\nContent-Length: %d\r\n\r\n"
                     % len(data))  # fmt: skip
        started = time.monotonic()
        piece = 64 * 1024
        for at in range(0, len(data), piece):
            conn.sendall(data[at : at + piece])
            time.sleep(max(0.0, started + (at + piece) / 230_000 - time.monotonic()))
        assert time.monotonic() - started > 61
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = conn.recv(65536)
            assert chunk, reply
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
