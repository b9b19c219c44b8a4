"""The load generator's HTTP client against raw in-process servers: each failure gets its error type."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable

import pytest

from imgclass.measure import loadgen

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
    )
    return head + await reader.readexactly(length)


async def _outcomes(handler: Handler, requests: int = 1, timeout: float = 5.0) -> tuple[list[loadgen.Outcome], int]:
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
        async with loadgen.Client(8, timeout) as client:
            for _ in range(requests):
                outcomes.append(
                    await loadgen.send(
                        client, f"http://127.0.0.1:{port}/predict?x=1", b"body", [("Content-Type", "a/b")], True
                    )
                )
    finally:
        server.close()
        await server.wait_closed()
    return outcomes, accepted


def _reply(status: int, body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n%s\r\n" % (status, len(body), extra) + body


def test_success_keeps_the_connection_and_reads_backend_and_station_time() -> None:
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

    outcomes, accepted = asyncio.run(_outcomes(handler, requests=3))
    assert [o.status for o in outcomes] == [200, 200, 200]
    assert {o.backend for o in outcomes} == {"http://b1"}
    assert {o.error for o in outcomes} == {""}
    assert outcomes[0].station_ms == pytest.approx(4.0)
    assert accepted == 1, "keep-alive: three requests, one connection"
    assert seen[0].startswith(b"POST /predict?x=1 HTTP/1.1\r\n")
    assert b"\r\nContent-Type: a/b\r\n" in seen[0] and seen[0].endswith(b"\r\n\r\nbody")


def test_http_error_status_is_its_own_type() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(_reply(503, b'{"error": "overloaded"}', b"Retry-After: 1\r\n"))
        await writer.drain()

    outcomes, _ = asyncio.run(_outcomes(handler))
    assert (outcomes[0].status, outcomes[0].error) == (503, "http_503")


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (b"", "server_disconnected"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b", "payload_error"),
        (b"SMTP ready\r\n\r\n", "bad_response"),
    ],
)
def test_broken_replies(reply: bytes, error: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(reply)
        await writer.drain()

    outcomes, _ = asyncio.run(_outcomes(handler))
    assert (outcomes[0].status, outcomes[0].error) == (0, error)


def test_silent_server_times_out() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        await asyncio.sleep(2)

    outcomes, _ = asyncio.run(_outcomes(handler, timeout=0.2))
    assert (outcomes[0].status, outcomes[0].error) == (0, "timeout")


def test_refused_connection() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connecting is refused

        async def go() -> loadgen.Outcome:
            async with loadgen.Client(2, 2.0) as client:
                return await loadgen.send(client, f"http://127.0.0.1:{port}/", b"", [])

        out = asyncio.run(go())
    assert (out.status, out.error) == (0, "connect_error")
