"""A bare ASGI app for bench/asgi_servers.py: reads the whole body, answers a small JSON document."""

from __future__ import annotations

from typing import Any

ANSWER = b'{"predictions":[{"index":88,"label":"macaw","score":0.99}],"server":"bench"}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": ANSWER})
