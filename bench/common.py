"""What the bench scripts share: CPU time from /proc, and an nginx started for one run."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TICKS = os.sysconf("SC_CLK_TCK")

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
{user}
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
{http}
    server {{
        listen 127.0.0.1:{port};
{server}
    }}
}}
"""


def cpu_split(pids: list[int]) -> tuple[float, float]:
    """(user, kernel) CPU seconds of these processes, every thread included."""
    user = kernel = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        user += int(fields[11])
        kernel += int(fields[12])
    return user / TICKS, kernel / TICKS


def pin(pid: int, cpus: set[int]) -> None:
    """Set the CPU affinity of every thread of a process (sched_setaffinity on a pid moves one thread)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), cpus)


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes, every thread included."""
    return sum(cpu_split(pids))


def preemptions(pids: list[int]) -> int:
    """Involuntary context switches of these processes' threads: times a thread was descheduled
    while it could still run, because another task took its core (/proc status)."""
    total = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                status = (task / "status").read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue
            total += int(status.rsplit("nonvoluntary_ctxt_switches:", 1)[1].split()[0])
    return total


def run_queue_seconds(pids: list[int]) -> float:
    """Time these processes' threads spent runnable but waiting for a core (/proc schedstat)."""
    total = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[1])
            except (FileNotFoundError, ProcessLookupError):
                continue  # a thread that ended between listing and reading
    return total / 1e9


def find_nginx(install: bool = False) -> str | None:
    def found() -> str | None:
        return shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)

    if found() or not install or not shutil.which("apt-get") or os.geteuid() != 0:
        return found()
    print("# nginx not found: apt-get install nginx ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "install", "-y", "-qq", "nginx"], env=env, capture_output=True, timeout=600)
    return found()


class Nginx:
    """One nginx with one worker on a free loopback port; `http` and `server` are config fragments."""

    def __init__(self, binary: str, http: str, server: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        tmp = Path(tempfile.mkdtemp(prefix="imgclass-nginx-"))
        conf = tmp / "nginx.conf"
        user = "user root;" if os.geteuid() == 0 else ""
        conf.write_text(NGINX_CONF.format(tmp=tmp, user=user, http=http, server=server, port=self.port))
        self.proc = subprocess.Popen([binary, "-c", str(conf), "-p", str(tmp)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    detail = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    raise RuntimeError(f"nginx failed: {detail}") from None
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("nginx did not start listening")

    def pids(self) -> list[int]:
        master = self.proc.pid
        kids = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        return [master, *map(int, kids)]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        if self.proc.stderr:
            self.proc.stderr.close()
