"""HTTP as clients see it: an app on a real uvicorn on an ephemeral port, spoken to over raw sockets."""

from __future__ import annotations

import asyncio
import json
import selectors
import socket
import time
from collections.abc import Iterator

import pytest

from imgclass import log
from imgclass.web.app import App, Limits, Request, Response, json_response

from ..conftest import ServedApp

LIMITS = Limits(max_upload=100_000, envelope=0, read_timeout_s=0.5, body_timeout_s=5.0, linger_s=1.0)
KEEP_ALIVE_S = 1.0


def make_app() -> App:
    app = App(log.get_logger("test", "web", "WARNING"), LIMITS)

    async def echo(request: Request) -> Response:
        doc = {"method": request.method, "length": len(request.body), "query": request.query}
        return json_response(doc)

    async def slow(request: Request) -> Response:
        await asyncio.sleep(float(request.query.get("s", "0.5")))
        return json_response({"slept": True})

    app.route("GET", "/echo", echo)
    app.route("POST", "/echo", echo)
    app.route("GET", "/slow", slow)
    return app


@pytest.fixture(params=["httptools", "h11"])
def running(request: pytest.FixtureRequest) -> Iterator[ServedApp]:
    served = ServedApp(make_app(), http=request.param, keep_alive_s=KEEP_ALIVE_S, max_head_bytes=8192)
    try:
        yield served
    finally:
        served.stop()


@pytest.fixture
def h11_server() -> Iterator[ServedApp]:
    served = ServedApp(make_app(), http="h11", keep_alive_s=KEEP_ALIVE_S, max_head_bytes=8192)
    try:
        yield served
    finally:
        served.stop()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def read_response(conn: socket.socket, buf: bytearray) -> tuple[int, dict[str, str], bytes]:
    """One response off the connection; `buf` keeps what arrived beyond it."""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response; got {bytes(buf)!r}")
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    buf[:] = rest
    while len(buf) < length:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("closed mid-body")
        buf += chunk
    body = bytes(buf[:length])
    del buf[:length]
    return status, headers, body


def read_until_closed(conn: socket.socket, buf: bytearray, within: float = 3.0) -> bytes | None:
    """What arrives until the server closes (with what `buf` held), or None if it does not close in time."""
    conn.settimeout(within)
    data = bytes(buf)
    try:
        while chunk := conn.recv(65536):
            data += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return data


def closed_by_server(conn: socket.socket, within: float = 3.0) -> bool:
    conn.settimeout(within)
    try:
        return conn.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def nothing_more(conn: socket.socket, buf: bytearray, wait: float = 0.3) -> bool:
    """No further response arrives: no stray answer to a request that was never made."""
    conn.settimeout(wait)
    try:
        more = conn.recv(65536)
    except TimeoutError:
        return not buf
    return not buf and not more


def test_keep_alive_and_pipelined_requests_are_answered_in_order(running: ServedApp) -> None:
    with connect(running.port) as conn:
        conn.sendall(
            b"GET /echo?n=1 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /echo?n=2 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
            b"GET /slow?s=0.05 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /echo?n=3 HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        buf = bytearray()
        answers = [read_response(conn, buf) for _ in range(4)]
        assert [s for s, _, _ in answers] == [200, 200, 200, 200]
        docs = [json.loads(b) for _, _, b in answers]
        assert docs[0]["query"] == {"n": "1"} and docs[1] == {"method": "POST", "length": 5, "query": {"n": "2"}}
        assert docs[2] == {"slept": True} and docs[3]["query"] == {"n": "3"}
        assert all("connection" not in h and h["x-request-id"] and h["date"] for _, h, _ in answers)
        conn.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")  # the same connection is still open
        assert read_response(conn, buf)[0] == 200


def test_a_404_with_a_large_body_pipelined_before_a_request_gets_exactly_one_answer_each(running: ServedApp) -> None:
    # The hand-written front end counted the 404's unread 70 KB against the next request's head
    # and sent an unrequested 431: a pipelining client or a proxy would then pair answers wrongly.
    body = b"x" * 70_000
    with connect(running.port) as conn:
        conn.sendall(b"POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
                     + b"GET /echo?after=1 HTTP/1.1\r\nHost: x\r\n\r\n")  # fmt: skip
        buf = bytearray()
        first, second = read_response(conn, buf), read_response(conn, buf)
        assert (first[0], json.loads(first[2])["error"]) == (404, "not_found")
        assert (second[0], json.loads(second[2])["query"]) == (200, {"after": "1"})
        assert "connection" not in first[1] and "connection" not in second[1]
        assert nothing_more(conn, buf)


def test_a_100_kb_upload_keeps_the_connection_alive(running: ServedApp) -> None:
    big = App(log.get_logger("test", "web", "WARNING"), Limits(max_upload=1_000_000))

    async def echo(request: Request) -> Response:
        return json_response({"length": len(request.body)})

    big.route("POST", "/echo", echo)
    served = ServedApp(big, http=running.server.config.http)
    try:
        with connect(served.port) as conn:
            buf = bytearray()
            for _ in range(3):
                conn.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 104000\r\n\r\n" + b"j" * 104_000)
                status, headers, raw = read_response(conn, buf)
                assert (status, json.loads(raw)["length"]) == (200, 104_000)
                assert "connection" not in headers  # no Connection: close: the next photo reuses it
    finally:
        served.stop()


def test_every_split_of_a_request_gets_the_same_single_answer(running: ServedApp) -> None:
    raw = b"POST /echo?split=1 HTTP/1.1\r\nHost: x\r\nContent-Type: a/b\r\nContent-Length: 11\r\n\r\nhello world"
    answers = set()
    for cut in range(1, len(raw)):
        with connect(running.port) as conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.sendall(raw[:cut])
            time.sleep(0.002)  # so that the server reads the two parts separately
            conn.sendall(raw[cut:])
            buf = bytearray()
            status, _, body = read_response(conn, buf)
            answers.add((status, body))
            assert nothing_more(conn, buf, wait=0.02)
    assert answers == {(200, b'{"method":"POST","length":11,"query":{"split":"1"}}')}


def test_expect_100_continue(running: ServedApp) -> None:
    with connect(running.port) as conn:
        conn.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n")
        assert conn.recv(64).lower() == b"http/1.1 100 continue\r\n\r\n"
        conn.sendall(b"0123456789")
        status, _, body = read_response(conn, bytearray())
        assert status == 200 and json.loads(body)["length"] == 10


def test_declared_oversize_body_is_413_before_upload_and_closes(running: ServedApp) -> None:
    with connect(running.port) as conn:
        conn.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\nExpect: 100-continue\r\n\r\n")
        status, headers, body = read_response(conn, bytearray())
        assert status == 413 and headers["connection"] == "close"
        assert json.loads(body)["error"] == "payload_too_large"
        assert "0.1 MB limit" in json.loads(body)["message"]  # the configured limit, not limit + envelope
        assert closed_by_server(conn)


def test_client_that_sends_the_whole_oversize_body_first_still_reads_413(running: ServedApp) -> None:
    # Most clients (http.client, requests, curl without Expect) send the whole body before reading.
    # Closing on them with unread bytes would make the kernel answer with a reset, not our 413.
    with connect(running.port) as conn:
        size, piece = 1_000_000, b"x" * 50_000
        conn.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(size // len(piece)):
            time.sleep(0.005)  # still uploading while the server discards
            conn.sendall(piece)  # raises ConnectionResetError if the server hung up
        status, headers, raw = read_response(conn, bytearray())
        assert status == 413 and headers["connection"] == "close"
        assert json.loads(raw)["error"] == "payload_too_large"
        assert closed_by_server(conn)


def test_chunked_bodies_are_read_and_limited(running: ServedApp) -> None:
    with connect(running.port) as conn:
        conn.sendall(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n3\r\nefg\r\n0\r\n\r\n"
        )
        status, _, body = read_response(conn, bytearray())
        assert status == 200 and json.loads(body)["length"] == 7
    with connect(running.port) as conn:
        conn.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n" % 60_000 + b"z" * 60_000 + b"\r\n"
        conn.sendall(chunk + chunk + b"0\r\n\r\n")  # 120 KB in all, over the 100 KB limit
        status, _, body = read_response(conn, bytearray())
        assert status == 413 and json.loads(body)["error"] == "payload_too_large"
        assert closed_by_server(conn)


@pytest.mark.parametrize(
    "raw",
    [b"NOT HTTP AT ALL\r\n\r\n", b"GET /echo HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n"],
    ids=["garbage", "bad content-length"],
)
def test_malformed_http_gets_400_and_a_close(running: ServedApp, raw: bytes) -> None:
    # uvicorn answers these itself, before any app code runs: plain text, not our JSON (README).
    with connect(running.port) as conn:
        conn.sendall(raw)
        buf = bytearray()
        status, headers, body = read_response(conn, buf)
        assert status == 400 and headers["connection"] == "close"
        # h11's answer has no Content-Length: its body runs to the close, and may come in its own segment
        rest = read_until_closed(conn, buf)
        assert rest is not None, "the server kept the connection open"
        assert b"Invalid HTTP request" in body + rest


@pytest.mark.parametrize(
    "pieces",
    [
        [b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: "] + [b"a" * 100_000] * 10 + [b"\r\n\r\n"],
        [b"GET /echo HTTP/1.1\r\nX-Long: ", b"a" * 9000],  # a head that never ends
    ],
    ids=["1 MB header", "never ends"],
)
def test_h11_bounds_the_request_head(h11_server: ServedApp, pieces: list[bytes]) -> None:
    # With --http h11, uvicorn refuses a head that grows past max_head_bytes before it is complete
    # (h11_max_incomplete_event_size), so a client cannot make it buffer without bound; with
    # httptools it does not (README, "HTTP"): put HAProxy in front for untrusted clients.
    with connect(h11_server.port) as conn:
        try:
            for piece in pieces:
                conn.sendall(piece)
                time.sleep(0.01)
        except OSError:
            pass  # the server may have answered and hung up mid-upload
        buf = bytearray()
        status, headers, _ = read_response(conn, buf)
        # no Content-Length: the body runs to the close (see test_malformed_http_gets_400_and_a_close)
        assert status == 400 and headers["connection"] == "close" and read_until_closed(conn, buf) is not None


def test_upgrade_is_answered_as_plain_http(running: ServedApp) -> None:
    with connect(running.port) as conn:
        conn.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        status, _, body = read_response(conn, bytearray())
        assert status == 200 and json.loads(body)["method"] == "GET"


def test_a_request_that_stalls_gets_408(running: ServedApp) -> None:
    with connect(running.port) as conn:
        conn.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n01234")  # and no more
        started = time.monotonic()
        status, headers, body = read_response(conn, bytearray())
        assert status == 408 and json.loads(body)["error"] == "request_timeout"
        assert LIMITS.read_timeout_s * 0.8 <= time.monotonic() - started <= LIMITS.read_timeout_s + 1
        assert headers["connection"] == "close" and closed_by_server(conn)


def test_a_slow_but_steady_upload_is_not_cut(running: ServedApp) -> None:
    # The read timeout is per read (nginx's client_body_timeout), not a deadline for the whole body:
    # pieces 0.3 s apart, 1.5 s in all, pass under a 0.5 s read timeout.
    with connect(running.port) as conn:
        conn.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n")
        for _ in range(5):
            time.sleep(0.3)
            conn.sendall(b"0123456789")
        status, _, body = read_response(conn, bytearray())
        assert status == 200 and json.loads(body)["length"] == 50


def test_idle_keep_alive_connection_is_closed(running: ServedApp) -> None:
    with connect(running.port) as conn:
        conn.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(conn, bytearray())[0] == 200
        started = time.monotonic()
        assert closed_by_server(conn, within=KEEP_ALIVE_S + 2)
        assert time.monotonic() - started >= KEEP_ALIVE_S * 0.8


def test_http10_and_connection_close_end_the_connection(running: ServedApp) -> None:
    for raw in (b"GET /echo HTTP/1.0\r\n\r\n", b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"):
        with connect(running.port) as conn:
            conn.sendall(raw)
            status, headers, _ = read_response(conn, bytearray())
            assert status == 200 and closed_by_server(conn)
            assert headers.get("connection") == "close" or raw.startswith(b"GET /echo HTTP/1.0")


def test_head_has_headers_but_no_body(running: ServedApp) -> None:
    with connect(running.port) as conn:
        conn.sendall(b"HEAD /echo HTTP/1.1\r\nHost: x\r\n\r\nGET /echo?after=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        buf = bytearray()
        while b"\r\n\r\n" not in buf:
            buf += conn.recv(65536)
        head, _, rest = bytes(buf).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"content-length: " in head.lower()
        # the next bytes are the GET's answer, not a HEAD body
        status, _, body = read_response(conn, bytearray(rest))
        assert status == 200 and json.loads(body)["query"] == {"after": "1"}


def test_unknown_route_and_method_are_json(running: ServedApp) -> None:
    with connect(running.port) as conn:
        conn.sendall(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\nDELETE /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        buf = bytearray()
        status, _, body = read_response(conn, buf)
        assert status == 404 and json.loads(body)["error"] == "not_found"
        status, headers, body = read_response(conn, buf)
        assert status == 405 and headers["allow"] == "GET, HEAD, POST"


def test_drain_finishes_in_flight_requests_then_refuses() -> None:
    served = ServedApp(make_app())
    conn = connect(served.port)
    idle = connect(served.port)
    try:
        conn.sendall(b"GET /slow?s=0.5 HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.15)  # the request is in the handler
        served.server.should_exit = True  # what SIGTERM does
        status, headers, body = read_response(conn, bytearray())
        assert status == 200 and json.loads(body) == {"slept": True} and headers["connection"] == "close"
        assert closed_by_server(conn) and closed_by_server(idle)
        served.thread.join(10)
        with pytest.raises(OSError):
            connect(served.port).sendall(b"GET /echo HTTP/1.1\r\n\r\n")
    finally:
        conn.close()
        idle.close()
        served.stop()


def test_a_burst_of_connections_waits_in_the_listen_backlog(running: ServedApp) -> None:
    # While the loop is busy, only the kernel completes handshakes, up to the listen backlog
    # (1024, web.server.BACKLOG): asyncio's default of 100 dropped the rest of a burst.
    n = 300
    running.loop.call_soon_threadsafe(time.sleep, 1.5)  # the loop accepts nothing meanwhile
    time.sleep(0.1)
    conns: list[socket.socket] = []
    selector = selectors.DefaultSelector()
    try:
        for _ in range(n):
            conn = socket.socket()
            conns.append(conn)
            conn.setblocking(False)
            conn.connect_ex(("127.0.0.1", running.port))
            selector.register(conn, selectors.EVENT_WRITE)
        established = 0
        deadline = time.monotonic() + 1.0
        while established < n and time.monotonic() < deadline:
            for key, _ in selector.select(0.05):
                selector.unregister(key.fileobj)
                established += key.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0  # type: ignore[union-attr]
        assert established == n, f"only {established} of {n} handshakes completed while the loop was busy"
        for conn in conns:
            conn.setblocking(True)
            conn.settimeout(10)
            conn.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        assert [read_response(conn, bytearray())[0] for conn in conns] == [200] * n
    finally:
        selector.close()
        for conn in conns:
            conn.close()
