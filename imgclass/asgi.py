"""The balancer's HTTP layer: a small ASGI app (routes, JSON errors, request ids) served by uvicorn.

The balancer forwards every upload, so its front end is on the hot path. Measured on this machine
with the same upstream pool behind each (bench/balancer.py, 40 KB uploads): aiohttp's web server
spent ~0.40 ms of CPU per forwarded request; uvicorn (httptools, uvloop) with a bare ASGI app
~0.25 ms. The model server stays on aiohttp, where inference dominates.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import uvicorn

from . import log
from .errors import ImgclassError, MethodNotAllowed, NotFound, PayloadTooLarge
from .httpapp import socket_url
from .payload import too_large

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Request:
    """One HTTP request with its body already read."""

    __slots__ = ("_query", "body", "headers", "method", "path", "query_string")

    def __init__(self, method: str, path: str, query_string: bytes, headers: dict[str, str], body: bytes) -> None:
        self.method = method
        self.path = path
        self.query_string = query_string
        self.headers = headers  # names lower-cased, as ASGI delivers them
        self.body = body
        self._query: dict[str, str] | None = None

    @property
    def query(self) -> dict[str, str]:
        if self._query is None:
            self._query = dict(parse_qsl(self.query_string.decode("latin-1"), keep_blank_values=True))
        return self._query

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


@dataclass
class Response:
    body: bytes
    status: int = 200
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


def json_response(doc: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    out = [(b"Content-Type", b"application/json")]
    out += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    return Response(json.dumps(doc, separators=(",", ":")).encode(), status, out)


def error_response(exc: ImgclassError) -> Response:
    return json_response(exc.to_json(), exc.status, exc.http_headers())


Handler = Callable[[Request], Awaitable[Response]]
Hook = Callable[[], Awaitable[None]]


class App:
    """Routes by exact path and method; every failure becomes a JSON error; one log line per request."""

    def __init__(
        self,
        logger: log.EventLogger,
        max_body: int,
        on_done: Callable[[Request, int, float], None] | None = None,
    ) -> None:
        self.logger = logger
        self.max_body = max_body
        self.on_done = on_done
        self.routes: dict[str, dict[str, Handler]] = {}
        self.on_startup: list[Hook] = []
        self.on_shutdown: list[Hook] = []

    def route(self, method: str, path: str, handler: Handler) -> None:
        self.routes.setdefault(path, {})[method] = handler
        if method == "GET":
            self.routes[path].setdefault("HEAD", handler)  # uvicorn drops the body of a HEAD answer

    async def startup(self) -> None:
        for hook in self.on_startup:
            await hook()

    async def shutdown(self) -> None:
        for hook in self.on_shutdown:
            await hook()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        rid = headers.get("x-request-id") or log.new_request_id()
        log.request_id.set(rid)
        request = Request(scope["method"], scope["path"], scope["query_string"], headers, b"")
        try:
            methods = self.routes.get(request.path)
            if methods is None:
                raise NotFound(f"No route {request.path}; see the README for the API.")
            handler = methods.get(request.method)
            if handler is None:
                allowed = ", ".join(sorted(methods))
                raise MethodNotAllowed(f"{request.method} is not allowed on {request.path}; use {allowed}.", allowed)
            request.body = await self._read_body(headers, receive)
            response = await handler(request)
        except ImgclassError as exc:
            response = error_response(exc)
            if isinstance(exc, PayloadTooLarge):
                response.headers.append((b"Connection", b"close"))  # don't drain the rest of a huge upload
            self.logger.info("error", path=request.path, status=exc.status, code=exc.code, message=exc.message)
        except _ClientGone:
            return
        except Exception as exc:  # the service stays up: a bug becomes one 500, logged
            self.logger.error("exception", path=request.path, type=type(exc).__name__, message=str(exc))
            response = json_response(
                {"error": "internal_error", "message": "An unexpected error occurred; it has been logged."}, 500
            )
        response.headers.append((b"X-Request-ID", rid.encode("latin-1")))
        await send({"type": "http.response.start", "status": response.status, "headers": response.headers})
        await send({"type": "http.response.body", "body": response.body})
        if self.on_done is not None:
            self.on_done(request, response.status, time.perf_counter() - start)

    async def _read_body(self, headers: dict[str, str], receive: Receive) -> bytes:
        limit = self.max_body
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_large(limit)  # before reading, so no 100-continue invites the upload
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large(limit)  # a chunked upload over the limit
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class _ClientGone(Exception):
    """The client hung up before its request body arrived: there is nobody to answer."""


class _Server(uvicorn.Server):
    """uvicorn, minus its habit of re-raising SIGTERM after a graceful stop (we exit 0 instead)."""

    def __init__(self, config: uvicorn.Config, logger: log.EventLogger) -> None:
        super().__init__(config)
        self.logger = logger

    def handle_exit(self, sig: int, frame: Any) -> None:
        if not self.should_exit:
            self.logger.notice("stopping")
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)


async def serve(app: App, sock: socket.socket, logger: log.EventLogger, shutdown_timeout: float = 30.0) -> None:
    """Serve `app` on the bound socket until SIGINT/SIGTERM, then drain in-flight requests."""
    config = uvicorn.Config(
        app,
        loop="none",  # run_async already chose uvloop
        http="httptools",
        ws="none",
        lifespan="on",
        log_config=None,
        access_log=False,
        proxy_headers=False,
        server_header=False,
        timeout_keep_alive=75,  # nginx's keepalive_timeout: clients reuse idle connections without a race
        timeout_graceful_shutdown=shutdown_timeout,
    )
    server = _Server(config, logger)

    async def announce() -> None:
        logger.notice("listening", url=socket_url(sock))

    app.on_startup.append(announce)
    try:
        await server.serve(sockets=[sock])
    finally:
        logger.notice("stopped")
