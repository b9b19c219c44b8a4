"""In-process app tests: the model server on aiohttp's test server, the balancer's app called directly."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

from aiohttp import FormData
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from imgclass import balancer, frontend, server

from .conftest import multipart


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


def _form(data: bytes) -> FormData:
    form = FormData()
    form.add_field("image", data, filename="x.jpg", content_type="image/jpeg")
    return form


async def _server_client(model_dir: Path, **overrides: object) -> TestClient:
    settings = server.ServerSettings.make(
        backend="sleep", service_time="const:1ms", model_dir=str(model_dir), threads=1, **overrides
    )
    client = TestClient(TestServer(server.create_app(settings, name="inproc")))
    await client.start_server()
    return client


def test_server_app_predict_and_errors(model_dir: Path) -> None:
    async def scenario() -> None:
        client = await _server_client(model_dir)
        try:
            response = await client.post("/predict?top=3", data=_form(_jpeg()))
            doc = await response.json()
            assert response.status == 200 and len(doc["predictions"]) == 3 and doc["server"] == "inproc"
            assert response.headers["X-Served-By"] == "inproc"
            response = await client.post("/predict", data=b"{", headers={"Content-Type": "application/json"})
            assert response.status == 400 and (await response.json())["error"] == "bad_json"
            assert (await client.get("/readyz")).status == 200
            info = await (await client.get("/")).json()
            assert info["backend"] == "sleep" and info["max_batch"] == 1
        finally:
            await client.close()

    asyncio.run(scenario())


def test_server_app_readyz_goes_503_on_shutdown(model_dir: Path) -> None:
    async def scenario() -> None:
        client = await _server_client(model_dir)
        app = client.server.app
        assert app is not None
        await app.shutdown()  # what SIGTERM triggers before the drain
        response = await client.get("/readyz")
        assert response.status == 503 and (await response.json())["error"] == "not_ready"
        await client.close()

    asyncio.run(scenario())


async def _call(
    app: frontend.App, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None, query: str = ""
) -> tuple[int, dict[str, str], bytes]:
    """One request straight into the app, as the front end hands it over."""
    lower = {k.lower(): v for k, v in (headers or {}).items()}
    response = await app.handle(frontend.Request(method, path, query.encode(), lower, body))
    return response.status, {k.decode().lower(): v.decode() for k, v in response.headers}, response.body


def test_balancer_app_forwards_in_process(model_dir: Path) -> None:
    async def scenario() -> None:
        backend = await _server_client(model_dir)
        url = str(backend.make_url("")).rstrip("/")
        settings = balancer.BalancerSettings.make(backends=[url], seed=1, health_interval=0.2)
        app = balancer.create_app(settings, name="lb")
        await app.startup()
        try:
            body, ctype = multipart({"image": ("x.jpg", _jpeg(), "image/jpeg")})
            status, headers, raw = await _call(
                app, "POST", "/submit", body, {"Content-Type": ctype, "X-Request-ID": "inproc-1"}
            )
            doc = json.loads(raw)
            assert status == 200 and doc["backend"] == url, raw
            assert headers["x-request-id"] == "inproc-1" and headers["x-backend"] == url
            assert doc["timing_ms"]["upstream"] > 0 and doc["timing_ms"]["balancer"] >= 0
            status, _, _ = await _call(app, "POST", "/predict", body, {"Content-Type": ctype}, query="top=3")
            assert status == 200
            status, _, raw = await _call(app, "GET", "/backends")
            listed = json.loads(raw)
            assert listed[0]["served"] == 2 and listed[0]["latency_p50_ms"] > 0
            status, headers, raw = await _call(app, "GET", "/submit")
            assert status == 405 and headers["allow"] == "POST" and json.loads(raw)["error"] == "method_not_allowed"
            status, _, raw = await _call(app, "GET", "/nowhere")
            assert status == 404 and json.loads(raw)["error"] == "not_found"
            status, _, raw = await _call(app, "POST", "/submit", body, {"Content-Type": ctype}, query="policy=nope")
            assert status == 400 and json.loads(raw)["error"] == "bad_parameter"
        finally:
            await app.shutdown()
            await backend.close()

    asyncio.run(scenario())


def test_annotate_splices_like_json() -> None:
    payload = json.dumps(
        {"predictions": [], "model": "m", "server": "s", "timing_ms": {"infer": 1.0}, "batch_size": 1},
        separators=(",", ":"),
    ).encode()
    spliced = json.loads(balancer._annotate(payload, 'http://h:1/"x', 2.5, 0.25, 3.0))
    assert spliced["backend"] == 'http://h:1/"x'
    assert spliced["timing_ms"] == {"upstream": 2.5, "queued": 0.25, "balancer": 0.5, "infer": 1.0}
    other = json.loads(balancer._annotate(b'{"predictions": []}', "u", 1.0, 0.0, 1.5))
    assert other == {"predictions": [], "backend": "u", "timing_ms": {"upstream": 1.0, "queued": 0.0, "balancer": 0.5}}
