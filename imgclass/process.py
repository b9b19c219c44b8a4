"""Child processes that announce their URL on stderr, and stopping them for sure."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence

from .errors import ImgclassError

_LISTENING = re.compile(r" listening .*url=(\S+)")


def die_with_parent() -> None:
    """In the child before exec: ask Linux for SIGTERM when the parent dies, even by SIGKILL."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the parent's orderly stop still applies


def terminate_as_interrupt() -> None:
    """Make SIGTERM unwind like Ctrl-C, so `finally` blocks stop the children we started."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


class ChildFailed(ImgclassError):
    """A child process exited or stayed silent before it announced its URL."""

    code = "child_failed"


class Child:
    """A `python -m imgclass ...` process; `url` is set once it logs `listening url=...`."""

    def __init__(
        self,
        args: Sequence[str],
        env: dict[str, str] | None = None,
        echo: bool = False,
        prefix: Sequence[str] = (),
    ) -> None:
        """`prefix` wraps the command, e.g. ["ip", "netns", "exec", NS]; it must exec, not fork."""
        self.args = list(args)
        self.url: str | None = None
        self.lines: deque[str] = deque(maxlen=500)
        self._ready = threading.Event()
        self._echo = echo
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "imgclass", *self.args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # a terminal's Ctrl-C goes to the parent, which stops us in order
            preexec_fn=die_with_parent,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if self._echo:
                sys.stderr.write(line)
            if self.url is None and (match := _LISTENING.search(line)):
                self.url = match.group(1)
                self._ready.set()
        self.proc.stderr.close()
        self._ready.set()

    def wait_url(self, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._ready.wait(0.05):
                break
        if self.url is None:
            self.stop()
            tail = "\n".join(list(self.lines)[-15:])
            raise ChildFailed(f"'imgclass {' '.join(self.args)}' did not start (exit {self.proc.poll()}):\n{tail}")
        return self.url

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait, then SIGKILL: never leave the process behind."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(2)
        return self.proc.returncode


def stop_all(children: Sequence[Child], timeout: float = 15.0) -> None:
    """Signal every child first, then wait, so they drain in parallel."""
    for child in children:
        child.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            child.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.proc.kill()
    for child in children:
        child.stop(5)
