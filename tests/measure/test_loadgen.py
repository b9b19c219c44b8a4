"""The load generator's two HTTP clients against raw in-process servers and uvicorn: each failure gets its error type."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable

import pytest

from imgclass.measure import loadgen
from imgclass.measure.clients import CLIENTS

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
    )
    return head + await reader.readexactly(length)


async def _outcomes(
    handler: Handler, requests: int = 1, timeout: float = 5.0, client: str = "lean"
) -> tuple[list[loadgen.Outcome], int]:
    """Send `requests` POSTs one after another to a server running `handler`; also count its connections."""
    accepted = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    outcomes = []
    try:
        async with CLIENTS[client](8, timeout) as session:
            for _ in range(requests):
                outcomes.append(
                    await loadgen.send(
                        session, f"http://127.0.0.1:{port}/predict?x=1", b"body", {"Content-Type": "a/b"}, True
                    )
                )
    finally:
        server.close()
        await server.wait_closed()
    return outcomes, accepted


def _reply(status: int, body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n%s\r\n" % (status, len(body), extra) + body


CLIENT_NAMES = pytest.mark.parametrize("client", list(CLIENTS))


@CLIENT_NAMES
def test_success_keeps_the_connection_and_reads_backend_and_station_time(client: str) -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                seen.append(await _read_request(reader))
            except asyncio.IncompleteReadError:
                return
            body = json.dumps({"timing_ms": {"queue": 1.5, "decode": 0.5, "infer": 2.0}}).encode()
            writer.write(_reply(200, body, b"X-Backend: http://b1\r\n"))
            await writer.drain()

    outcomes, accepted = asyncio.run(_outcomes(handler, requests=3, client=client))
    assert [o.status for o in outcomes] == [200, 200, 200]
    assert {o.backend for o in outcomes} == {"http://b1"}
    assert {o.error for o in outcomes} == {""}
    assert outcomes[0].station_ms == pytest.approx(4.0)
    assert accepted == 1, "keep-alive: three requests, one connection"
    assert seen[0].startswith(b"POST /predict?x=1 HTTP/1.1\r\n")
    assert b"\r\nContent-Type: a/b\r\n" in seen[0] and seen[0].endswith(b"\r\n\r\nbody")


@CLIENT_NAMES
def test_against_uvicorn_large_bodies_keep_the_connection(client: str) -> None:
    """The lean client is tested against a maintained server too, with bodies larger than one read."""
    from ..conftest import ServedApp

    connections: set[object] = set()

    async def app(scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return
        connections.add(scope["client"])
        size, more = 0, True
        while more:
            message = await receive()
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
        body = json.dumps({"size": size}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"%d" % len(body)), (b"x-served-by", b"uv")]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})

    served = ServedApp(app)
    try:

        async def go() -> list[loadgen.Outcome]:
            async with CLIENTS[client](4, 5.0) as session:
                return [await loadgen.send(session, served.url + "/x", b"z" * 300_000, {"Content-Type": "a/b"})
                        for _ in range(5)]  # fmt: skip

        outcomes = asyncio.run(go())
    finally:
        served.stop()
    assert [(o.status, o.error, o.backend) for o in outcomes] == [(200, "", "uv")] * 5
    assert len(connections) == 1


@CLIENT_NAMES
def test_http_error_status_is_its_own_type(client: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(_reply(503, b'{"error": "overloaded"}', b"Retry-After: 1\r\n"))
        await writer.drain()

    outcomes, _ = asyncio.run(_outcomes(handler, client=client))
    assert (outcomes[0].status, outcomes[0].error) == (503, "http_503")


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (b"", "server_disconnected"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b", "payload_error"),
        (b"SMTP ready\r\n\r\n", "bad_response"),
    ],
)
@CLIENT_NAMES
def test_broken_replies(reply: bytes, error: str, client: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(reply)
        await writer.drain()

    outcomes, _ = asyncio.run(_outcomes(handler, client=client))
    assert (outcomes[0].status, outcomes[0].error) == (0, error)


@CLIENT_NAMES
def test_silent_server_times_out(client: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        await asyncio.sleep(2)

    outcomes, _ = asyncio.run(_outcomes(handler, timeout=0.2, client=client))
    assert (outcomes[0].status, outcomes[0].error) == (0, "timeout")


@CLIENT_NAMES
def test_refused_connection(client: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connecting is refused

        async def go() -> loadgen.Outcome:
            async with CLIENTS[client](2, 2.0) as session:
                return await loadgen.send(session, f"http://127.0.0.1:{port}/", b"", {})

        out = asyncio.run(go())
    assert (out.status, out.error) == (0, "connect_error")
