"""The HAProxy child: found and version-checked, run in master-worker mode with its log relayed, restarted if it dies."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from ...errors import EngineUnavailable
from ...log import EventLogger
from ...process import die_with_parent
from .config import Layout

MIN_VERSION = (2, 6)  # http-error, retry-on, the Prometheus exporter, `set server ... check-port`
INSTALL = ("install HAProxy 2.6 or later: ./install_script.sh installs the Debian package haproxy (so do its --dev "
           "and --role balancer), or run: sudo apt-get install haproxy; or point --haproxy at the program")  # fmt: skip
# Debian installs haproxy in /usr/sbin, which a user's PATH may lack.
SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")
_LINE = re.compile(r"^\[(\w+)\]\s+\((\d+)\)\s*:\s*(.*)$")  # "[WARNING]  (996) : Server x/s1 is DOWN, ..."
# Said once per proxy, and engine mode declares one per policy and prefix: what every backend but the
# primary says at a stop, or when a server it tracks goes up or down, is logged at debug only.
_ROUTINE = re.compile(r"^(Proxy \S+ stopped|Stopping (backend|frontend|proxy) |Server \S+ is \w+ via |"
                      r"backend '\S+' has no server available)")  # fmt: skip


@dataclass(frozen=True)
class Binary:
    path: str
    version: tuple[int, int]


def find_binary(name: str) -> Binary:
    """The haproxy program named by --haproxy, or EngineUnavailable saying how to install it."""
    path = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", os.defpath), *SBIN]))
    if path is None:
        raise EngineUnavailable(f"--engine haproxy needs the haproxy program, and {name!r} was not found: {INSTALL}.")
    try:
        out = subprocess.run([path, "-v"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise EngineUnavailable(f"{path} did not run ({exc}): {INSTALL}.") from None
    found = re.search(r"version (\d+)\.(\d+)", out)
    if found is None:
        raise EngineUnavailable(f"{path} is not HAProxy (its -v says {out.strip()[:80]!r}): {INSTALL}.")
    version = (int(found.group(1)), int(found.group(2)))
    if version < MIN_VERSION:
        raise EngineUnavailable(f"{path} is HAProxy {version[0]}.{version[1]}; engine mode needs "
                                f"{MIN_VERSION[0]}.{MIN_VERSION[1]} or later: {INSTALL}.")  # fmt: skip
    return Binary(path, version)


class HaproxyProcess:
    """One HAProxy master (-W) and its worker, in the foreground (-db), on the inherited public socket."""

    def __init__(self, proc: asyncio.subprocess.Process, logger: EventLogger, primary: str) -> None:
        self.proc = proc
        self.logger = logger
        self.primary = primary  # the backend whose servers are checked: its alerts are not routine
        self.started = time.monotonic()
        self.lines: deque[str] = deque(maxlen=50)  # its last words, for a start that fails
        assert proc.stderr is not None
        self._relay = asyncio.create_task(self._read(proc.stderr), name="haproxy log")

    @classmethod
    async def start(cls, binary: Binary, layout: Layout, logger: EventLogger, primary: str) -> HaproxyProcess:
        proc = await asyncio.create_subprocess_exec(
            binary.path, "-W", "-db", "-f", str(layout.cfg),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            pass_fds=(layout.public_fd,),
            # A terminal's Ctrl-C goes to us, which stops HAProxy in order; if we die, so does it.
            start_new_session=True, preexec_fn=die_with_parent,
        )  # fmt: skip
        return cls(proc, logger, primary)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pids(self) -> list[int]:
        """The master and its workers, from /proc."""
        try:
            workers = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        except OSError:
            return []
        return [self.pid, *map(int, workers)]

    def alive(self) -> bool:
        return self.proc.returncode is None

    async def wait(self) -> int:
        code = await self.proc.wait()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._relay), 1.0)  # its last lines, logged
        return code

    async def stop(self, grace: float) -> None:
        """Soft stop (SIGUSR1: stop listening, finish what is in flight), then SIGTERM, then SIGKILL."""
        for sig, wait in ((signal.SIGUSR1, grace), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if not self.alive():
                break
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.proc.wait(), wait)
        self._relay.cancel()

    async def _read(self, stream: asyncio.StreamReader) -> None:
        """HAProxy's alerts and notices (server up or down, a worker that died) as our log lines."""
        while line := await stream.readline():
            text = line.decode("utf-8", "replace").rstrip()
            if not text:
                continue
            self.lines.append(text)
            match = _LINE.match(text)
            level, message = (match.group(1), match.group(3)) if match else ("NOTICE", text.strip())
            emit = {"ALERT": self.logger.error, "WARNING": self.logger.warning}.get(level, self.logger.info)
            if _ROUTINE.match(message) and f"'{self.primary}'" not in message:
                emit = self.logger.debug
            emit("haproxy", level=level.lower(), message=message)


class Supervisor:
    """Keeps HAProxy running: a dead one is logged and started again, with a growing pause if it keeps dying."""

    def __init__(self, launch: Callable[[], Awaitable[HaproxyProcess]], logger: EventLogger) -> None:
        self.launch = launch
        self.logger = logger
        self.current: HaproxyProcess | None = None
        self.restarts = 0
        self.stopping = False
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> HaproxyProcess:
        """The first start; a failure here fails the balancer's start, with HAProxy's own words."""
        self.current = await self.launch()
        self._task = asyncio.create_task(self._watch(), name="haproxy supervisor")
        return self.current

    async def _watch(self) -> None:
        pause = 0.2
        while not self.stopping:
            assert self.current is not None
            code = await self.current.wait()
            if self.stopping:
                return
            ran = time.monotonic() - self.current.started
            pause = 0.2 if ran > 10 else min(pause * 2, 5.0)  # a crash loop backs off, a rare crash does not
            self.logger.error("haproxy_died", exit=code, pid=self.current.pid, ran_s=round(ran, 1),
                              restart_in_s=pause)  # fmt: skip
            while not self.stopping:
                await asyncio.sleep(pause)
                try:
                    self.current = await self.launch()
                    break
                except Exception as exc:
                    pause = min(pause * 2, 5.0)
                    self.logger.error("haproxy_restart_failed", type=type(exc).__name__, message=str(exc)[:300])
            else:
                return
            self.restarts += 1
            self.logger.warning("haproxy_restarted", pid=self.current.pid, restarts=self.restarts)

    async def stop(self, grace: float) -> None:
        """No more restarts; then the running HAProxy drains for up to `grace` seconds and stops."""
        self.stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.current is not None:
            await self.current.stop(grace)
