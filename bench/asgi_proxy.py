"""The floor of a maintained stack, for bench/balancer.py: a bare ASGI forwarder on uvicorn and aiohttp.

It has none of the balancer's features (no policy but random, no health checks, slots, retries,
request ids, timeouts, metrics or JSON errors), so what it costs per request is what uvicorn and
aiohttp cost; the balancer's CPU beyond it is the price of those features.

    BACKENDS=http://127.0.0.1:5001,... python -m uvicorn asgi_proxy:app --http httptools --loop uvloop
"""

from __future__ import annotations

import os
import random
from typing import Any

import aiohttp
from yarl import URL

BACKENDS = [URL(url + "/predict") for url in os.environ.get("BACKENDS", "").split(",") if url]
session: aiohttp.ClientSession | None = None


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    global session
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=0), auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
                )
                await send({"type": "lifespan.startup.complete"})
            else:
                assert session is not None
                await session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return
    assert session is not None
    chunks, more = [], True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    content_type = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")
    async with session.post(random.choice(BACKENDS), data=b"".join(chunks), headers={"Content-Type": content_type}) as r:
        payload = await r.read()
        status = r.status
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
