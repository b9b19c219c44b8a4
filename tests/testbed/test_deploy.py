"""Deploy over SSH for real: an OpenSSH server on 127.0.0.1 and two 'nodes' in different folders."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from ..conftest import free_port, multipart

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _cluster(tmp_path: Path, ssh_port: str, user: str) -> tuple[Path, int, int]:
    server_port, balancer_port, redis_port = free_port(), free_port(), free_port()
    nodes = [
        {"role": "server", "name": "server1", "control_host": "127.0.0.1", "control_port": int(ssh_port),
         "user": user, "data_ip": "127.0.0.1", "service_port": server_port, "remote_dir": str(tmp_path / "node1")},
        {"role": "balancer", "name": "balancer", "control_host": "127.0.0.1", "control_port": int(ssh_port),
         "user": user, "service_port": balancer_port, "remote_dir": str(tmp_path / "node2"),
         "redis_port": redis_port},
    ]  # fmt: skip
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps({"nodes": nodes}))
    return path, server_port, balancer_port


def _testbed(*args: str, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "imgclass", "testbed", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)  # fmt: skip


def test_dry_run_prints_every_command_and_touches_nothing(tmp_path: Path, sshd: dict[str, str]) -> None:
    cluster, _, _ = _cluster(tmp_path, sshd["port"], sshd["user"])
    proc = _testbed("deploy", "--cluster", str(cluster), "--key", sshd["key"], "--dry-run")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.count("tar -czf -") == 2 and out.count("install_script.sh --role") == 2
    assert "imgclass serve" in out and "imgclass balance" in out and f"-p {sshd['port']}" in out
    assert not (tmp_path / "node1").exists() and not (tmp_path / "node2").exists()
    queue = _testbed("deploy", "--cluster", str(cluster), "--key", sshd["key"], "--dry-run", "--dispatch", "queue")
    assert queue.returncode == 0, queue.stderr
    assert "imgclass redis" in queue.stdout and "imgclass worker" in queue.stdout and "imgclass serve" not in queue.stdout
    assert "--dispatch queue" in queue.stdout


def test_deploy_status_stop_against_a_real_sshd(
    tmp_path: Path, sshd: dict[str, str], model_dir: Path, images_dir: Path
) -> None:
    cluster, server_port, balancer_port = _cluster(tmp_path, sshd["port"], sshd["user"])
    common = ["--cluster", str(cluster), "--key", sshd["key"], "--known-hosts", sshd["known_hosts"]]
    try:
        proc = _testbed("deploy", *common, "--model-dir", str(model_dir))
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert (tmp_path / "node1" / ".venv" / "bin" / "imgclass").exists()
        assert (tmp_path / "node2" / "server_script.py").exists()
        buf = io.BytesIO()
        Image.open(images_dir / "parrot.jpg").convert("RGB").resize((224, 224)).save(buf, "JPEG")
        body, ctype = multipart({"image": ("p.jpg", buf.getvalue(), "image/jpeg")})
        req = urllib.request.Request(f"http://127.0.0.1:{balancer_port}/submit", data=body,
                                     headers={"Content-Type": ctype})  # fmt: skip
        with urllib.request.urlopen(req, timeout=30) as response:
            doc = json.loads(response.read())
        assert doc["predictions"][0]["index"] == 88 and doc["server"] == "server1"
        status = _testbed("status", *common, timeout=120)
        assert status.returncode == 0, status.stderr
        assert "server1" in status.stdout and "balancer" in status.stdout and "down" not in status.stdout
        # the same nodes, redeployed in queue mode: Redis and the front on the balancer, a worker on the server
        proc = _testbed("deploy", *common, "--model-dir", str(model_dir), "--dispatch", "queue")
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        with urllib.request.urlopen(req, timeout=30) as response:
            doc = json.loads(response.read())
        assert doc["predictions"][0]["index"] == 88 and doc["worker"] == "server1"
        status = _testbed("status", *common, "--dispatch", "queue", timeout=120)
        assert status.returncode == 0 and "down" not in status.stdout, status.stdout + status.stderr
        assert (tmp_path / "node2" / "var" / "redis" / "redis.conf").exists()
    finally:
        stop = _testbed("stop", *common, timeout=120)
    assert stop.returncode == 0, stop.stderr
    for port in (server_port, balancer_port):
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), 1).close()
    assert not (tmp_path / "node1" / "imgclass-server.pid").exists()
    assert not (tmp_path / "node1" / "imgclass-worker.pid").exists()
    assert not (tmp_path / "node2" / "imgclass-redis.pid").exists()
    after = _testbed("status", *common, timeout=120)
    assert after.returncode == 1 and "down" in after.stdout
