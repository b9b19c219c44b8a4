"""What every server here shares: binding its listening socket, running on uvloop, and a cheap deadline timer."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T")

# Connections the kernel completes before we accept them. A burst larger than this (a load
# generator opening hundreds of connections at once) overflows it, and the kernel drops the
# handshakes: clients retry after 1 s and 3 s or see a reset. nginx's default is 511; the kernel
# caps it at net.core.somaxconn.
BACKLOG = 1024


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind before building the app, so that port 0 resolves to a real port the name can carry."""

    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, socktype, proto, _, addr = infos[0]
    sock = socket.socket(family, socktype, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port or --host.") from exc
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


def socket_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


class Deadline:
    """A lazy timer. Setting it only moves the deadline; the loop's timer is replaced only when the
    new deadline is earlier, and re-arms for what is left when it fires early. Per-request deadlines
    (keep-alive, request, read timeouts) move on every request, and a call_later plus a cancel each
    time was a measurable share of the balancer's CPU per request."""

    __slots__ = ("_at", "_callback", "_handle", "_handle_at", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._at = 0.0
        self._callback: Callable[[], None] | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._handle_at = 0.0

    def set(self, seconds: float, callback: Callable[[], None]) -> None:
        """Call `callback` in `seconds`, instead of whatever was set before."""
        at = self._loop.time() + seconds
        self._at = at
        self._callback = callback
        if self._handle is None or self._handle_at > at:
            if self._handle is not None:
                self._handle.cancel()
            self._handle = self._loop.call_at(at, self._fire)
            self._handle_at = at

    def clear(self) -> None:
        """Nothing is due; the loop's timer, if any, lapses when it fires."""
        self._callback = None

    def cancel(self) -> None:
        """Nothing is due, and the loop's timer goes now (the owner is closing)."""
        self._callback = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        callback = self._callback
        if callback is None:
            return
        if self._at > self._loop.time():
            self._handle = self._loop.call_at(self._at, self._fire)
            self._handle_at = self._at
            return
        self._callback = None
        callback()


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop where it is installed: it roughly halves the event loop's CPU per request."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
