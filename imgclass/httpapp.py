"""What every HTTP app here shares: JSON errors, request ids, access log lines and /metrics."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from . import log
from .errors import ImgclassError, unexpected

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

LOGGER_KEY = web.AppKey("logger", log.EventLogger)
REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def json_response(body: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=json.dumps(body, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def error_response(exc: ImgclassError) -> web.Response:
    return json_response(exc.to_json(), exc.status, exc.http_headers())


def make_middleware(on_done: Callable[[web.Request, int, float], None] | None = None) -> Callable:
    """Request id in and out, every failure as JSON, one log line per request."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        rid = request.headers.get(log.REQUEST_ID_HEADER) or log.new_request_id()
        log.request_id.set(rid)
        start = time.perf_counter()
        logger = request.app[LOGGER_KEY]
        try:
            response = await handler(request)
        except ImgclassError as exc:
            response = error_response(exc)
            logger.info("error", path=request.path, status=exc.status, code=exc.code, message=exc.message)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = _HTTP_CODES.get(exc.status, "http_error")
            response = json_response({"error": code, "message": exc.reason + "."}, exc.status)
            if exc.status == 405:
                response.headers["Allow"] = exc.headers.get("Allow", "")
        except Exception as exc:  # the service stays up: a bug becomes one 500, logged
            logger.error("exception", path=request.path, type=type(exc).__name__, message=str(exc))
            response = error_response(unexpected())
        response.headers[log.REQUEST_ID_HEADER] = rid
        if on_done is not None:
            on_done(request, response.status, time.perf_counter() - start)
        return response

    return middleware


async def metrics_handler(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REGISTRY_KEY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "alive"})


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
        from .errors import ConfigError

        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port or --host.") from exc
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def socket_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop where it is installed: it roughly halves the event loop's CPU per request."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


async def run_until_signalled(
    app: web.Application, sock: socket.socket, logger: log.EventLogger, shutdown_timeout: float = 30.0
) -> None:
    """Serve on `sock` until SIGINT/SIGTERM, then drain in-flight requests and clean up."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    site = web.SockSite(runner, sock)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    logger.notice("listening", url=socket_url(sock))
    try:
        await stop.wait()
    finally:
        logger.notice("stopping")
        await runner.cleanup()
        logger.notice("stopped")
