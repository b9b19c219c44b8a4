"""Fixtures for autoscaling: a real redis-server of our own per test, stopped afterwards; a small photo; a load."""

from __future__ import annotations

import io
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from imgclass.queue.redis_server import RedisServer

from ..conftest import http


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if not (shutil.which("redis-server") or Path("/usr/bin/redis-server").exists()):
        pytest.skip("redis-server missing: install the Debian package redis-server (./install_script.sh --dev)")
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def small_jpeg(images_dir: Path) -> bytes:
    buf = io.BytesIO()
    Image.open(images_dir / "parrot.jpg").convert("RGB").resize((64, 64)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def load(url: str, body: bytes, ctype: str, rate: float, seconds: float) -> list[int]:
    """Requests at a fixed rate from threads, each waiting for its answer; their statuses."""
    statuses: list[int] = []
    lock = threading.Lock()

    def one() -> None:
        status = http("POST", url, body, {"Content-Type": ctype}, timeout=60)[0]
        with lock:
            statuses.append(status)

    with ThreadPoolExecutor(64) as pool:
        started = time.monotonic()
        for k in range(int(rate * seconds)):
            time.sleep(max(0.0, started + k / rate - time.monotonic()))
            pool.submit(one)
    return statuses
