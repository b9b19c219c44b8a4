"""The testbed deploy passes --engine haproxy to the balancer, with and without systemd (dry runs: nothing is touched)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _cluster(tmp_path: Path) -> Path:
    nodes = [
        {"role": "server", "name": "server1", "control_host": "127.0.0.1", "control_port": 22, "user": "u",
         "data_ip": "10.10.1.1", "service_port": 5001, "remote_dir": str(tmp_path / "node1")},
        {"role": "balancer", "name": "balancer", "control_host": "127.0.0.1", "control_port": 22, "user": "u",
         "service_port": 5000, "remote_dir": str(tmp_path / "node2")},
    ]  # fmt: skip
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps({"nodes": nodes}))
    return path


def _deploy(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "imgclass", "testbed", "deploy", *args, "--dry-run"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_deploy_engine_haproxy_reaches_the_balancer(tmp_path: Path) -> None:
    cluster = str(_cluster(tmp_path))
    plain = _deploy("--cluster", cluster, "--engine", "haproxy")
    balance = next(line for line in plain.splitlines() if "imgclass balance" in line)
    assert "--engine haproxy" in balance and "--backends http://10.10.1.1:5001" in balance
    assert "--engine" not in next(line for line in plain.splitlines() if "imgclass serve" in line)
    # under systemd, the flags become the unit's IMGCLASS_* variables
    units = _deploy("--cluster", cluster, "--engine", "haproxy", "--systemd")
    assert "IMGCLASS_ENGINE=haproxy" in units
    assert "--engine" not in _deploy("--cluster", cluster) and "IMGCLASS_ENGINE" not in _deploy("--cluster", cluster,
                                                                                                  "--systemd")
    assert not (tmp_path / "node1").exists() and not (tmp_path / "node2").exists()
