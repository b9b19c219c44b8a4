"""An ASGI app: a route table, request bodies read within limits, JSON errors, and one log line per request.

uvicorn owns the connection (parsing, keep-alive, pipelining, flow control); this module sees one
request at a time, as ASGI hands it over, and keeps only per-request state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from .. import log
from ..errors import (
    ClientGone,
    ImgclassError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    unexpected,
)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


_NO_PARAMS: dict[str, str] = {}


class Request:
    """One HTTP request: what the handler may read; the body is read before the handler runs."""

    __slots__ = ("_query", "body", "headers", "id", "method", "params", "path", "query_string")

    def __init__(self, method: str, path: str, query_string: bytes, headers: dict[str, str], rid: str) -> None:
        self.method = method
        self.path = path
        self.query_string = query_string
        self.headers = headers  # names lower-cased; repeated headers folded with ", "
        self.body = b""
        self.id = rid  # X-Request-ID: the client's, if it is a plain token, else a fresh one
        self.params: dict[str, str] = _NO_PARAMS  # {name} segments of a pattern route
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
    """What a handler returns; Content-Length and X-Request-ID are added on the way out."""

    body: bytes
    status: int = 200
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


def json_response(doc: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    out = [(b"content-type", b"application/json")]
    out += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    return Response(json.dumps(doc, separators=(",", ":")).encode(), status, out)


def error_response(exc: ImgclassError) -> Response:
    return json_response(exc.to_json(), exc.status, exc.http_headers())


Handler = Callable[[Request], Awaitable[Response]]
Hook = Callable[[], Awaitable[None]]
OnDone = Callable[[Request, int, float], None]


@dataclass(frozen=True)
class Route:
    handler: Handler
    body: bool  # read the request body before calling the handler
    # Seconds after which the connection is watched, and the handler cancelled if the client has
    # left (None: never). A watcher is a task; waiting a little before starting it means that the
    # many requests answered sooner pay nothing for it.
    watch: float | None


@dataclass(frozen=True)
class Limits:
    """What a request may cost before a handler sees it; the head itself is bounded by the server."""

    max_upload: int  # the stated limit, as in --max-upload-mb
    envelope: int = 65536  # room for the multipart or base64 wrapping around a max-size image
    read_timeout_s: float = 60.0  # nginx's client_body_timeout: the longest pause between two reads
    body_timeout_s: float = 900.0  # the longest a whole upload may take (a slow but honest client)
    linger_s: float = 5.0  # nginx's lingering_timeout: the longest pause in an upload we discard
    linger_total_s: float = 30.0  # nginx's lingering_time: the longest we discard at all

    @property
    def max_body(self) -> int:
        return self.max_upload + self.envelope


def too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The upload is larger than the {limit / 1e6:g} MB limit; send a smaller image.")


# X-Request-ID is copied into logs and other servers' requests: only a plain token is taken as
# given; anything else (too long, spaces, quotes, control characters) is replaced by a fresh id.
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:@+/=-]{1,128}")


def request_id(supplied: str | None) -> str:
    if supplied and REQUEST_ID_PATTERN.fullmatch(supplied):
        return supplied
    return log.new_request_id()


def _folded(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """Repeated headers folded into one, comma-separated (RFC 9110 section 5.3)."""
    headers: dict[str, str] = {}
    for raw_name, raw_value in raw:
        name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


class _ReadDeadline:
    """Read timeouts for one request body with at most one timer: nginx's client_body_timeout (the
    longest silence between reads) under an overall cap. Each read only records progress; the timer
    fires at the earliest time the request could be overdue and re-arms itself if it was not, so a
    body that arrives in one piece (the common case) costs one call_at and one cancel."""

    __slots__ = ("cap", "handle", "last", "loop", "read_timeout", "task", "tripped")

    def __init__(self, read_timeout: float, body_timeout: float) -> None:
        self.loop = asyncio.get_running_loop()
        now = self.loop.time()
        self.read_timeout = read_timeout
        self.cap = now + body_timeout
        self.last = now
        self.task = asyncio.current_task()
        self.tripped = False
        self.handle = self.loop.call_at(min(now + read_timeout, self.cap), self._check)

    def progress(self) -> None:
        self.last = self.loop.time()

    def _check(self) -> None:
        now = self.loop.time()
        due = min(self.last + self.read_timeout, self.cap)
        if now < due:
            self.handle = self.loop.call_at(due, self._check)
            return
        self.tripped = True
        assert self.task is not None
        self.task.cancel()

    def close(self) -> None:
        self.handle.cancel()

    def timed_out(self) -> bool:
        """After a CancelledError: True if we caused it (then the cancel is taken back)."""
        if not self.tripped:
            return False
        if hasattr(self.task, "uncancel"):
            self.task.uncancel()  # type: ignore[union-attr]
        return True


class _Watch:
    """Waits on receive() in a task of its own and cancels the handler's task if the client leaves."""

    __slots__ = ("done", "gone", "handler_task", "receive", "watcher")

    def __init__(self, handler_task: asyncio.Task[Any], receive: Receive) -> None:
        self.handler_task = handler_task
        self.receive = receive
        self.watcher: asyncio.Task[Message] | None = None
        self.gone = False
        self.done = False

    def start(self) -> None:
        self.watcher = asyncio.ensure_future(self.receive())
        self.watcher.add_done_callback(self._on_message)

    def _on_message(self, watcher: asyncio.Task[Message]) -> None:
        if self.done or watcher.cancelled() or watcher.exception() is not None:
            return
        if watcher.result()["type"] == "http.disconnect":
            self.gone = True
            self.handler_task.cancel()

    def stop(self) -> None:
        self.done = True
        if self.watcher is not None:
            self.watcher.cancel()


class _Close(Exception):
    """An error answered with Connection: close, after the rest of the upload is discarded (or not)."""

    def __init__(self, error: ImgclassError, discard: bool) -> None:
        super().__init__(error.message)
        self.error = error
        self.discard = discard


_PARAM = re.compile(r"(\{\w+\})")


def _compile(path: str) -> re.Pattern[str]:
    """'/v2/models/{model}/infer' -> a regex whose named groups are the {name} segments."""
    parts = _PARAM.split(path)
    return re.compile(
        "^" + "".join(f"(?P<{p[1:-1]}>[^/:]+)" if _PARAM.fullmatch(p) else re.escape(p) for p in parts) + "$"
    )


class App:
    """Routes by exact path (or a {name} pattern) and method; every failure becomes a JSON error."""

    def __init__(self, logger: log.EventLogger, limits: Limits, on_done: OnDone | None = None) -> None:
        self.logger = logger
        self.limits = limits
        self.on_done = on_done
        self.on_client_gone: Callable[[Request], None] | None = None
        self.routes: dict[str, dict[str, Route]] = {}
        self.patterns: list[tuple[re.Pattern[str], dict[str, Route]]] = []
        self.on_startup: list[Hook] = []
        self.on_shutdown: list[Hook] = []
        self.state: Any = None  # what the factory built (the model server, the balancer), for tests

    # --- building -----------------------------------------------------------------------

    def route(
        self, method: str, path: str, handler: Handler, *, body: bool | None = None, watch: float | None = None
    ) -> None:
        """`handler` answers `method path`; a GET route answers HEAD too (the server drops the body).

        watch=S: if the client disconnects while the handler runs, from S seconds on, the handler is
        cancelled (queued or forwarded work is dropped) and ClientGone is counted instead of an answer.
        """
        entry = Route(handler, method not in ("GET", "HEAD", "DELETE") if body is None else body, watch)
        if "{" in path:
            regex = _compile(path)
            methods = next((m for p, m in self.patterns if p.pattern == regex.pattern), None)
            if methods is None:
                methods = {}
                self.patterns.append((regex, methods))
        else:
            methods = self.routes.setdefault(path, {})
        methods[method] = entry
        if method == "GET":
            methods.setdefault("HEAD", entry)

    def paths(self) -> Iterator[str]:
        yield from self.routes
        yield from (p.pattern for p, _ in self.patterns)

    async def startup(self) -> None:
        for hook in self.on_startup:
            await hook()

    async def shutdown(self) -> None:
        for hook in self.on_shutdown:
            await hook()

    # --- ASGI ---------------------------------------------------------------------------

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
                    self.logger.error("startup_failed", type=type(exc).__name__, message=str(exc))
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        raw = scope["headers"]
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in raw}
        if len(headers) != len(raw):
            headers = _folded(raw)
        rid = request_id(headers.get("x-request-id"))
        request = Request(scope["method"], scope["path"], scope["query_string"], headers, rid)
        log.request_id.set(rid)
        close = False
        try:
            methods = self.routes.get(request.path)
            route = methods.get(request.method) if methods is not None else None
            if route is None:
                route = self._find(request)
            if route.body:
                request.body = await self._read_body(request, receive)
            if route.watch is not None:
                response = await self._watched(route.handler, request, receive, route.watch)
            else:
                response = await route.handler(request)
        except ClientGone:
            self.logger.info("client_gone", path=request.path, ms=round((time.perf_counter() - start) * 1000, 2))
            if self.on_client_gone is not None:
                self.on_client_gone(request)
            if self.on_done is not None:
                self.on_done(request, 499, time.perf_counter() - start)  # nginx's code for it
            return
        except _Close as early:
            close = True
            if early.discard:
                await self._discard(receive)
            response = self.error(request, early.error)
        except Exception as exc:
            response = self.error(request, exc)
        await self._send(send, request, response, close)
        if self.on_done is not None:
            self.on_done(request, response.status, time.perf_counter() - start)

    def _find(self, request: Request) -> Route:
        methods = self.routes.get(request.path)
        if methods is None:
            matched = [(m, c) for regex, c in self.patterns if (m := regex.match(request.path))]
            if not matched:
                raise NotFound(f"No route {request.path}; see the README for the API.")
            # the first pattern that takes this method, else the first that matched (for its 405)
            match, methods = next(((m, c) for m, c in matched if request.method in c), matched[0])
            request.params = match.groupdict()
        route = methods.get(request.method)
        if route is None:
            allowed = ", ".join(sorted(methods))
            raise MethodNotAllowed(f"{request.method} is not allowed on {request.path}; use {allowed}.", allowed)
        return route

    async def _read_body(self, request: Request, receive: Receive) -> bytes:
        """The whole body, within the size limit, with a timeout on each read and on the whole."""
        limits = self.limits
        declared = request.headers.get("content-length", "")
        expects = "100-continue" in request.headers.get("expect", "").lower()
        if declared.isdigit() and int(declared) > limits.max_body:
            # Refused before reading. A client that waits for 100 Continue has sent nothing more;
            # one that sends the whole body before reading gets the rest discarded first, so that it
            # sees this answer instead of a reset (nginx's lingering close).
            raise _Close(too_large(limits.max_upload), discard=not expects)
        chunks: list[bytes] = []
        size = 0
        deadline = _ReadDeadline(limits.read_timeout_s, limits.body_timeout_s)
        try:
            more = True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientGone("The client left while sending its request.")
                chunk = message.get("body", b"")
                if chunk:
                    size += len(chunk)
                    if size > limits.max_body:
                        raise _Close(too_large(limits.max_upload), discard=True)
                    chunks.append(chunk)
                    deadline.progress()
                more = message.get("more_body", False)
        except asyncio.CancelledError:
            if not deadline.timed_out():
                raise
            raise _Close(
                RequestTimeout(f"The request body stalled: nothing arrived for {limits.read_timeout_s:g} s, "
                               f"or it took over {limits.body_timeout_s:g} s in all."), discard=False
            ) from None
        finally:
            deadline.close()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _discard(self, receive: Receive) -> None:
        limits = self.limits
        deadline = time.monotonic() + limits.linger_total_s
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                message = await asyncio.wait_for(receive(), min(limits.linger_s, remaining))
            except (TimeoutError, asyncio.TimeoutError):
                return
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                return

    async def _watched(self, handler: Handler, request: Request, receive: Receive, after: float) -> Response:
        """Run `handler`; if the client disconnects (noticed from `after` s on), cancel it: ClientGone.

        With the body read, the next receive() returns only when the client disconnects (or the
        response is complete), so one waiting call watches the connection for the whole request.
        """
        task = asyncio.current_task()
        assert task is not None
        watch = _Watch(task, receive)
        if after > 0:
            timer = asyncio.get_running_loop().call_later(after, watch.start)
        else:
            timer = None
            watch.start()
        try:
            return await handler(request)
        except asyncio.CancelledError:
            if not watch.gone:
                raise
            if hasattr(task, "uncancel"):
                task.uncancel()  # the cancel was ours, not the server's: clear it
            raise ClientGone("The client left before its answer was ready.") from None
        finally:
            if timer is not None:
                timer.cancel()
            watch.stop()

    async def _send(self, send: Send, request: Request, response: Response, close: bool) -> None:
        headers = list(response.headers)
        if response.status not in (204, 304):  # these carry no body, and no Content-Length (RFC 9110)
            headers.append((b"content-length", b"%d" % len(response.body)))
        headers.append((b"x-request-id", request.id.encode("latin-1")))
        if close:
            headers.append((b"connection", b"close"))
        with contextlib.suppress(OSError):
            await send({"type": "http.response.start", "status": response.status, "headers": headers})
            await send({"type": "http.response.body", "body": response.body})

    def error(self, request: Request, exc: Exception) -> Response:
        """The JSON answer for an exception a handler raised, logged; a bug becomes one 500."""
        if isinstance(exc, ImgclassError):
            self.logger.info("error", path=request.path, status=exc.status, code=exc.code, message=exc.message)
            return error_response(exc)
        self.logger.error("exception", path=request.path, type=type(exc).__name__, message=str(exc))
        return error_response(unexpected())
