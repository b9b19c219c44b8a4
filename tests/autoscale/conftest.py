"""Fixtures for autoscaling: a real redis-server of our own per test, stopped afterwards."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgclass.queue.redis_server import RedisServer


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
