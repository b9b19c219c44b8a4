"""The upstream connection pool against raw in-process servers: stale resends, early hang-ups, callbacks, cancels."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import uvloop

from imgclass.upstream import HostPool, ReadTimeout, Response, UpstreamFailure

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


async def _request_path(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
    )
    await reader.readexactly(length)
    return head.split(b" ", 2)[1]


def _reply(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body


async def _serve(handler: Handler) -> tuple[asyncio.AbstractServer, str, list[int]]:
    """A server running `handler` per connection (numbered from 0); the list counts accepted connections."""
    accepted: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(len(accepted))
        try:
            await handler(reader, writer, accepted[-1])
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", accepted


@contextlib.asynccontextmanager
async def _pool(handler: Handler, read_timeout: float = 5.0) -> AsyncIterator[tuple[HostPool, list[int]]]:
    """A HostPool against a server running `handler`; both closed on the way out."""
    server, url, accepted = await _serve(handler)
    pool = HostPool(url, 1.0, read_timeout)
    try:
        yield pool, accepted
    finally:
        pool.close()
        server.close()
        await server.wait_closed()


async def _one_then_hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
    """Answers the first request on a connection; closes on the next without answering, as a server
    whose keep-alive timer fired just as that request arrived."""
    path = await _request_path(reader)
    writer.write(_reply(path))
    await writer.drain()
    await _request_path(reader)


def test_a_request_on_a_stale_keep_alive_connection_is_resent_on_a_fresh_one() -> None:
    async def scenario() -> None:
        async with _pool(_one_then_hang_up) as (pool, accepted):
            assert (await pool.request(b"/a", [], b"x")).body == b"/a"
            assert (await pool.request(b"/b", [], b"x")).body == b"/b"  # the reused connection was dropped
            assert len(accepted) == 2

            # The callback form does the same, from the protocol, without a task of the caller's.
            outcomes: list[tuple[Response | None, Exception | None]] = []
            done = asyncio.Event()

            def callback(response: Response | None, exc: Exception | None) -> None:
                outcomes.append((response, exc))
                done.set()

            assert pool.start(b"/c", [], b"x", callback)  # reuses the connection that answered /b
            await asyncio.wait_for(done.wait(), 5)
            assert [(r.body if r else None, e) for r, e in outcomes] == [(b"/c", None)]
            assert len(accepted) == 3

    asyncio.run(scenario())


def test_start_needs_an_idle_connection_and_reports_a_timeout_through_the_callback() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        path = await _request_path(reader)
        writer.write(_reply(path))  # the first request is answered, so the connection goes idle
        await writer.drain()
        await _request_path(reader)
        await asyncio.sleep(5)

    async def scenario() -> None:
        async with _pool(silent, read_timeout=0.2) as (pool, _):
            assert not pool.start(b"/a", [], b"", lambda r, e: None), "no idle connection yet"
            await pool.request(b"/a", [], b"")
            outcomes: list[Exception | None] = []
            assert pool.start(b"/b", [], b"", lambda r, e: outcomes.append(e))
            await asyncio.sleep(0.5)
            assert len(outcomes) == 1 and isinstance(outcomes[0], ReadTimeout)
            assert not pool.idle, "a timed-out connection is closed, never reused"

    asyncio.run(scenario())


def test_a_cancelled_request_never_hands_its_late_answer_to_the_next_one() -> None:
    async def delayed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        while True:
            path = await _request_path(reader)
            if path == b"/slow":
                await asyncio.sleep(0.3)
            writer.write(_reply(path))
            await writer.drain()

    async def scenario() -> None:
        async with _pool(delayed) as (pool, accepted):
            slow = asyncio.ensure_future(pool.request(b"/slow", [], b""))
            await asyncio.sleep(0.05)
            slow.cancel()
            assert (await pool.request(b"/next", [], b"")).body == b"/next"
            await asyncio.sleep(0.5)  # /slow's answer arrives and is discarded
            bodies = [(await pool.request(b"/%d" % i, [], b"")).body for i in range(3)]
            assert bodies == [b"/0", b"/1", b"/2"]
            assert len(accepted) == 2 and len(pool.idle) == 2, "both connections stay usable"

    asyncio.run(scenario())


def test_a_refused_connection_is_a_connect_failure() -> None:
    async def scenario() -> None:
        server, url, _ = await _serve(_one_then_hang_up)
        server.close()
        await server.wait_closed()
        pool = HostPool(url, 1.0, 1.0)
        try:
            await pool.request(b"/", [], b"")
        except UpstreamFailure as exc:
            assert exc.connect
        else:
            raise AssertionError("no failure")

    asyncio.run(scenario())


async def _hang_up_after_the_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
    """Connection 0 behaves as _one_then_hang_up; every later one is closed as soon as it is
    accepted, as by a backend whose process is dying while its listen socket still takes connections."""
    if number == 0:
        await _one_then_hang_up(reader, writer, number)


def _slow_to_send(pool: HostPool) -> None:
    """Let the server's hang-up reach the new connection before the pool writes the request on it."""
    connect = pool._connect

    async def connect_then_pause():  # type: ignore[no-untyped-def]
        conn = await connect()
        await asyncio.sleep(0.1)
        return conn

    pool._connect = connect_then_pause  # type: ignore[method-assign]


# The balancer runs on uvloop, whose transports raise where asyncio's drop the write: both are tested.
LOOPS = pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])


@LOOPS
def test_a_connection_closed_before_the_request_is_written_fails_as_a_refused_one(run) -> None:
    # It used to raise RuntimeError from the transport, which the balancer answered with a 500.
    async def scenario() -> None:
        async with _pool(lambda reader, writer, number: asyncio.sleep(0)) as (pool, accepted):
            _slow_to_send(pool)
            try:
                await asyncio.wait_for(pool.request(b"/", [], b"x"), 5)
            except UpstreamFailure as exc:
                assert exc.connect, exc.kind
            else:
                raise AssertionError("no failure")
            assert len(accepted) == 1

    run(scenario())


@LOOPS
def test_a_resend_on_a_connection_that_closed_at_once_still_calls_back(run) -> None:
    # The stale keep-alive resend ran in a task of the pool's own; the transport's RuntimeError
    # ended that task, and the request waited forever (the killed-backend test's rare timeout).
    async def scenario() -> None:
        async with _pool(_hang_up_after_the_first) as (pool, accepted):
            assert (await pool.request(b"/a", [], b"x")).body == b"/a"
            _slow_to_send(pool)
            outcomes: list[Exception | None] = []
            done = asyncio.Event()

            def callback(response: Response | None, exc: Exception | None) -> None:
                outcomes.append(exc)
                done.set()

            assert pool.start(b"/b", [], b"x", callback)  # dropped by connection 0, resent on connection 1
            await asyncio.wait_for(done.wait(), 5)
            await asyncio.sleep(0.1)
            assert len(outcomes) == 1 and isinstance(outcomes[0], UpstreamFailure) and outcomes[0].connect
            assert len(accepted) == 2

    run(scenario())


@LOOPS
def test_start_skips_an_idle_connection_the_server_has_closed(run) -> None:
    async def scenario() -> None:
        async with _pool(_one_then_hang_up) as (pool, _):
            await pool.request(b"/a", [], b"x")
            (conn,) = pool.idle
            conn.transport.close()  # as when the loop has seen the server's FIN but not yet called connection_lost
            assert not pool.start(b"/b", [], b"x", lambda r, e: None)
            assert not pool.idle

    run(scenario())


def test_a_backend_that_never_completes_the_handshake_is_a_connect_timeout() -> None:
    # A listener whose accept queue is full drops new SYNs: the client's connect hangs, as it
    # would behind a firewall or on a frozen host, until the pool's connect timeout.
    async def scenario(port: int) -> None:
        pool = HostPool(f"http://127.0.0.1:{port}", 0.3, 5.0)
        started = time.monotonic()
        try:
            await pool.request(b"/", [], b"x")
        except UpstreamFailure as exc:
            assert exc.connect and exc.reason == "connect failed: TimeoutError", exc.reason
        else:
            raise AssertionError("no failure")
        assert 0.25 < time.monotonic() - started < 2

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=2):  # fills the queue of one
            asyncio.run(scenario(port))
