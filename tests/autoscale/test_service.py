"""Unit: how `imgclass autoscale` builds its actuator from its settings (no sockets, no SSH)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imgclass import log
from imgclass.autoscale.nodes import TestbedNodes
from imgclass.autoscale.service import AutoscaleSettings, nodes_actuator
from imgclass.errors import ConfigError

LOGGER = log.get_logger("t", "autoscale", "WARNING")


def cluster(tmp_path: Path, servers: int, balancer: bool = True) -> str:
    nodes = [{"name": f"node{k}", "role": "server", "control_host": f"10.0.0.{k}", "user": "u",
              "data_ip": f"10.10.{k}.1", "service_port": 5001} for k in range(1, servers + 1)]  # fmt: skip
    if balancer:
        nodes.append({"name": "balancer", "role": "balancer", "control_host": "10.0.0.9", "user": "u",
                      "data_ips": [f"10.10.{k}.2" for k in range(1, servers + 1)], "redis_port": 6390})  # fmt: skip
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps({"nodes": nodes}))
    return str(path)


def settings(**overrides: object) -> AutoscaleSettings:
    return AutoscaleSettings.make(actuator="testbed", scale_max=2, backend="sleep", **overrides)


def test_queue_workers_reach_redis_over_their_own_link_and_listen_on_their_service_port(tmp_path: Path) -> None:
    actuator = nodes_actuator(settings(cluster=cluster(tmp_path, 2), dispatch="queue", redis="redis://x:1/0",
                                         model_dir="/srv/models"), LOGGER)  # fmt: skip
    assert isinstance(actuator, TestbedNodes) and actuator.process == "worker"
    assert [n.name for n in actuator.nodes] == ["node1", "node2"]
    args = actuator.args_of(actuator.nodes[1])
    assert args[args.index("--redis") + 1] == "redis://10.10.2.2:6390/0"
    assert args[args.index("--port") + 1] == "5001" and args[args.index("--host") + 1] == "0.0.0.0"
    assert args[args.index("--model-dir") + 1] == "/srv/models" and actuator.model_dir == "/srv/models"


def test_push_servers_join_at_their_data_address_and_a_relative_model_dir_stays_the_nodes_own(tmp_path: Path) -> None:
    actuator = nodes_actuator(settings(cluster=cluster(tmp_path, 2), dispatch="push", balancer_url="http://b:5000",
                                         admin_token="t", model_dir="models"), LOGGER)  # fmt: skip
    assert isinstance(actuator, TestbedNodes) and actuator.process == "server" and actuator.admin is not None
    assert actuator.url_of(actuator.nodes[0]) == "http://10.10.1.1:5001"
    assert "--model-dir" not in actuator.args_of(actuator.nodes[0]) and actuator.model_dir is None


@pytest.mark.parametrize(
    ("servers", "balancer", "overrides", "message"),
    [
        (1, True, {"dispatch": "queue", "redis": "redis://x:1/0"}, "fewer than --max 2"),
        (2, False, {"dispatch": "queue", "redis": "redis://x:1/0"}, "exactly one balancer node"),
    ],
)
def test_a_cluster_that_cannot_serve_the_bounds_fails_at_startup(
    tmp_path: Path, servers: int, balancer: bool, overrides: dict, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        nodes_actuator(settings(cluster=cluster(tmp_path, servers, balancer), **overrides), LOGGER)


def test_the_nodes_actuator_needs_a_cluster() -> None:
    import argparse

    ns = argparse.Namespace(**vars(settings(dispatch="queue", redis="redis://x:1/0")))
    with pytest.raises(ConfigError, match="--cluster"):
        AutoscaleSettings.from_namespace(ns)
