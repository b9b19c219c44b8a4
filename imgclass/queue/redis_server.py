"""A redis-server of our own: on a free port, with its own data directory and an append-only file."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ..errors import ConfigError
from ..process import die_with_parent

# appendfsync everysec: an acknowledged job survives a crash of Redis itself (the process), and at
# most about one second of acknowledged writes is lost if the machine dies (README).
CONFIG = """
bind {bind}
port {port}
dir {dir}
appendonly yes
appendfsync everysec
save ""
daemonize no
protected-mode {protected}
loglevel {loglevel}
maxmemory-policy noeviction
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_redis_server() -> str:
    binary = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if binary is None:
        raise ConfigError(
            "redis-server is not installed: run ./install_script.sh (it installs the Debian package redis-server), "
            "or pass --redis URL of a Redis you run."
        )
    return binary


def render(addresses: list[str], port: int, directory: Path, log_level: str = "WARNING") -> str:
    """redis.conf for our queue. Bound to other addresses than loopback (a testbed's data plane, which
    only the slice reaches), protected mode is off: Redis would otherwise refuse every remote client."""
    loopback_only = all(a in ("127.0.0.1", "::1", "localhost") for a in addresses)
    levels = {"DEBUG": "debug", "INFO": "notice", "WARNING": "warning", "ERROR": "warning"}
    return CONFIG.format(bind=" ".join(addresses), port=port, dir=directory.resolve(),
                         protected="yes" if loopback_only else "no", loglevel=levels.get(log_level, "warning"))  # fmt: skip


def main(host: str, port: int, directory: str, log_level: str) -> None:
    """`imgclass redis`: the queue's redis-server in the foreground (for nohup or a systemd unit)."""
    binary = find_redis_server()
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    conf = folder / "redis.conf"
    addresses = [a for a in host.replace(",", " ").split() if a]
    conf.write_text(render(addresses, port, folder, log_level))
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} redis redis listening url=redis://{addresses[0]}:{port}/0",
          file=sys.stderr, flush=True)  # fmt: skip
    os.execv(binary, [binary, str(conf.resolve())])


class RedisServer:
    """Started in `directory` (kept across restarts: its AOF is the queue); `stop()` always ends it."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.binary = find_redis_server()
        self.directory = directory.resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> str:
        self._close_pipe()  # of an earlier run, when restarted
        conf = self.directory / "redis.conf"
        conf.write_text(render(["127.0.0.1"], self.port, self.directory))
        # its own session (a Ctrl-C meant for us does not reach it before we stop it in order), but
        # it dies with us: a SIGKILLed `imgclass up` leaves no redis-server behind
        self.proc = subprocess.Popen([self.binary, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True, preexec_fn=die_with_parent)  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                detail = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise ConfigError(f"redis-server did not start on port {self.port}: {detail.strip()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(64).startswith(b"+PONG"):
                        return self.url
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise ConfigError(f"redis-server did not answer on port {self.port} within {timeout:g} s")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL, as a crash would: what the AOF holds is what survives."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._close_pipe()

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._close_pipe()

    def _close_pipe(self) -> None:
        if self.proc is not None and self.proc.stderr is not None and not self.proc.stderr.closed:
            self.proc.stderr.close()
