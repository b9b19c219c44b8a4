"""Integration: the balancer in front of real model-server processes on ephemeral ports."""

from __future__ import annotations

import io
import json
import os
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

from ..conftest import descendants, http, multipart, post_image

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def small_jpeg(images_dir: Path) -> bytes:
    buf = io.BytesIO()
    Image.open(images_dir / "parrot.jpg").convert("RGB").resize((64, 64)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def sleep_children(spawn, n: int, service: str = "const:2ms") -> list:
    children = [spawn("serve", "--port", "0", "--backend", "sleep", "--service-time", service, "--threads", "1",
                      wait=False) for _ in range(n)]  # fmt: skip
    for child in children:
        child.wait_url()
    return children


def sleep_servers(spawn, n: int, service: str = "const:2ms") -> list[str]:
    return [c.url for c in sleep_children(spawn, n, service)]


def balancer(spawn, backends: list[str], *extra: str, env: dict[str, str] | None = None) -> str:
    return spawn("balance", "--port", "0", "--backends", ",".join(backends), "--seed", "7", *extra, env=env).url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def burst(url: str, data: bytes, n: int, workers: int, **fields: str) -> list[tuple[int, dict[str, str], dict]]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda _: post_image(url, data, "x.jpg", **fields), range(n)))


@pytest.fixture(scope="module")
def three_children(spawn) -> list:
    return sleep_children(spawn, 3)


@pytest.fixture(scope="module")
def three(spawn, three_children) -> tuple[str, list[str]]:
    backends = [c.url for c in three_children]
    return balancer(spawn, backends, "--health-interval", "0.5"), backends


def test_submit_response_and_request_id(three, three_children, small_jpeg: bytes) -> None:
    url, backends = three
    body, ctype = multipart({"image": ("x.jpg", small_jpeg, "image/jpeg")})
    status, headers, raw = http("POST", url + "/submit?top=2", body, {"Content-Type": ctype, "X-Request-ID": "req-77"})
    doc = json.loads(raw)
    assert status == 200, doc
    assert doc["backend"] in backends and headers["X-Backend"] == doc["backend"]
    assert headers["X-Request-ID"] == "req-77"
    assert len(doc["predictions"]) == 2  # top= passed through
    assert {"balancer", "upstream", "infer", "total"} <= set(doc["timing_ms"])
    assert doc["timing_ms"]["upstream"] >= doc["timing_ms"]["total"]
    # the same id is in the model server's own log line: one request, followed across processes
    time.sleep(0.2)
    served_by = next(c for c in three_children if c.url == doc["backend"])
    assert any("server predict request_id=req-77 " in line for line in served_by.lines)


def test_random_dispatch_is_uniform(three, small_jpeg: bytes) -> None:
    url, backends = three
    results = burst(url + "/submit?policy=random", small_jpeg, 600, 8)
    assert all(s == 200 for s, _, _ in results)
    counts = Counter(doc["backend"] for _, _, doc in results)
    observed = [counts[b] for b in backends]
    assert chisquare(observed).pvalue > 0.001, observed


def test_number_backend_servers_restricts_choice(three, small_jpeg: bytes) -> None:
    url, backends = three
    by_query = burst(url + "/submit?number_backend_servers=2", small_jpeg, 60, 6)
    assert {doc["backend"] for _, _, doc in by_query} == set(backends[:2])
    by_form = burst(url + "/submit", small_jpeg, 30, 6, number_backend_servers="1")
    assert {doc["backend"] for _, _, doc in by_form} == {backends[0]}
    for bad in ("0", "4", "x"):  # three backends
        status, _, doc = post_image(url + f"/submit?number_backend_servers={bad}", small_jpeg)
        assert status == 400 and doc["error"] == "bad_parameter" and "from 1 to 3" in doc["message"]


def test_round_robin_cycles(three, small_jpeg: bytes) -> None:
    url, backends = three
    seen = [post_image(url + "/submit?policy=round_robin", small_jpeg)[2]["backend"] for _ in range(9)]
    first = backends.index(seen[0])
    assert seen == [backends[(first + i) % 3] for i in range(9)]


def test_bad_policy_is_400(three, small_jpeg: bytes) -> None:
    status, _, doc = post_image(three[0] + "/submit?policy=fastest", small_jpeg)
    assert status == 400 and doc["error"] == "bad_parameter"


def test_backend_errors_pass_through(three) -> None:
    body, ctype = multipart({"image": ("x.txt", b"not an image at all" * 10, "text/plain")})
    status, headers, raw = http("POST", three[0] + "/submit", body, {"Content-Type": ctype})
    assert status == 400 and json.loads(raw)["error"] == "not_an_image" and headers["X-Backend"]


@pytest.mark.parametrize("policy", ["least_outstanding", "p2c"])
def test_load_aware_policies_avoid_a_slow_backend(spawn, small_jpeg: bytes, policy: str) -> None:
    slow = sleep_servers(spawn, 1, "const:300ms")
    fast = sleep_servers(spawn, 2, "const:5ms")
    url = balancer(spawn, slow + fast, "--policy", policy)
    results = burst(url + "/submit", small_jpeg, 120, 6)
    assert all(s == 200 for s, _, _ in results)
    share = Counter(doc["backend"] for _, _, doc in results)[slow[0]] / len(results)
    # random would give the slow backend a third of the requests
    assert share < (0.08 if policy == "least_outstanding" else 0.2), share


def test_backend_killed_mid_burst_costs_no_client_an_error(spawn, small_jpeg: bytes) -> None:
    ports = [free_port() for _ in range(3)]
    victims = [spawn("serve", "--port", str(p), "--backend", "sleep", "--service-time", "const:10ms", "--threads",
                     "2", wait=False) for p in ports]  # fmt: skip
    backends = [v.wait_url() for v in victims]
    front = spawn("balance", "--port", "0", "--backends", ",".join(backends), "--seed", "7", "--health-interval", "0.2",
                  "--eject-seconds", "1")  # fmt: skip
    url = front.url
    done = Counter()
    lock = threading.Lock()

    answers: list[tuple[int, dict]] = []

    def one(_: int) -> int:
        try:
            status, _, doc = post_image(url + "/submit", small_jpeg)
        except OSError as exc:  # e.g. no answer in 30 s: reported with the balancer's log below
            status, doc = -1, {"client": repr(exc)}
        with lock:
            done["n"] += 1
            answers.append((status, doc))
        return status

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(one, i) for i in range(200)]
        deadline = time.monotonic() + 30
        while done["n"] < 50 and time.monotonic() < deadline:
            time.sleep(0.005)
        victims[0].proc.send_signal(signal.SIGKILL)
        statuses = [f.result() for f in futures]
    assert statuses.count(200) == 200, (
        Counter(statuses),
        [doc for status, doc in answers if status != 200][:5],
        "\n".join(line for line in front.lines if " status=200 " not in line)[-6000:],
    )
    state = {b["url"]: b for b in json.loads(http("GET", url + "/backends")[2])}
    time.sleep(1.0)  # three failed checks at 0.2 s
    state = {b["url"]: b for b in json.loads(http("GET", url + "/backends")[2])}
    assert state[backends[0]]["healthy"] is False
    metrics = http("GET", url + "/metrics")[2].decode()
    assert "imgclass_balancer_retries_total" in metrics
    # restart on the same port: rise (2 checks) and the ejection timer readmit it
    spawn("serve", "--port", str(ports[0]), "--backend", "sleep", "--service-time", "const:10ms")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        state = {b["url"]: b for b in json.loads(http("GET", url + "/backends")[2])}
        if state[backends[0]]["available"]:
            break
        time.sleep(0.1)
    assert state[backends[0]]["healthy"] and state[backends[0]]["available"]
    served_before = state[backends[0]]["served"]
    burst(url + "/submit?policy=round_robin", small_jpeg, 9, 1)
    after = {b["url"]: b for b in json.loads(http("GET", url + "/backends")[2])}
    assert after[backends[0]]["served"] >= served_before + 3


def test_each_access_log_line_carries_its_own_request_id(spawn, small_jpeg: bytes) -> None:
    # Replies on the fast path come from the upstream connection's callback, which runs in the
    # context of whichever request last set the log's request id: the line must still be ours.
    front = spawn("balance", "--port", "0", "--backends", ",".join(sleep_servers(spawn, 2, "const:20ms")),
                  "--log-level", "INFO")  # fmt: skip
    body, ctype = multipart({"image": ("x.jpg", small_jpeg, "application/octet-stream")})
    ids = [f"rid-{i:03d}" for i in range(48)]

    def one(rid: str) -> str:
        status, headers, _ = http("POST", front.url + "/submit", body, {"Content-Type": ctype, "X-Request-ID": rid})
        assert status == 200
        return headers["X-Request-ID"]

    with ThreadPoolExecutor(12) as pool:
        assert list(pool.map(one, ids)) == ids
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        logged = [line.split("request_id=")[1].split()[0] for line in list(front.lines) if " submit " in line]
        if len(logged) >= len(ids):
            break
        time.sleep(0.05)
    assert sorted(logged) == ids


def test_all_backends_down_is_503(spawn, small_jpeg: bytes) -> None:
    url = balancer(spawn, [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"])
    status, headers, doc = post_image(url + "/submit", small_jpeg)
    assert status == 503 and doc["error"] == "no_backend" and int(headers["Retry-After"]) >= 1
    listed = json.loads(http("GET", url + "/backends")[2])
    assert [b["healthy"] for b in listed] == [False, False]
    assert http("GET", url + "/healthz")[0] == 200


def test_upstream_timeout_is_504(spawn, small_jpeg: bytes) -> None:
    slow = sleep_servers(spawn, 1, "const:2s")
    url = balancer(spawn, slow, "--timeout", "0.3")
    status, _, doc = post_image(url + "/submit", small_jpeg)
    assert status == 504 and doc["error"] == "upstream_timeout"


def test_connection_refused_is_retried_on_another_backend(spawn, small_jpeg: bytes) -> None:
    good = sleep_servers(spawn, 1)
    doomed = spawn("serve", "--port", "0", "--backend", "sleep", "--service-time", "const:2ms")
    # a long health interval, so only real traffic can discover that the second backend died
    url = spawn("balance", "--port", "0", "--backends", f"{good[0]},{doomed.url}", "--health-interval", "60").url
    doomed.proc.send_signal(signal.SIGKILL)
    doomed.proc.wait(10)
    results = burst(url + "/submit?policy=round_robin", small_jpeg, 10, 1)
    assert [s for s, _, _ in results] == [200] * 10
    assert {doc["backend"] for _, _, doc in results} == {good[0]}
    state = {b["url"]: b for b in json.loads(http("GET", url + "/backends")[2])}
    assert state[doomed.url]["failures"] >= 1 and state[doomed.url]["ejected_until"] is not None
    assert state[doomed.url]["healthy"] is True  # no active check ran: passive ejection did the work
    retries = next(line for line in http("GET", url + "/metrics")[2].decode().splitlines()
                   if line.startswith("imgclass_balancer_retries_total"))  # fmt: skip
    assert float(retries.split()[-1]) >= 1


def test_a_backend_that_stops_completing_handshakes_costs_one_connect_timeout(spawn, small_jpeg: bytes) -> None:
    # A listener that stops accepting, with its accept queue full, drops new SYNs, as a frozen
    # host or a firewall does: the connect times out (--connect-timeout) and the request goes to
    # another backend. Until then it answers the balancer's health check, so it starts healthy.
    good = sleep_servers(spawn, 1)
    frozen_now = threading.Event()
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        listener.settimeout(0.05)
        frozen = f"http://127.0.0.1:{listener.getsockname()[1]}"

        def answer_until_frozen() -> None:
            while not frozen_now.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                with conn:
                    conn.settimeout(5)
                    conn.recv(65536)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")

        thread = threading.Thread(target=answer_until_frozen, daemon=True)
        thread.start()
        url = spawn("balance", "--port", "0", "--backends", f"{frozen},{good[0]}", "--connect-timeout", "0.3",
                    "--health-interval", "60").url  # fmt: skip
        assert all(b["available"] for b in json.loads(http("GET", url + "/backends")[2]))
        frozen_now.set()
        thread.join(5)
        filler.connect(listener.getsockname())  # the queue of one is now full
        results = burst(url + "/submit?policy=round_robin", small_jpeg, 4, 1)
        assert [s for s, _, _ in results] == [200] * 4
        assert {doc["backend"] for _, _, doc in results} == {good[0]}
        assert max(doc["timing_ms"]["balancer"] for _, _, doc in results) >= 300  # one waited out the timeout
        state = {b["url"]: b for b in json.loads(http("GET", url + "/backends")[2])}
        assert state[frozen]["failures"] >= 1 and state[frozen]["ejected_until"] is not None


def test_admin_membership(spawn, small_jpeg: bytes) -> None:
    backends = sleep_servers(spawn, 2)
    no_token = balancer(spawn, backends[:1])
    status, _, raw = http("POST", no_token + "/backends", json.dumps({"url": backends[1]}).encode())
    assert status == 403 and json.loads(raw)["error"] == "forbidden"

    url = balancer(spawn, backends[:1], env={"IMGCLASS_ADMIN_TOKEN": "s3cret"})
    body = json.dumps({"url": backends[1]}).encode()
    assert http("POST", url + "/backends", body)[0] == 401
    assert http("POST", url + "/backends", body, {"Authorization": "Bearer wrong"})[0] == 401
    auth = {"Authorization": "Bearer s3cret", "Content-Type": "application/json"}
    status, _, raw = http("POST", url + "/backends", body, auth)
    assert status == 201 and json.loads(raw)["healthy"] is True
    assert http("POST", url + "/backends", body, auth)[0] == 409
    assert http("POST", url + "/backends", b'{"url": "ftp://x"}', auth)[0] == 400
    listed = json.loads(http("GET", url + "/backends")[2])
    assert [b["url"] for b in listed] == backends
    assert set(listed[0]) >= {"url", "healthy", "in_flight", "served", "failures", "ejected_until", "latency_p50_ms"}
    served = Counter(post_image(url + "/submit?policy=round_robin", small_jpeg)[2]["backend"] for _ in range(4))
    assert served == {backends[0]: 2, backends[1]: 2}
    assert http("DELETE", url + f"/backends?url={backends[1]}", None, auth)[0] == 200
    assert http("DELETE", url + f"/backends?url={backends[1]}", None, auth)[0] == 404
    assert http("DELETE", url + f"/backends?url={backends[0]}", None, {})[0] == 401
    assert [b["url"] for b in json.loads(http("GET", url + "/backends")[2])] == backends[:1]


def test_balancer_metrics(three, small_jpeg: bytes) -> None:
    post_image(three[0] + "/submit", small_jpeg)
    text = http("GET", three[0] + "/metrics")[2].decode()
    assert 'imgclass_balancer_requests_total{backend="http://127.0.0.1:' in text
    assert "imgclass_balancer_request_seconds_bucket" in text
    assert "imgclass_balancer_retries_total" in text


def test_page_is_served_offline(three) -> None:
    status, headers, raw = http("GET", three[0] + "/")
    page = raw.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert 'fetch(url, { method: "POST"' in page and '"submit"' in page
    assert "http://" not in page and "https://" not in page  # no CDN, no hard-coded host


def test_balancer_needs_backends() -> None:
    proc = subprocess.run([sys.executable, "load_balancer.py", "--port", "0"], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parents[2],
                          env={k: v for k, v in os.environ.items() if k != "IMGCLASS_BACKENDS"})  # fmt: skip
    assert proc.returncode == 2 and "--backends" in proc.stderr and "Traceback" not in proc.stderr


def test_up_leaves_no_process_behind(model_dir: Path, small_jpeg: bytes) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgclass", "up", "--servers", "3", "--backend", "sleep", "--service-time",
         "const:2ms", "--port", "0", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "IMGCLASS_MODEL_DIR": str(model_dir)},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "imgclass is up" in line, line
        url = line.split(" behind ")[1].split("/  ")[0]
        assert post_image(url + "/submit", small_jpeg)[0] == 200
        children = descendants(proc.pid)
        assert len(children) == 4  # three servers and the balancer
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        time.sleep(0.2)
        alive = [p for p in children if Path(f"/proc/{p}").exists()]
        assert alive == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]


def test_max_conn_queues_at_the_balancer_and_bounds_the_queue(spawn, small_jpeg: bytes) -> None:
    """--max-conn 1 over 2 servers of 300 ms: a burst of 4 runs 2 at a time; the queue holds 2 more, then 503."""
    backends = sleep_servers(spawn, 2, "const:300ms")
    url = balancer(spawn, backends, "--max-conn", "1", "--queue-size", "2", "--queue-timeout", "5")
    results = burst(url + "/submit", small_jpeg, 5, 5)
    codes = Counter(status for status, _, _ in results)
    assert codes == {200: 4, 503: 1}, codes
    refused = next((h, doc) for status, h, doc in results if status == 503)
    assert refused[1]["error"] == "queue_full" and refused[0]["Retry-After"] == "1"
    queued = sorted(doc["timing_ms"]["queued"] for status, _, doc in results if status == 200)
    # two went at once; two waited for a server to finish its 300 ms
    assert queued[1] < 100 and queued[2] > 200, queued
    # no server ever held two: each request's server-side queue stayed empty
    assert all(doc["timing_ms"]["queue"] < 100 for status, _, doc in results if status == 200)
    status, _, raw = http("GET", url + "/metrics")
    assert status == 200
    text = raw.decode()
    assert 'imgclass_balancer_queue_refused_total{reason="full"} 1.0' in text
    assert "imgclass_balancer_queued 0.0" in text


def test_queue_timeout_answers_503(spawn, small_jpeg: bytes) -> None:
    backends = sleep_servers(spawn, 1, "const:1s")
    url = balancer(spawn, backends, "--max-conn", "1", "--queue-timeout", "0.2")
    results = burst(url + "/submit", small_jpeg, 2, 2)
    codes = sorted(status for status, _, _ in results)
    assert codes == [200, 503], codes
    doc = next(doc for status, _, doc in results if status == 503)
    assert doc["error"] == "queue_timeout"
