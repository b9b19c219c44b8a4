"""The load generator's own lean HTTP/1.1 client: keep-alive connections, replies parsed by llhttp.

The one hand-written HTTP client in the package, and confined to measure/: the servers and the
balancer stand on uvicorn and aiohttp. It stays because the generator shares the cores with what
it measures, and it must send on schedule: bench/loadgen.py runs both clients at the same rates,
and at 1000 req/s aiohttp's client costs about twice the CPU per request and leaves its sends
tens of times later at p99 (the send lag, which latency from the scheduled time then includes).
tests/measure/test_clients.py runs it against uvicorn and against raw sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools


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


class UpstreamFailure(Exception):
    """The backend gave no response; `kind` says how far the exchange got.

    connect: no connection, so the request was never sent. closed: the connection closed before
    any byte of a response. cut_short: it closed mid-response. bad_response: the bytes were not HTTP.
    """

    def __init__(self, reason: str, *, kind: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind

    @property
    def connect(self) -> bool:
        return self.kind == "connect"


class ReadTimeout(Exception):
    """The backend accepted the request but did not answer in time."""


@dataclass
class HttpReply:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        lower = name.lower()
        return next((v for k, v in self.headers if k.lower() == lower), None)


# Called exactly once per request: (response, None) or (None, UpstreamFailure | ReadTimeout).
Callback = Callable[[HttpReply | None, Exception | None], None]


class _Connection(asyncio.Protocol):
    """One keep-alive connection; carries one request at a time."""

    def __init__(self, pool: HostPool, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.callback: Callback | None = None
        self.resend: tuple[bytes, bytes] | None = None  # the request, kept while a stale reused connection may drop it
        self.deadline = Deadline(loop)  # the read timeout of the request in flight
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.got_bytes = False
        self.closed = False

    @property
    def usable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.close()
            self._finish(None, UpstreamFailure(f"bad response: {exc}", kind="bad_response"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.deadline.cancel()
        self.pool.forget(self)
        if self.callback is None:
            return
        if self.got_bytes:
            self._finish(None, UpstreamFailure("response cut short", kind="cut_short"))
        elif self.resend is not None:
            # The server closed an idle keep-alive connection as we reused it: it cannot have
            # seen the request, so one fresh connection to the same backend gets it instead.
            callback, payload = self.callback, self.resend
            self.callback = self.resend = None
            self.deadline.clear()
            self.pool.retry_fresh(payload, callback)
        else:
            self._finish(None, UpstreamFailure("connection closed before a response", kind="closed"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        response = HttpReply(self.parser.get_status_code(), self.headers, body)
        keep = self.parser.should_keep_alive()
        self.headers, self.body, self.got_bytes = [], [], False
        # back in the pool before the callback runs, so that what it sends next may reuse us
        if keep and not self.closed:
            self.pool.release(self)
        else:
            self.close()
        self._finish(response, None)

    def _finish(self, response: HttpReply | None, exc: Exception | None) -> None:
        callback = self.callback
        self.callback = self.resend = None
        self.deadline.clear()
        if callback is not None:
            callback(response, exc)

    def expire(self) -> None:
        self.close()  # a late reply must not be read as the answer to the next request
        self._finish(None, ReadTimeout())

    def close(self) -> None:
        self.deadline.cancel()
        if not self.closed:
            self.closed = True
            self.pool.forget(self)
            if self.transport is not None:
                self.transport.close()


class HostPool:
    """Idle connections to one backend, most recently used first."""

    def __init__(self, url: str, connect_timeout: float, read_timeout: float, max_idle: int = 256) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http":
            raise ValueError(f"{url}: only http:// backends are supported by the fast path")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.host_header = parts.netloc.encode()
        self.prefix = parts.path.rstrip("/").encode()
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_idle = max_idle
        self.idle: deque[_Connection] = deque()
        self.request_line_end = b" HTTP/1.1\r\nHost: " + self.host_header + b"\r\n"
        # asyncio.get_running_loop() costs a getpid() system call on Python 3.11: look it up once.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def release(self, conn: _Connection) -> None:
        if len(self.idle) < self.max_idle:
            self.idle.append(conn)
        else:
            conn.close()

    def forget(self, conn: _Connection) -> None:
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)

    def encode(self, path: bytes, headers: list[tuple[str, str]], body: bytes) -> tuple[bytes, bytes]:
        """The request head, and the body as it is: sent with one writev, never copied into one buffer."""
        head = [b"POST ", self.prefix, path, self.request_line_end]
        for name, value in headers:
            head += [name.encode("latin-1"), b": ", value.encode("latin-1"), b"\r\n"]
        head.append(b"Content-Length: %d\r\n\r\n" % len(body))
        return b"".join(head), body

    def start(self, path: bytes, headers: list[tuple[str, str]], body: bytes, callback: Callback) -> bool:
        """Send on an idle connection now and call back with the outcome; False if none is idle."""
        while self.idle:
            conn = self.idle.pop()
            if conn.usable:
                self._send(conn, self.encode(path, headers, body), callback, reused=True)
                return True
            conn.close()  # the server hung up and the loop has not yet told us (connection_lost pending)
        return False

    async def request(self, path: bytes, headers: list[tuple[str, str]], body: bytes) -> HttpReply:
        future: asyncio.Future[HttpReply] = self._get_loop().create_future()

        def done(response: HttpReply | None, exc: Exception | None) -> None:
            if not future.done():  # a caller that was cancelled no longer wants it
                if exc is not None:
                    future.set_exception(exc)
                else:
                    future.set_result(response)  # type: ignore[arg-type]

        if not self.start(path, headers, body, done):
            self._send(await self._connect(), self.encode(path, headers, body), done, reused=False)
        # Cancelling the wait leaves the connection to read and discard the answer, then rejoin
        # the pool, so nothing late is ever taken for the reply to a later request.
        return await future

    def retry_fresh(self, payload: tuple[bytes, bytes], callback: Callback) -> None:
        task = self._get_loop().create_task(self._resend(payload, callback))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resend(self, payload: tuple[bytes, bytes], callback: Callback) -> None:
        try:
            conn = await self._connect()
        except UpstreamFailure as exc:
            callback(None, exc)
            return
        except asyncio.CancelledError:  # the pool is closing: the waiting request still gets an answer
            callback(None, UpstreamFailure("connection pool closed", kind="connect"))
            raise
        self._send(conn, payload, callback, reused=False)

    def _send(self, conn: _Connection, payload: tuple[bytes, bytes], callback: Callback, reused: bool) -> None:
        if not reused and not conn.usable:  # start() checked the reused ones, and skips closed ones
            # A fresh connection can close between connecting and sending (a backend dying with its
            # listen socket still open). uvloop's write would raise and asyncio's drop the request,
            # which then never gets an answer: it never left, so it fails as a refused connection.
            conn.close()
            callback(None, UpstreamFailure("connection closed before the request was sent", kind="connect"))
            return
        conn.callback = callback
        conn.resend = payload if reused else None
        conn.transport.writelines(payload)  # type: ignore[union-attr]
        conn.deadline.set(self.read_timeout, conn.expire)

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    async def _connect(self) -> _Connection:
        loop = self._get_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self, loop), self.host, self.port), self.connect_timeout
            )
        except (OSError, asyncio.TimeoutError) as exc:
            # a timeout's str() is empty: name it
            raise UpstreamFailure(f"connect failed: {str(exc) or type(exc).__name__}", kind="connect") from None
        return conn

    def close(self) -> None:
        while self.idle:
            self.idle.pop().close()
        for task in list(self._tasks):
            task.cancel()
