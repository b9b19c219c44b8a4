"""The load generator's HTTP clients behind one interface: the lean one (default) and aiohttp's."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
from yarl import URL

from .lean_http import HostPool, ReadTimeout, UpstreamFailure


@dataclass(frozen=True)
class Reply:
    status: int
    backend: str  # X-Backend (the balancer's choice) or X-Served-By (a model server's name)
    body: bytes


class GeneratorClient:
    """Keep-alive connections per origin for one run; `post` raises the client's own errors."""

    name = ""

    def __init__(self, max_connections: int, timeout: float) -> None:
        self.max_connections = max_connections
        self.timeout = timeout

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Reply:
        raise NotImplementedError

    async def __aenter__(self) -> GeneratorClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


class LeanClient(GeneratorClient):
    """lean_http's pools: a prebuilt request written once, the reply parsed by llhttp."""

    name = "lean"

    def __init__(self, max_connections: int, timeout: float) -> None:
        super().__init__(max_connections, timeout)
        self._pools: dict[str, HostPool] = {}
        self._routes: dict[str, tuple[HostPool, bytes]] = {}

    def _route(self, url: str) -> tuple[HostPool, bytes]:
        route = self._routes.get(url)
        if route is None:
            parts = urlsplit(url)
            origin = f"{parts.scheme}://{parts.netloc}"
            pool = self._pools.get(origin)
            if pool is None:
                pool = self._pools[origin] = HostPool(origin, self.timeout, self.timeout, self.max_connections)
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            route = self._routes[url] = (pool, path.encode("latin-1"))
        return route

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Reply:
        pool, path = self._route(url)
        response = await pool.request(path, list(headers.items()), body)
        backend = response.header(b"X-Backend") or response.header(b"X-Served-By") or b""
        return Reply(response.status, backend.decode("latin-1"), response.body)

    async def __aexit__(self, *exc: object) -> None:
        for pool in self._pools.values():
            pool.close()


class AiohttpClient(GeneratorClient):
    """One aiohttp session, as the balancer uses: the maintained client, at about twice the CPU."""

    name = "aiohttp"

    def __init__(self, max_connections: int, timeout: float) -> None:
        super().__init__(max_connections, timeout)
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, URL] = {}

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Reply:
        assert self._session is not None, "use the client as an async context manager"
        parsed = self._urls.get(url)
        if parsed is None:
            parsed = self._urls[url] = URL(url)
        async with self._session.post(parsed, data=body, headers=headers) as response:
            payload = await response.read()
            backend = response.headers.get("X-Backend") or response.headers.get("X-Served-By") or ""
            return Reply(response.status, backend, payload)

    async def __aenter__(self) -> AiohttpClient:
        connector = aiohttp.TCPConnector(limit=self.max_connections, keepalive_timeout=60.0)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout), auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(), skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )  # fmt: skip
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()


CLIENTS: dict[str, type[GeneratorClient]] = {c.name: c for c in (LeanClient, AiohttpClient)}

# The lean client's failure kinds under aiohttp's names, which the records have always used.
_LEAN_KINDS = {
    "connect": "connect_error",
    "closed": "server_disconnected",
    "cut_short": "payload_error",
    "bad_response": "bad_response",
}

ERRORS = (UpstreamFailure, ReadTimeout, aiohttp.ClientError, asyncio.TimeoutError, OSError)


def classify_error(exc: BaseException) -> str:
    """An error type for the records, the same for either client."""
    if isinstance(exc, UpstreamFailure):
        return _LEAN_KINDS[exc.kind]
    if isinstance(exc, aiohttp.ConnectionTimeoutError | aiohttp.ClientConnectorError):
        return "connect_error"
    if isinstance(exc, ReadTimeout | aiohttp.ServerTimeoutError | asyncio.TimeoutError | TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "server_disconnected"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "payload_error"
    if isinstance(exc, aiohttp.ClientResponseError):
        return "bad_response"
    if isinstance(exc, OSError) and exc.errno:
        return f"os_error_{exc.errno}"
    return type(exc).__name__
