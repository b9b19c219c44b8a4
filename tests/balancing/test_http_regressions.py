"""Integration: the three HTTP defects of the hand-written front end, against real model-server and
balancer processes over raw sockets: stray responses, lost keep-alive, and clients that leave."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from ..conftest import http
from ..web.test_http import closed_by_server, connect, nothing_more, read_response

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server_url(spawn) -> str:
    return spawn("serve", "--port", "0", "--backend", "sleep", "--service-time", "const:5ms", "--threads", "2").url


@pytest.fixture(scope="module")
def balancer_url(spawn, server_url: str) -> str:
    return spawn("balance", "--port", "0", "--backends", server_url).url


@pytest.fixture(params=["server", "balancer"])
def target(request: pytest.FixtureRequest, server_url: str, balancer_url: str) -> tuple[int, str]:
    """(port, the inference route) of a model server or of a balancer in front of one."""
    if request.param == "server":
        return int(server_url.rsplit(":", 1)[1]), "/predict"
    return int(balancer_url.rsplit(":", 1)[1]), "/submit"


def test_a_404_with_70_kb_gets_exactly_one_answer_and_the_connection_stays(target: tuple[int, str]) -> None:
    port, _ = target
    request = b"POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: 70000\r\n\r\n" + b"x" * 70_000
    with connect(port) as conn:
        buf = bytearray()
        conn.sendall(request)
        status, headers, raw = read_response(conn, buf)
        assert (status, json.loads(raw)["error"]) == (404, "not_found") and "connection" not in headers
        # before: an unrequested 431 headers_too_large with Connection: close followed
        assert nothing_more(conn, buf)
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(conn, buf)[0] == 200
        # and pipelined: the 404's body is not read as the next request's head
        conn.sendall(request + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        first, second = read_response(conn, buf), read_response(conn, buf)
        assert (first[0], second[0], json.loads(second[2])) == (404, 200, {"status": "alive"})
        assert "connection" not in second[1] and nothing_more(conn, buf)


def test_a_104_kb_photo_keeps_the_connection_alive(target: tuple[int, str], images_dir: Path) -> None:
    port, route = target
    photo = (images_dir / "cat_720p.jpg").read_bytes()
    assert len(photo) > 100_000
    with connect(port) as conn:
        buf = bytearray()
        for _ in range(2):
            conn.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                         % (route.encode(), len(photo)) + photo)  # fmt: skip
            status, headers, raw = read_response(conn, buf)
            assert status == 200, raw
            assert "connection" not in headers  # before: Connection: close on every photo over 64 KB
        assert not closed_by_server(conn, within=0.2)


def _metric(url: str, name: str) -> float:
    for line in http("GET", url + "/metrics")[2].decode().splitlines():
        if line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _post_and_leave(port: int, route: str, photo: bytes, wait: float) -> None:
    conn = socket.create_connection(("127.0.0.1", port), timeout=5)
    conn.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                 % (route.encode(), len(photo)) + photo)  # fmt: skip
    time.sleep(wait)
    conn.close()


def _wait_for(check, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def test_a_client_that_leaves_frees_its_queue_place_in_the_model_server(spawn, images_dir: Path) -> None:
    slow = spawn("serve", "--port", "0", "--backend", "sleep", "--service-time", "const:600ms", "--threads", "1")
    port = int(slow.url.rsplit(":", 1)[1])
    photo = (images_dir / "cat_720p.jpg").read_bytes()
    with connect(port) as busy:
        busy.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                     % len(photo) + photo)  # fmt: skip
        time.sleep(0.1)  # the one worker is busy with it
        _post_and_leave(port, "/predict", photo, 0.2)  # queued behind it, then gone
        assert read_response(busy, bytearray())[0] == 200
    assert _wait_for(lambda: _metric(slow.url, "imgclass_server_dropped_before_inference_total") == 1)
    assert _metric(slow.url, "imgclass_server_client_gone_total") == 1
    assert _metric(slow.url, "imgclass_server_queue_depth") == 0


def test_a_client_that_leaves_frees_its_balancer_queue_place_and_its_slot(spawn, images_dir: Path) -> None:
    backend = spawn("serve", "--port", "0", "--backend", "sleep", "--service-time", "const:800ms", "--threads", "4")
    front = spawn("balance", "--port", "0", "--backends", backend.url, "--max-conn", "1")
    port = int(front.url.rsplit(":", 1)[1])
    photo = (images_dir / "cat_720p.jpg").read_bytes()
    started = time.monotonic()
    # The first holds the one slot for 0.8 s and leaves after 0.3: the slot is freed then, not at 0.8 s.
    _post_and_leave(port, "/submit", photo, 0.3)
    assert _wait_for(lambda: json.loads(http("GET", front.url + "/backends")[2])[0]["in_flight"] == 0, 2)
    assert time.monotonic() - started < 0.75
    assert _metric(front.url, 'imgclass_balancer_client_gone_total{stage="forwarding"}') == 1
    # The model server saw its connection close and counts it too.
    assert _wait_for(lambda: _metric(backend.url, "imgclass_server_client_gone_total") == 1)
    # A second holds the slot; a third waits in the balancer's queue, then leaves.
    with connect(port) as holder:
        holder.sendall(b"POST /submit HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                       % len(photo) + photo)  # fmt: skip
        time.sleep(0.1)
        _post_and_leave(port, "/submit", photo, 0.2)
        assert _wait_for(lambda: _metric(front.url, "imgclass_balancer_queued") == 0, 1)
        assert _metric(front.url, 'imgclass_balancer_client_gone_total{stage="queued"}') == 1
        assert read_response(holder, bytearray())[0] == 200
