"""What the engine-mode tests share: finding haproxy (or skipping with how to install it), and starting engine mode."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from imgclass.process import Child

from ..conftest import http, post_image

SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")
HAPROXY = shutil.which("haproxy", path=os.pathsep.join([os.environ.get("PATH", os.defpath), *SBIN]))
NO_HAPROXY = ("haproxy is not installed: ./install_script.sh --dev installs the Debian package haproxy "
              "(or: sudo apt-get install haproxy)")  # fmt: skip


def require_haproxy() -> str:
    if HAPROXY is None:
        pytest.skip(NO_HAPROXY)
    return HAPROXY


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sleep_children(spawn: Callable[..., Child], n: int, service: str = "const:2ms", threads: int = 1,
                   max_queue: int = 1024, ports: list[int] | None = None) -> list[Child]:  # fmt: skip
    children = [spawn("serve", "--port", str(ports[i] if ports else 0), "--backend", "sleep", "--service-time", service,
                      "--threads", str(threads), "--max-queue", str(max_queue), wait=False) for i in range(n)]  # fmt: skip
    for child in children:
        child.wait_url()
    return children


def engine(spawn: Callable[..., Child], backends: list[str], *extra: str, env: dict[str, str] | None = None) -> Child:
    """`imgclass balance --engine haproxy` in front of `backends`, checks every 0.2 s."""
    return spawn("balance", "--engine", "haproxy", "--port", "0", "--backends", ",".join(backends),
                 "--health-interval", "0.2", *extra, env=env)  # fmt: skip


def backends(url: str) -> dict[str, dict]:
    return {b["url"]: b for b in json.loads(http("GET", url + "/backends")[2])}


def wait_for(check: Callable[[], bool], timeout: float = 15.0, every: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(every)
    return check()


def metrics(url: str) -> dict[str, float]:
    """Prometheus text as {sample with labels: value}."""
    out = {}
    for line in http("GET", url + "/metrics")[2].decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def served_by_server(url: str) -> int:
    """A model server's own count of the /predict requests it answered with 200."""
    return int(metrics(url).get('imgclass_server_requests_total{route="/predict",status="200"}', 0))


def burst(url: str, data: bytes, n: int, workers: int, **fields: str) -> list[tuple[int, dict[str, str], dict]]:
    def one(_: int) -> tuple[int, dict[str, str], dict]:
        try:
            return post_image(url, data, "x.jpg", **fields)
        except OSError as exc:
            return -1, {}, {"client": repr(exc)}

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, range(n)))
