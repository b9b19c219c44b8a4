"""Running an app: bind its socket, serve it with uvicorn on uvloop, and drain it on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import uvicorn

from .. import log
from ..errors import ConfigError
from .app import App

T = TypeVar("T")

# Connections the kernel completes before we accept them. A burst larger than this (a load
# generator opening hundreds of connections at once) overflows it, and the kernel drops the
# handshakes: clients retry after 1 s and 3 s or see a reset. nginx's default is 511; the kernel
# caps it at net.core.somaxconn.
BACKLOG = 1024


@dataclass(frozen=True)
class ServerOptions:
    """What uvicorn enforces on connections, before any request reaches the app."""

    http: str = "httptools"  # uvicorn's HTTP implementation: httptools (fast) or h11 (bounds the head)
    keep_alive_s: float = 75.0  # nginx's keepalive_timeout: clients can reuse idle connections
    graceful_s: float = 30.0  # on SIGTERM, how long in-flight requests may take to finish
    max_connections: int | None = None  # uvicorn's limit_concurrency: past it, new requests get 503
    max_head_bytes: int = 64 * 1024  # h11 only: a request head larger than this is refused


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind before building the app, so that port 0 resolves to a real port the name can carry."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot resolve --host {host!r} ({exc.strerror}); use an address such as 127.0.0.1.") from exc
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


class _UvicornLog(logging.Handler):
    """uvicorn's own warnings (a malformed request, a refused connection) as our event lines."""

    def __init__(self, logger: log.EventLogger) -> None:
        super().__init__(logging.WARNING)
        self.logger = logger

    def emit(self, record: logging.LogRecord) -> None:
        emit = self.logger.error if record.levelno >= logging.ERROR else self.logger.warning
        emit("http_server", message=record.getMessage().splitlines()[0])


def attach_uvicorn_log(logger: log.EventLogger) -> None:
    for name in ("uvicorn", "uvicorn.error"):
        target = logging.getLogger(name)
        target.handlers = [_UvicornLog(logger)]
        target.propagate = False
        target.setLevel(logging.WARNING)  # its INFO lines (started, waiting) duplicate ours


def uvicorn_config(app: Any, options: ServerOptions) -> uvicorn.Config:
    """uvicorn's settings for our apps: its own limits, none of its logging, no proxy headers."""
    return uvicorn.Config(
        app,
        http=options.http,
        lifespan="on",
        ws="none",  # no WebSocket routes: an Upgrade request is answered as plain HTTP
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,  # X-Forwarded-* from any client would be believed: off, as by default in nginx
        timeout_keep_alive=int(options.keep_alive_s),
        timeout_graceful_shutdown=int(options.graceful_s),
        limit_concurrency=options.max_connections,
        backlog=BACKLOG,
        h11_max_incomplete_event_size=options.max_head_bytes,
    )


async def serve(app: App, sock: socket.socket, options: ServerOptions | None = None) -> None:
    """Serve `app` on the bound socket until SIGINT/SIGTERM; in-flight requests finish first.

    The lines `listening url=...` and `stopped` are what supervisors (imgclass up, the tests) wait for.
    """
    options = options or ServerOptions()
    logger = app.logger
    attach_uvicorn_log(logger)
    config = uvicorn_config(app, options)
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it once it has drained; with these handlers in place
    # that re-raise is a no-op, so this coroutine returns normally and can log that it stopped.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    if server.started:
        logger.notice("listening", url=socket_url(sock), http=options.http)
    stopping = False
    while not task.done():
        await asyncio.wait({task}, timeout=0.1)
        if server.should_exit and not stopping:
            stopping = True
            logger.notice("stopping")
    try:
        task.result()
    except SystemExit:  # uvicorn exits when the app's startup fails; the app has logged why
        logger.error("startup_failed")
        raise
    logger.notice("stopped")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop where it is installed: it roughly halves the event loop's CPU per request."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
