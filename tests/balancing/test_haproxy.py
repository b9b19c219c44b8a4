"""Integration: engine mode (HAProxy forwards, driven by the control plane) in front of real model servers on ephemeral ports."""

from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image
from scipy.stats import chisquare

from imgclass.measure import loadgen
from imgclass.measure.experiment import multipart as experiment_multipart

from ..conftest import descendants, http, multipart, post_image
from .haproxy_support import (
    backends,
    burst,
    engine,
    free_port,
    metrics,
    require_haproxy,
    served_by_server,
    sleep_children,
    wait_for,
)

pytestmark = pytest.mark.integration
require_haproxy()


@pytest.fixture(scope="module")
def small_jpeg(images_dir: Path) -> bytes:
    buf = io.BytesIO()
    Image.open(images_dir / "parrot.jpg").convert("RGB").resize((64, 64)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


@pytest.fixture(scope="module")
def three_children(spawn) -> list:
    return sleep_children(spawn, 3, threads=4)


@pytest.fixture(scope="module")
def three(spawn, three_children) -> tuple[str, list[str]]:
    urls = [c.url for c in three_children]
    return engine(spawn, urls, "--admin-token", "s3cret").url, urls


def test_submit_goes_through_haproxy_with_the_python_engines_headers(three, small_jpeg: bytes) -> None:
    url, urls = three
    body, ctype = multipart({"image": ("x.jpg", small_jpeg, "image/jpeg")})
    status, headers, raw = http("POST", url + "/submit?top=2", body, {"Content-Type": ctype, "X-Request-ID": "req-77"})
    doc = json.loads(raw)
    assert status == 200, doc
    assert headers["X-Backend"] in urls and headers["X-Request-ID"] == "req-77"
    assert len(doc["predictions"]) == 2  # top= passed through
    # an id that is not a plain token is replaced by a fresh one
    status, headers, _ = http("POST", url + "/submit", body, {"Content-Type": ctype, "X-Request-ID": "a b"})
    assert status == 200 and headers["X-Request-ID"] not in ("", "a b") and " " not in headers["X-Request-ID"]
    # the model server's own /predict route, and its errors, pass through too
    status, headers, raw = http("POST", url + "/predict", b"not an image" * 10, {"Content-Type": "image/jpeg"})
    assert status == 400 and json.loads(raw)["error"] == "not_an_image" and headers["X-Backend"] in urls


def test_the_control_planes_routes_keep_their_shapes(three) -> None:
    url, urls = three
    status, headers, page = http("GET", url + "/")
    assert status == 200 and b"<html" in page.lower() and headers["Content-Type"].startswith("text/html")
    assert wait_for(lambda: all(b["name"] for b in backends(url).values()))
    listed = json.loads(http("GET", url + "/backends")[2])
    assert [b["url"] for b in listed] == urls
    assert set(listed[0]) == {"url", "name", "healthy", "available", "in_flight", "served", "failures",
                              "ejected_until", "latency_p50_ms"}  # fmt: skip
    assert len(json.loads(http("GET", url + "/labels")[2])["labels"]) == 1000
    assert http("GET", url + "/healthz")[0] == 200
    text = http("GET", url + "/metrics")[2].decode()
    for name in ("imgclass_balancer_requests_total", "imgclass_balancer_in_flight", "imgclass_balancer_queued",
                 "imgclass_balancer_retries_total", "imgclass_balancer_backends_in_service 3.0",
                 "imgclass_balancer_no_backend_total", "imgclass_balancer_queue_refused_total"):  # fmt: skip
        assert name in text, name
    status, _, exporter = http("GET", url + "/haproxy/metrics")
    assert status == 200 and b"haproxy_backend_" in exporter  # HAProxy's own exporter too
    status, _, raw = http("GET", url + "/nowhere")
    assert status == 404 and json.loads(raw)["error"] == "not_found"
    assert http("GET", url + "/v2/health/ready")[0] == 200


def test_random_is_uniform_by_the_backends_own_counts(three, three_children, small_jpeg: bytes) -> None:
    url, _ = three
    before = [served_by_server(c.url) for c in three_children]
    results = burst(url + "/submit?policy=random", small_jpeg, 600, 8)
    assert Counter(s for s, _, _ in results) == {200: 600}
    observed = [served_by_server(c.url) - b for c, b in zip(three_children, before, strict=True)]
    assert sum(observed) == 600
    assert chisquare(observed).pvalue > 0.001, observed


def test_round_robin_and_number_backend_servers(three, small_jpeg: bytes) -> None:
    url, urls = three
    seen = [post_image(url + "/submit?policy=round_robin", small_jpeg)[1]["X-Backend"] for _ in range(9)]
    first = urls.index(seen[0])
    assert seen == [urls[(first + i) % 3] for i in range(9)]
    firsts = burst(url + "/submit?number_backend_servers=2", small_jpeg, 60, 6)
    assert {h["X-Backend"] for _, h, _ in firsts} == set(urls[:2])
    one = burst(url + "/submit?number_backend_servers=1&policy=least_outstanding", small_jpeg, 20, 4)
    assert {h["X-Backend"] for _, h, _ in one} == {urls[0]}
    for bad in ("0", "4", "x"):
        status, _, doc = post_image(url + f"/submit?number_backend_servers={bad}", small_jpeg)
        assert status == 400 and doc["error"] == "bad_parameter" and "from 1 to 3" in doc["message"], doc
    status, _, doc = post_image(url + "/submit?policy=fastest", small_jpeg)
    assert status == 400 and doc["error"] == "bad_parameter"


@pytest.mark.parametrize("policy", ["least_outstanding", "p2c"])
def test_load_aware_policies_avoid_a_slowed_backend(spawn, small_jpeg: bytes, policy: str) -> None:
    slow = sleep_children(spawn, 1, "const:300ms", threads=8)
    fast = sleep_children(spawn, 2, "const:5ms", threads=8)
    url = engine(spawn, [c.url for c in slow + fast], "--policy", policy).url
    results = burst(url + "/submit", small_jpeg, 120, 6)
    assert all(s == 200 for s, _, _ in results)
    share = Counter(h["X-Backend"] for _, h, _ in results)[slow[0].url] / len(results)
    assert share < (0.08 if policy == "least_outstanding" else 0.2), share  # random gives it a third


def test_a_backend_killed_mid_burst_costs_no_client_an_error(spawn, small_jpeg: bytes) -> None:
    ports = [free_port() for _ in range(3)]
    victims = sleep_children(spawn, 3, "const:10ms", threads=2, ports=ports)
    urls = [v.url for v in victims]
    front = engine(spawn, urls, "--log-level", "debug")
    done = Counter()
    lock = threading.Lock()

    def one(_: int) -> int:
        try:
            status = post_image(front.url + "/submit", small_jpeg)[0]
        except OSError:
            status = -1
        with lock:
            done["n"] += 1
        return status

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(one, i) for i in range(200)]
        assert wait_for(lambda: done["n"] >= 50, 30, 0.005)
        victims[0].proc.send_signal(signal.SIGKILL)
        statuses = [f.result() for f in futures]
    assert Counter(statuses) == {200: 200}, (Counter(statuses), [line for line in front.lines if " 200 " not in line][-30:])
    assert wait_for(lambda: backends(front.url)[urls[0]]["healthy"] is False, 5)
    assert metrics(front.url)["imgclass_balancer_backends_in_service"] == 2
    # restarted on the same port, it comes back up after --rise checks, and takes traffic
    spawn("serve", "--port", str(ports[0]), "--backend", "sleep", "--service-time", "const:10ms")
    assert wait_for(lambda: backends(front.url)[urls[0]]["healthy"], 15)
    results = burst(front.url + "/submit?policy=round_robin", small_jpeg, 9, 1)
    assert Counter(h["X-Backend"] for _, h, _ in results)[urls[0]] == 3


def test_admin_add_and_remove_under_load_cost_no_client_an_error(spawn, small_jpeg: bytes) -> None:
    first = sleep_children(spawn, 2, "const:5ms", threads=4)
    front = engine(spawn, [c.url for c in first], "--admin-token", "s3cret", "--rise", "3")
    auth = {"Authorization": "Bearer s3cret", "Content-Type": "application/json"}
    late_port = free_port()
    late_url = f"http://127.0.0.1:{late_port}"
    stop = threading.Event()
    statuses: Counter[int] = Counter()

    def load() -> None:
        while not stop.is_set():
            try:
                statuses[post_image(front.url + "/submit", small_jpeg)[0]] += 1
            except OSError:
                statuses[-1] += 1

    with ThreadPoolExecutor(4) as pool:
        loaders = [pool.submit(load) for _ in range(4)]
        time.sleep(0.3)
        # a server that is not up yet: added, but it takes no traffic until its checks pass
        status, _, raw = http("POST", front.url + "/backends", json.dumps({"url": late_url}).encode(), auth)
        assert status == 201 and json.loads(raw)["healthy"] is False, raw
        time.sleep(1.0)
        assert backends(front.url)[late_url]["healthy"] is False
        late = spawn("serve", "--port", str(late_port), "--backend", "sleep", "--service-time", "const:5ms",
                     "--threads", "4")  # fmt: skip
        assert wait_for(lambda: backends(front.url)[late_url]["healthy"], 10)
        came_up = served_by_server(late.url)
        assert wait_for(lambda: served_by_server(late.url) > came_up + 10, 10)
        # removing one drains it: its requests in flight finish, then no new one goes there
        status, _, raw = http("DELETE", front.url + f"/backends?url={first[0].url}", None, auth)
        assert status == 200 and json.loads(raw) == {"removed": first[0].url}
        assert first[0].url not in backends(front.url)
        time.sleep(0.5)
        after = served_by_server(first[0].url)
        time.sleep(0.5)
        assert served_by_server(first[0].url) == after
        stop.set()
        for f in loaders:
            f.result()
    assert set(statuses) == {200} and statuses[200] > 100, statuses
    assert any("backend_drained" in line for line in front.lines)


def test_the_admin_api_keeps_its_token_rules(three) -> None:
    url, urls = three
    body = json.dumps({"url": "http://127.0.0.1:9"}).encode()
    assert http("POST", url + "/backends", body, {"Authorization": "Bearer wrong"})[0] == 401
    assert http("POST", url + "/backends", body)[0] == 401
    bad = json.dumps({"url": "http://user:pw@127.0.0.1:9"}).encode()
    status, _, raw = http("POST", url + "/backends", bad, {"Authorization": "bearer s3cret"})  # scheme is any case
    assert status == 400 and "credentials" in json.loads(raw)["message"]
    status, _, raw = http("POST", url + "/backends", json.dumps({"url": urls[0]}).encode(),
                          {"Authorization": "BEARER s3cret"})  # fmt: skip
    assert status == 409 and json.loads(raw)["error"] == "conflict"
    assert http("DELETE", url + "/backends?url=http://127.0.0.1:9", None, {"Authorization": "Bearer s3cret"})[0] == 404


def test_without_a_token_membership_changes_are_forbidden(spawn, three_children) -> None:
    url = engine(spawn, [three_children[0].url]).url
    status, _, raw = http("POST", url + "/backends", json.dumps({"url": "http://127.0.0.1:9"}).encode(),
                          {"Authorization": "Bearer x"})  # fmt: skip
    assert status == 403 and json.loads(raw)["error"] == "forbidden"


def test_a_2x_overload_is_shed_without_marking_any_server_down(spawn, small_jpeg: bytes) -> None:
    # 3 servers of 20 ms with one worker: 150 req/s in all. Twice that, open loop, for 4 s.
    servers = sleep_children(spawn, 3, "const:20ms", max_queue=4)
    front = engine(spawn, [s.url for s in servers])
    url = front.url
    body, ctype = experiment_multipart(small_jpeg)
    records, _ = loadgen.run(loadgen.Target(url + "/submit", body, ctype),
                             loadgen.LoadSpec(rate=300, duration=4.0, warmup=0.5, seed=5))  # fmt: skip
    assert set(records.status) <= {200, 503}, Counter(records.status)
    assert 503 in records.status  # the servers shed
    ok = sum(1 for t, s in zip(records.intended, records.status, strict=True) if s == 200 and t >= 0.5)
    assert ok / 3.5 >= 0.8 * 150, ok / 3.5
    # shedding is not failure: no server was marked down, no client saw no_backend
    assert all(b["healthy"] for b in backends(url).values())
    assert not any("is DOWN" in line for line in front.lines)
    assert metrics(url)["imgclass_balancer_no_backend_total"] == 0


def test_the_queue_full_gives_a_json_503_with_retry_after(spawn, small_jpeg: bytes) -> None:
    urls = [c.url for c in sleep_children(spawn, 2, "const:300ms", threads=2)]
    url = engine(spawn, urls, "--max-conn", "1", "--queue-size", "2", "--queue-timeout", "5").url
    results = burst(url + "/submit", small_jpeg, 6, 6)
    codes = Counter(status for status, _, _ in results)
    assert codes[200] >= 4 and codes[503] >= 1 and set(codes) == {200, 503}, codes
    refused = [(h, doc) for status, h, doc in results if status == 503]
    assert all(doc["error"] == "queue_full" and h["Retry-After"] == "1" for h, doc in refused), refused
    assert metrics(url)['imgclass_balancer_queue_refused_total{reason="full"}'] >= 1


def test_a_queue_timeout_and_no_backend_give_json_503s(spawn, small_jpeg: bytes) -> None:
    slow = sleep_children(spawn, 1, "const:1s", threads=2)
    url = engine(spawn, [slow[0].url], "--max-conn", "1", "--queue-timeout", "0.2").url
    codes = sorted(status for status, _, _ in burst(url + "/submit", small_jpeg, 2, 2))
    assert codes == [200, 503], codes
    doomed = sleep_children(spawn, 2, "const:2ms")
    url = engine(spawn, [c.url for c in doomed], "--health-interval", "0.1", "--fall", "1").url
    for child in doomed:
        child.stop()
    assert wait_for(lambda: not any(b["healthy"] for b in backends(url).values()), 5)
    status, headers, doc = post_image(url + "/submit", small_jpeg)
    assert status == 503 and doc["error"] == "no_backend" and headers["Retry-After"] == "1", doc
    assert metrics(url)["imgclass_balancer_no_backend_total"] >= 1


def test_an_upload_over_the_limit_gets_413_as_json(three_children, spawn) -> None:
    url = engine(spawn, [three_children[0].url], "--max-upload-mb", "1").url
    body, ctype = multipart({"image": ("x.jpg", b"\xff" * 1_200_000, "image/jpeg")})
    status, headers, raw = http("POST", url + "/submit", body, {"Content-Type": ctype})
    assert status == 413 and json.loads(raw)["error"] == "payload_too_large" and headers["X-Request-ID"]


def test_haproxy_killed_is_restarted_with_its_membership(spawn, three_children, small_jpeg: bytes) -> None:
    front = engine(spawn, [c.url for c in three_children[:2]], "--admin-token", "t")
    auth = {"Authorization": "Bearer t"}
    assert http("POST", front.url + "/backends", json.dumps({"url": three_children[2].url}).encode(), auth)[0] == 201
    master = int(next(line for line in reversed(front.lines) if "haproxy_started" in line).split("pid=")[1].split()[0])
    worker = int(Path(f"/proc/{master}/task/{master}/children").read_text().split()[0])
    subprocess.run(["kill", "-9", str(worker)], check=True)
    assert wait_for(lambda: any("haproxy_restarted" in line for line in front.lines), 10)
    assert any("haproxy_died" in line and "exit=137" in line for line in front.lines)
    assert wait_for(lambda: post_image(front.url + "/submit", small_jpeg)[0] == 200, 5)
    assert list(backends(front.url)) == [c.url for c in three_children]
    assert metrics(front.url)["imgclass_balancer_engine_restarts_total"] == 1
    assert not Path(f"/proc/{master}").exists()


def test_sigterm_drains_and_leaves_no_process(spawn, three_children, small_jpeg: bytes) -> None:
    slow = sleep_children(spawn, 1, "const:500ms", threads=4)
    front = engine(spawn, [slow[0].url])
    family = descendants(front.pid)
    assert len(family) == 2  # HAProxy's master and its worker
    with ThreadPoolExecutor(3) as pool:
        pending = [pool.submit(post_image, front.url + "/submit", small_jpeg) for _ in range(3)]
        time.sleep(0.2)  # in flight at HAProxy
        front.proc.send_signal(signal.SIGTERM)
        assert [f.result()[0] for f in pending] == [200, 200, 200]  # drained, not dropped
    assert front.proc.wait(30) == 0
    assert any(" stopped " in line or line.endswith(" stopped") for line in front.lines)
    time.sleep(0.2)
    assert [p for p in family if Path(f"/proc/{p}").exists()] == []


def test_without_haproxy_the_engine_says_how_to_install_it() -> None:
    proc = subprocess.run([sys.executable, "-m", "imgclass", "balance", "--engine", "haproxy", "--port", "0",
                           "--backends", "http://127.0.0.1:9", "--haproxy", "/nonexistent/haproxy"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "apt-get install haproxy" in proc.stderr and "install_script.sh" in proc.stderr, proc.stderr


def test_a_client_that_leaves_the_queue_frees_its_place(spawn, small_jpeg: bytes) -> None:
    slow = sleep_children(spawn, 1, "const:1s", threads=2)
    url = engine(spawn, [slow[0].url], "--max-conn", "1").url
    body, ctype = multipart({"image": ("x.jpg", small_jpeg, "image/jpeg")})
    host, port = url.removeprefix("http://").split(":")
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(post_image, url + "/submit", small_jpeg)
        time.sleep(0.2)  # the first holds the server's one slot; the second waits in HAProxy's queue
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(f"POST /submit HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip
            time.sleep(0.3)
        assert first.result()[0] == 200
    time.sleep(1.2)
    assert served_by_server(slow[0].url) == 1  # the one that left never reached the server
    assert metrics(url)['imgclass_balancer_client_gone_total{stage="queued"}'] == 1
