"""Integration: the testbed actuator over a real sshd, on two 'nodes' (folders) that it installs and starts."""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from imgclass import log
from imgclass.autoscale.nodes import TestbedNodes
from imgclass.autoscale.service import AutoscaleSettings, nodes_actuator
from imgclass.queue.redis_server import RedisServer

from ..conftest import free_port, http, multipart
from .conftest import load

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def cluster_file(tmp_path: Path, sshd: dict[str, str], redis_port: int) -> Path:
    def node(name: str, role: str, **extra: object) -> dict[str, object]:
        return {"name": name, "role": role, "control_host": "127.0.0.1", "control_port": int(sshd["port"]),
                "user": sshd["user"], "remote_dir": str(tmp_path / name), **extra}  # fmt: skip

    nodes = [
        node("balancer", "balancer", data_ip="127.0.0.1", redis_port=redis_port, service_port=free_port()),
        node("node1", "server", data_ip="127.0.0.1", service_port=free_port()),
        node("node2", "server", data_ip="127.0.0.1", service_port=free_port()),
    ]
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps({"nodes": nodes}))
    return path


def settings_for(cluster: Path, sshd: dict[str, str], model_dir: Path, **overrides: object) -> AutoscaleSettings:
    return AutoscaleSettings.make(
        actuator="testbed", cluster=str(cluster), ssh_key=sshd["key"], known_hosts=sshd["known_hosts"], scale_max=2,
        backend="sleep", service_time="const:150ms", model_dir=str(model_dir), log_level="WARNING", **overrides,
    )  # fmt: skip


def answers(port: int, path: str) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 1):
            pass
    except OSError:
        return False
    return http("GET", f"http://127.0.0.1:{port}{path}")[0] == 200


def run(loop: asyncio.AbstractEventLoop, actuator: TestbedNodes, count: int) -> None:
    loop.run_until_complete(actuator.scale_to(count))


def under_load(url: str, body: bytes, ctype: str, rate: float, seconds: float) -> tuple[threading.Thread, dict]:
    result: dict[str, list[int]] = {}
    thread = threading.Thread(target=lambda: result.update(s=load(url, body, ctype, rate, seconds)))
    thread.start()
    return thread, result


def test_testbed_nodes_are_installed_started_adopted_and_stopped_over_ssh(
    tmp_path: Path, sshd: dict[str, str], model_dir: Path, spawn: Callable, redis_server: RedisServer,
    small_jpeg: bytes,
) -> None:  # fmt: skip
    cluster = cluster_file(tmp_path, sshd, redis_server.port)
    logger = log.get_logger("t", "autoscale", "WARNING")
    nodes = json.loads(cluster.read_text())["nodes"][1:]
    ports = [n["service_port"] for n in nodes]
    body, ctype = multipart({"image": ("x.jpg", small_jpeg, "image/jpeg")})
    queue = nodes_actuator(settings_for(cluster, sshd, model_dir, dispatch="queue", redis=redis_server.url), logger)
    assert isinstance(queue, TestbedNodes)
    loop = asyncio.new_event_loop()
    try:
        # queue mode: neither node has the project; scaling to 2 copies and installs it, then starts a worker on each
        run(loop, queue, 2)
        assert queue.ready == 2 and all(answers(p, "/healthz") for p in ports)
        assert (tmp_path / "node1" / ".venv" / "bin" / "imgclass").exists()
        front = spawn("balance", "--dispatch", "queue", "--port", "0", "--redis", redis_server.url).url
        thread, result = under_load(front + "/submit", body, ctype, 8, 5)
        time.sleep(1.5)
        run(loop, queue, 1)  # the node that joined last drains (SIGTERM) while jobs keep coming
        thread.join(90)
        loop.run_until_complete(queue.close())
        assert len(result["s"]) == 40 and set(result["s"]) == {200}, result
        counts = {k.decode(): int(v) for k, v in redis.Redis.from_url(redis_server.url).hgetall("imgclass:stats").items()}
        assert counts.get("enqueued") == counts.get("finished") == 40 and not counts.get("dead_lettered"), counts
        assert answers(ports[0], "/healthz") and not answers(ports[1], "/healthz")
        assert not (tmp_path / "node2" / "imgclass-worker.pid").exists()

        # a new controller adopts the worker still serving instead of starting another
        pid = (tmp_path / "node1" / "imgclass-worker.pid").read_text()
        again = nodes_actuator(settings_for(cluster, sshd, model_dir, dispatch="queue", redis=redis_server.url),
                                 logger)  # fmt: skip
        assert isinstance(again, TestbedNodes)
        run(loop, again, 1)
        assert again.ready == 1 and (tmp_path / "node1" / "imgclass-worker.pid").read_text() == pid
        run(loop, again, 0)  # the pool's bounds are the controller's; the actuator empties on request
        loop.run_until_complete(again.close())
        assert not answers(ports[0], "/healthz")

        # push mode on the same nodes: servers join the balancer at their data address, and leave it first
        token = secrets.token_hex(16)
        balancer = spawn("balance", "--port", "0", "--health-interval", "0.5", "--policy", "least_outstanding",
                         env={"IMGCLASS_ADMIN_TOKEN": token}).url  # fmt: skip
        push = nodes_actuator(settings_for(cluster, sshd, model_dir, dispatch="push", balancer_url=balancer,
                                             admin_token=token), logger)  # fmt: skip
        assert isinstance(push, TestbedNodes)
        run(loop, push, 2)
        listed = {b["url"] for b in json.loads(http("GET", balancer + "/backends")[2])}
        assert listed == {f"http://127.0.0.1:{p}" for p in ports}
        thread, result = under_load(balancer + "/predict", body, ctype, 10, 5)
        time.sleep(1.5)
        run(loop, push, 1)
        assert len(json.loads(http("GET", balancer + "/backends")[2])) == 1
        run(loop, push, 2)  # node2 is still draining: not taken again (its late stop would kill the new server)
        assert push.ready == 1
        thread.join(90)
        loop.run_until_complete(push.close())
        assert len(result["s"]) == 50 and set(result["s"]) == {200}, result
        assert not answers(ports[1], "/readyz")

        # a new controller adopts the server the balancer lists already (its add is a 409), then grows
        pid = (tmp_path / "node1" / "imgclass-server.pid").read_text()
        again = nodes_actuator(settings_for(cluster, sshd, model_dir, dispatch="push", balancer_url=balancer,
                                            admin_token=token), logger)  # fmt: skip
        assert isinstance(again, TestbedNodes)
        loop.run_until_complete(again.adopt())
        assert again.ready == 1 and (tmp_path / "node1" / "imgclass-server.pid").read_text() == pid
        run(loop, again, 2)
        assert again.ready == 2 and len(json.loads(http("GET", balancer + "/backends")[2])) == 2
        loop.run_until_complete(again.close())
    finally:
        # whatever the test reached: nothing it started on the nodes outlives it
        for target in queue.nodes:
            for process in ("worker", "server"):
                queue.deployer.stop_process(target, process, 5)
        loop.close()
    for port in ports:
        assert not answers(port, "/healthz")
