"""The HTTP/1.1 front end of the balancer and the model server, on llhttp (httptools), with a route table.

Why not a framework: every upload crosses this code, on hosts where the balancer shares cores with
model servers. bench/balancer.py measured, per forwarded 40 KB request, ~0.40 ms of CPU under
aiohttp's web server and ~0.27 ms under uvicorn, whose two writes per response (head, then body)
also wake the client twice. This protocol answers with one write, and costs ~0.2 ms.

What it implements, as nginx and uvicorn do: persistent connections with an idle timeout; pipelined
requests answered in order; `Expect: 100-continue`; chunked request bodies; a body limit checked
against Content-Length before reading (413) and while reading; a header size limit (431); a
deadline for a request to arrive (408, against slow clients); 400 for malformed requests; HEAD;
and a graceful drain that finishes in-flight requests and closes idle connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl

import httptools
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from . import log
from .errors import (
    BadRequest,
    HeadersTooLarge,
    ImgclassError,
    MethodNotAllowed,
    NotFound,
    RequestTimeout,
    unexpected,
)
from .httpapp import BACKLOG, Deadline, socket_url
from .payload import too_large


class Request:
    """One HTTP request with its body already read."""

    __slots__ = ("_query", "body", "headers", "id", "method", "path", "query_string")

    def __init__(self, method: str, path: str, query_string: bytes, headers: dict[str, str], body: bytes = b"") -> None:
        self.method = method
        self.path = path
        self.query_string = query_string
        self.headers = headers  # names lower-cased
        self.body = body
        self.id = "-"  # X-Request-ID, given by App.dispatch
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
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # no Content-Length, Connection, Date


def json_response(doc: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    out = [(b"Content-Type", b"application/json")]
    out += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    return Response(json.dumps(doc, separators=(",", ":")).encode(), status, out)


def error_response(exc: ImgclassError) -> Response:
    return json_response(exc.to_json(), exc.status, exc.http_headers())


Handler = Callable[[Request], Awaitable[Response]]
Reply = Callable[[Response], None]
# A direct handler answers through `reply`, perhaps from a protocol callback, without a task;
# it may raise an ImgclassError only before it has replied.
DirectHandler = Callable[[Request, Reply], None]
Dispatch = Callable[[Request, Reply], None]


async def healthz(request: Request) -> Response:
    """Liveness: the process is up and its event loop answers."""
    return json_response({"status": "alive"})


def metrics_handler(registry: CollectorRegistry) -> Handler:
    """GET /metrics in Prometheus' text format, for `registry`."""
    content_type = [(b"Content-Type", CONTENT_TYPE_LATEST.encode())]

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), 200, list(content_type))

    return metrics


class CountByLabels:
    """A labelled Prometheus counter whose children are looked up once per label set:
    `.labels()` on every request was a measurable share of the CPU per request."""

    def __init__(self, counter: Counter) -> None:
        self._counter = counter
        self._children: dict[tuple[object, ...], Counter] = {}

    def inc(self, *key: object) -> None:
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._counter.labels(*(str(k) for k in key))
        child.inc()


@dataclass(frozen=True)
class Limits:
    max_upload: int  # the stated limit, as in --max-upload-mb
    envelope: int = 65536  # room for the multipart wrapping around a max-size image

    @property
    def max_body(self) -> int:
        return self.max_upload + self.envelope

    max_header_bytes: int = 64 * 1024
    keep_alive_s: float = 75.0  # nginx's keepalive_timeout: clients can reuse idle connections
    request_timeout_s: float = 60.0  # from a request's first byte to its last
    linger_s: float = 5.0  # nginx's lingering_timeout: the longest pause in an upload we discard
    linger_total_s: float = 30.0  # nginx's lingering_time: the longest we discard at all


_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _Date:
    """The Date header, formatted once per second."""

    second = -1
    value = b""

    @classmethod
    def now(cls) -> bytes:
        second = int(time.time())
        if second != cls.second:
            cls.second, cls.value = second, formatdate(second, usegmt=True).encode()
        return cls.value


class _Connection(asyncio.Protocol):
    """One client connection: parses requests with llhttp and answers them in order."""

    def __init__(self, server: FrontEnd) -> None:
        self.server = server
        self.limits = server.limits
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.pending: deque[tuple[Request, bool]] = deque()
        self.busy = False  # a request is being handled
        self.closing = False
        self.lingering_until = 0.0  # > 0: answered with an error, discarding the rest of the upload
        self.paused = False  # by us, because the client pipelines or does not read
        self.deadline = Deadline(self.loop)
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.headers: dict[str, str] = {}
        self.chunks: list[bytes] = []
        self.size = 0
        self.head_bytes = 0
        self.in_head = True
        self.rejected = False  # answered early (413): ignore the rest of this message

    # --- asyncio.Protocol ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        self._arm(self.limits.keep_alive_s, self._idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.connections.discard(self)
        self.deadline.cancel()

    def data_received(self, data: bytes) -> None:
        if self.lingering_until:
            self._linger()
            return
        if self.closing:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The request itself was complete and is answered as plain HTTP (a server may ignore
            # Upgrade); what follows it is another protocol, so the connection ends after the answer.
            self._fail(BadRequest("Protocol upgrades are not supported here."))
        except httptools.HttpParserError as exc:
            if not self.closing:
                self._fail(BadRequest(f"Malformed HTTP request ({exc})."))
        if self.in_head and not self.closing:
            self.head_bytes += len(data)  # a head still arriving: bound what llhttp buffers for it
            self._check_head()

    def pause_writing(self) -> None:
        self._pause()

    def resume_writing(self) -> None:
        if not self.pending:
            self._resume()

    # --- llhttp callbacks ---
    def on_message_begin(self) -> None:
        self._reset()
        if not self.busy:
            self._arm(self.limits.request_timeout_s, self._request_timeout)

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_bytes += len(url)
        self._check_head()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > self.limits.max_header_bytes:
            self._check_head()
        key = name.decode("latin-1").lower()
        headers = self.headers
        if key in headers:  # repeated headers fold into one, comma-separated (RFC 9110 section 5.3)
            headers[key] = f"{headers[key]}, {value.decode('latin-1')}"
        else:
            headers[key] = value.decode("latin-1")

    def _check_head(self) -> None:
        if self.head_bytes > self.limits.max_header_bytes and not self.rejected:
            self.rejected = True
            self._fail(HeadersTooLarge(f"The request head is over {self.limits.max_header_bytes} bytes."))

    def on_headers_complete(self) -> None:
        self.in_head = False
        if self.rejected:
            return
        length = self.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.limits.max_body:
            self.rejected = True  # answer now, without inviting or reading the upload
            self._fail(too_large(self.limits.max_upload))
        elif self.headers.get("expect", "").lower() == "100-continue" and self.transport is not None:
            self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        if self.rejected:
            return
        self.size += len(body)
        if self.size > self.limits.max_body:
            self.rejected = True
            self._fail(too_large(self.limits.max_upload))
            return
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        if self.rejected or self.closing:
            return
        url = httptools.parse_url(self.url)
        body = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        request = Request(
            self.parser.get_method().decode("latin-1"),
            url.path.decode("latin-1"),
            url.query or b"",
            self.headers,
            body,
        )
        keep_alive = self.parser.should_keep_alive()
        self.in_head = True
        self.head_bytes = 0
        if self.busy:
            self.pending.append((request, keep_alive))
            self._pause()  # a pipelining client waits for its answers before we read more
        else:
            self._start(request, keep_alive)

    # --- handling ---
    def _start(self, request: Request, keep_alive: bool) -> None:
        self.busy = True
        self._disarm()
        server = self.server
        server.in_flight += 1
        answered = False

        def reply(response: Response) -> None:
            nonlocal answered
            if not answered:
                answered = True
                server.in_flight -= 1
                self._finish(request, keep_alive, response)

        try:
            server.dispatch(request, reply)
        except Exception:  # App.dispatch turns errors into responses; this is a last resort
            reply(error_response(unexpected()))

    def _finish(self, request: Request, keep_alive: bool, response: Response) -> None:
        self._write(
            response, keep_alive and not self.server.draining and not self.closing, head=request.method == "HEAD"
        )
        self.busy = False
        if self.closing:
            self.pending.clear()
            if self.transport is not None and not self.transport.is_closing():
                self.transport.close()
            return
        if self.pending:
            self._start(*self.pending.popleft())
        else:
            self._resume()
            self._arm(self.limits.keep_alive_s, self._idle_timeout)

    def _write(self, response: Response, keep_alive: bool, head: bool = False, linger: bool = False) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        body = response.body
        reason = _REASONS.get(response.status, b"Unknown")
        out = [b"HTTP/1.1 %d %s\r\n" % (response.status, reason)]
        for name, value in response.headers:
            out += [name, b": ", value, b"\r\n"]
        out += [b"Content-Length: %d\r\nDate: " % len(body), _Date.now()]
        out.append(b"\r\n\r\n" if keep_alive else b"\r\nConnection: close\r\n\r\n")
        if not head:
            out.append(body)
        self.transport.write(b"".join(out))  # one write: one wake-up of the client
        if not keep_alive:
            self.closing = True
            if linger and self.transport.can_write_eof():
                # Closing with unread upload bytes would make the kernel reset the connection, and a
                # client still sending (most send the whole body before reading) would see the reset
                # instead of our answer. So, as nginx's lingering close: send FIN, read and discard.
                self.transport.write_eof()
                self.lingering_until = self.loop.time() + self.limits.linger_total_s
                self._resume()
                self._linger()
            else:
                self.transport.close()

    def _linger(self) -> None:
        remaining = self.lingering_until - self.loop.time()
        if remaining <= 0:
            self._close_now()
        else:
            self._arm(min(self.limits.linger_s, remaining), self._close_now)

    def _close_now(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _fail(self, exc: ImgclassError) -> None:
        """Answer a request we cannot take (bad syntax, too large, too slow), then close."""
        self._disarm()
        if self.busy:
            # An earlier request is still being answered and its response must come first:
            # hang up after it instead.
            self.closing = True
            return
        self._write(error_response(exc), keep_alive=False, linger=True)

    # --- timers and flow control ---
    def _arm(self, seconds: float, callback: Callable[[], None]) -> None:
        self.deadline.set(seconds, callback)

    def _disarm(self) -> None:
        self.deadline.clear()

    def _idle_timeout(self) -> None:
        if not self.busy and self.transport is not None:
            self.closing = True
            self.transport.close()

    def _request_timeout(self) -> None:
        if not self.busy:
            self._fail(RequestTimeout(f"The request did not arrive within {self.limits.request_timeout_s:g} s."))

    def _pause(self) -> None:
        if not self.paused and self.transport is not None and not self.transport.is_closing():
            self.paused = True
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self.paused and self.transport is not None and not self.transport.is_closing():
            self.paused = False
            self.transport.resume_reading()

    def shutdown(self) -> None:
        """Close now if idle; otherwise after the response in progress."""
        if not self.busy and self.transport is not None:
            self.closing = True
            self.transport.close()


class FrontEnd:
    """Accepts connections on a bound socket and hands each request to `dispatch`, which answers through a reply callback."""

    def __init__(self, dispatch: Dispatch, limits: Limits) -> None:
        self.dispatch = dispatch
        self.limits = limits
        self.connections: set[_Connection] = set()
        self.in_flight = 0  # requests handed to `dispatch` and not yet answered
        self.draining = False
        self._server: asyncio.AbstractServer | None = None

    async def start(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        # create_server listens again, with its own default backlog of 100 unless told otherwise
        self._server = await loop.create_server(lambda: _Connection(self), sock=sock, backlog=BACKLOG)

    async def drain(self, timeout: float) -> None:
        """Stop accepting, let in-flight requests finish (up to `timeout`), close every connection."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.shutdown()
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)


Hook = Callable[[], Awaitable[None]]


class App:
    """Routes by exact path and method; every failure becomes a JSON error; one log line per request."""

    def __init__(
        self, logger: log.EventLogger, max_upload: int, on_done: Callable[[Request, int, float], None] | None = None
    ) -> None:
        self.logger = logger
        self.max_upload = max_upload
        self.on_done = on_done
        self.routes: dict[str, dict[str, tuple[Handler | DirectHandler, bool]]] = {}
        self.on_startup: list[Hook] = []
        self.on_shutdown: list[Hook] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def route(self, method: str, path: str, handler: Handler) -> None:
        """A coroutine handler: it returns the response, or raises an ImgclassError."""
        self._add(method, path, (handler, False))

    def route_direct(self, method: str, path: str, handler: DirectHandler) -> None:
        """A handler that answers through a reply callback: no task unless it makes one (`complete`)."""
        self._add(method, path, (handler, True))

    def _add(self, method: str, path: str, entry: tuple[Handler | DirectHandler, bool]) -> None:
        self.routes.setdefault(path, {})[method] = entry
        if method == "GET":
            self.routes[path].setdefault("HEAD", entry)  # the front end drops the body of a HEAD answer

    async def startup(self) -> None:
        for hook in self.on_startup:
            await hook()

    async def shutdown(self) -> None:
        for task in list(self.tasks):  # handlers still running after the front end's drain
            task.cancel()
        for hook in self.on_shutdown:
            await hook()

    def dispatch(self, request: Request, reply: Reply) -> None:
        """Route one request; `reply` gets exactly one response, with X-Request-ID, errors as JSON."""
        start = time.perf_counter()
        rid = request.id = request.headers.get("x-request-id") or log.new_request_id()
        log.request_id.set(rid)
        rid_header = (b"X-Request-ID", rid.encode("latin-1"))
        on_done = self.on_done

        def done(response: Response) -> None:
            # A direct handler may reply from another request's protocol callback, in whose
            # context the log's request id is that request's: the access line must carry ours.
            log.request_id.set(rid)
            response.headers.append(rid_header)
            if on_done is not None:
                on_done(request, response.status, time.perf_counter() - start)
            reply(response)

        try:
            methods = self.routes.get(request.path)
            if methods is None:
                raise NotFound(f"No route {request.path}; see the README for the API.")
            entry = methods.get(request.method)
            if entry is None:
                allowed = ", ".join(sorted(methods))
                raise MethodNotAllowed(f"{request.method} is not allowed on {request.path}; use {allowed}.", allowed)
            handler, direct = entry
            if direct:
                handler(request, done)  # type: ignore[call-arg]
            else:
                self.complete(request, handler(request), done)  # type: ignore[call-arg, arg-type]
        except Exception as exc:
            done(self.error(request, exc))

    def complete(self, request: Request, coro: Coroutine[Any, Any, Response], reply: Reply) -> None:
        """Run `coro` as a task and reply with what it returns, or with the error it raises."""
        loop = self._loop
        if loop is None:  # asyncio.get_running_loop() costs a getpid() system call on 3.11
            loop = self._loop = asyncio.get_running_loop()
        task = loop.create_task(self._run(request, coro, reply))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, request: Request, coro: Coroutine[Any, Any, Response], reply: Reply) -> None:
        # The task copied the context of whichever callback started it, not necessarily this request's.
        log.request_id.set(request.id)
        try:
            response = await coro
        except Exception as exc:
            response = self.error(request, exc)
        reply(response)

    def error(self, request: Request, exc: Exception) -> Response:
        """The JSON answer for an exception a handler raised, logged; a bug becomes one 500."""
        if isinstance(exc, ImgclassError):
            self.logger.info("error", path=request.path, status=exc.status, code=exc.code, message=exc.message)
            return error_response(exc)
        self.logger.error("exception", path=request.path, type=type(exc).__name__, message=str(exc))
        return error_response(unexpected())

    async def handle(self, request: Request) -> Response:
        """dispatch() as a coroutine, for in-process tests."""
        future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self.dispatch(request, future.set_result)
        return await future


async def serve(app: App, sock: socket.socket, logger: log.EventLogger, shutdown_timeout: float = 30.0) -> None:
    """Serve `app` on the bound socket until SIGINT/SIGTERM, then drain in-flight requests."""
    front = FrontEnd(app.dispatch, Limits(max_upload=app.max_upload))
    await app.startup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await front.start(sock)
        logger.notice("listening", url=socket_url(sock))
        await stop.wait()
    finally:
        logger.notice("stopping")
        await front.drain(shutdown_timeout)
        await app.shutdown()
        logger.notice("stopped")
