"""Pooled keep-alive HTTP/1.1 connections to model servers, parsed by httptools (llhttp).

The balancer forwards every request through here. aiohttp's client spends ~0.16 ms of CPU per
request on this machine whatever the body size; a protocol that writes one prebuilt request and
feeds the reply to llhttp spends a fraction of that (bench/balancer.py measures the whole path).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools


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
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        lower = name.lower()
        return next((v for k, v in self.headers if k.lower() == lower), None)


class _Connection(asyncio.Protocol):
    """One keep-alive connection; carries one request at a time."""

    def __init__(self, pool: HostPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[Response] | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.got_bytes = False
        self.closed = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamFailure(f"bad response: {exc}", kind="bad_response"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.waiter is not None and not self.waiter.done():
            if self.got_bytes:
                failure = UpstreamFailure("response cut short", kind="cut_short")
            else:
                failure = UpstreamFailure("connection closed before a response", kind="closed")
            self.waiter.set_exception(failure)

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        response = Response(self.parser.get_status_code(), self.headers, b"".join(self.body))
        keep = self.parser.should_keep_alive()
        self.headers, self.body, self.got_bytes = [], [], False
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(response)
        if keep and not self.closed:
            self.pool.release(self)
        else:
            self.close()

    def _fail(self, exc: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def close(self) -> None:
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

    def release(self, conn: _Connection) -> None:
        if len(self.idle) < self.max_idle:
            self.idle.append(conn)
        else:
            conn.close()

    def forget(self, conn: _Connection) -> None:
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self), self.host, self.port), self.connect_timeout
            )
        except (OSError, asyncio.TimeoutError) as exc:
            raise UpstreamFailure(f"connect failed: {exc or type(exc).__name__}", kind="connect") from None
        return conn

    async def request(self, path: bytes, headers: list[tuple[str, str]], body: bytes) -> Response:
        reused = bool(self.idle)
        conn = self.idle.pop() if reused else await self._connect()
        try:
            return await self._send(conn, path, headers, body)
        except UpstreamFailure as exc:
            if not (reused and exc.kind == "closed"):
                raise
        # The server closed an idle keep-alive connection as we reused it: one fresh try, same backend.
        return await self._send(await self._connect(), path, headers, body)

    async def _send(self, conn: _Connection, path: bytes, headers: list[tuple[str, str]], body: bytes) -> Response:
        head = [b"POST ", self.prefix, path, self.request_line_end]
        for name, value in headers:
            head += [name.encode("latin-1"), b": ", value.encode("latin-1"), b"\r\n"]
        head.append(b"Content-Length: %d\r\n\r\n" % len(body))
        head.append(body)
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        conn.waiter = loop.create_future()
        assert conn.transport is not None
        conn.transport.write(b"".join(head))
        timer = loop.call_later(self.read_timeout, _expire, conn)
        try:
            return await conn.waiter
        except asyncio.CancelledError:
            conn.close()  # the client went away mid-request: this connection's next bytes are not ours
            raise
        finally:
            timer.cancel()

    def close(self) -> None:
        while self.idle:
            self.idle.pop().close()


def _expire(conn: _Connection) -> None:
    if conn.waiter is not None and not conn.waiter.done():
        conn.waiter.set_exception(ReadTimeout())
    conn.close()  # a late reply must not be read as the answer to the next request
