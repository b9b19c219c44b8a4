"""In-process: the model server's app, driven through httpx's ASGI transport (no sockets)."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from PIL import Image

from imgclass.serving.app import create_app
from imgclass.serving.settings import ServerSettings
from imgclass.web.app import App

from ..conftest import multipart


def jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


def server_app(model_dir: Path, **overrides: object) -> App:
    values: dict[str, object] = {"backend": "sleep", "service_time": "const:1ms", "threads": 1, **overrides}
    settings = ServerSettings.make(model_dir=str(model_dir), **values)
    return create_app(settings, name="inproc")


@asynccontextmanager
async def client_for(app: App) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client on the app, with the app started and stopped as uvicorn's lifespan would."""
    await app.startup()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://inproc") as client:
            yield client
    finally:
        await app.shutdown()


def test_predict_and_errors(model_dir: Path) -> None:
    async def scenario() -> None:
        async with client_for(server_app(model_dir)) as client:
            body, ctype = multipart({"image": ("x.jpg", jpeg(), "image/jpeg")})
            r = await client.post("/predict?top=3", content=body, headers={"Content-Type": ctype})
            doc = r.json()
            assert r.status_code == 200 and len(doc["predictions"]) == 3 and doc["server"] == "inproc"
            assert r.headers["x-served-by"] == "inproc" and r.headers["x-request-id"]
            r = await client.post("/predict", content=b"{", headers={"Content-Type": "application/json"})
            assert r.status_code == 400 and r.json()["error"] == "bad_json"
            r = await client.post("/predict?top=0", content=body, headers={"Content-Type": ctype})
            assert r.status_code == 400 and r.json()["error"] == "bad_parameter"
            r = await client.get("/predict")
            assert r.status_code == 405 and r.headers["allow"] == "POST" and r.json()["error"] == "method_not_allowed"
            assert (await client.get("/readyz")).status_code == 200
            info = (await client.get("/")).json()
            assert info["backend"] == "sleep" and info["max_batch"] == 1
            r = await client.get("/metrics")
            assert r.status_code == 200
            assert 'imgclass_server_requests_total{route="/predict",status="200"} 1.0' in r.text
            assert "imgclass_server_predict_seconds_bucket" in r.text

    asyncio.run(scenario())


def test_readyz_goes_503_on_shutdown(model_dir: Path) -> None:
    async def scenario() -> None:
        app = server_app(model_dir)
        async with client_for(app) as client:
            await app.shutdown()  # what SIGTERM triggers once in-flight requests are answered
            r = await client.get("/readyz")
            assert r.status_code == 503 and r.json()["error"] == "not_ready" and r.headers["retry-after"] == "1"
            body, ctype = multipart({"image": ("x.jpg", jpeg(), "image/jpeg")})
            r = await client.post("/predict", content=body, headers={"Content-Type": ctype})
            assert r.status_code == 503 and r.json()["error"] == "not_ready"

    asyncio.run(scenario())


def test_a_queued_image_whose_client_left_is_dropped_before_inference(model_dir: Path) -> None:
    """One worker busy for 300 ms; a second request waits in the queue and its client disconnects."""

    async def scenario() -> None:
        app = server_app(model_dir, service_time="const:300ms")
        server = app.state
        body, ctype = multipart({"image": ("x.jpg", jpeg(), "image/jpeg")})
        async with client_for(app) as client:
            first = asyncio.ensure_future(client.post("/predict", content=body, headers={"Content-Type": ctype}))
            await asyncio.sleep(0.05)
            messages = [{"type": "http.request", "body": body, "more_body": False}]
            sent: list[dict] = []

            async def receive() -> dict:
                if messages:
                    return messages.pop()
                await asyncio.sleep(0.1)  # the image is queued behind the first by now
                return {"type": "http.disconnect"}  # what uvicorn reports when the client hangs up

            async def send(message: dict) -> None:
                sent.append(message)

            scope = {"type": "http", "method": "POST", "path": "/predict", "query_string": b"",
                     "headers": [(b"content-type", ctype.encode())]}  # fmt: skip
            await app(scope, receive, send)
            assert sent == []  # nobody to answer
            assert (await first).status_code == 200
            await asyncio.sleep(0.4)  # the worker has moved past the dropped image
            metrics = (await client.get("/metrics")).text
        assert "imgclass_server_client_gone_total 1.0" in metrics
        assert "imgclass_server_dropped_before_inference_total 1.0" in metrics
        assert 'imgclass_server_requests_total{route="/predict",status="499"} 1.0' in metrics
        assert server.batcher.depth == 0

    asyncio.run(scenario())
