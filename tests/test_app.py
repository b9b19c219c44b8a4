"""In-process app tests: the model server's and the balancer's apps, called directly or on an in-process socket."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

from PIL import Image

from imgclass import balancer, frontend, server
from imgclass.httpapp import bind_socket, socket_url

from .conftest import multipart


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


async def _server_app(model_dir: Path, **overrides: object) -> frontend.App:
    settings = server.ServerSettings.make(
        backend="sleep", service_time="const:1ms", model_dir=str(model_dir), threads=1, **overrides
    )
    app = server.create_app(settings, name="inproc")
    await app.startup()
    return app


async def _call(
    app: frontend.App, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None, query: str = ""
) -> tuple[int, dict[str, str], bytes]:
    """One request straight into the app, as the front end hands it over."""
    lower = {k.lower(): v for k, v in (headers or {}).items()}
    response = await app.handle(frontend.Request(method, path, query.encode(), lower, body))
    return response.status, {k.decode().lower(): v.decode() for k, v in response.headers}, response.body


def test_server_app_predict_and_errors(model_dir: Path) -> None:
    async def scenario() -> None:
        app = await _server_app(model_dir)
        try:
            body, ctype = multipart({"image": ("x.jpg", _jpeg(), "image/jpeg")})
            status, headers, raw = await _call(app, "POST", "/predict", body, {"Content-Type": ctype}, query="top=3")
            doc = json.loads(raw)
            assert status == 200 and len(doc["predictions"]) == 3 and doc["server"] == "inproc"
            assert headers["x-served-by"] == "inproc" and headers["x-request-id"]
            status, _, raw = await _call(app, "POST", "/predict", b"{", {"Content-Type": "application/json"})
            assert status == 400 and json.loads(raw)["error"] == "bad_json"
            status, _, raw = await _call(app, "POST", "/predict", body, {"Content-Type": ctype}, query="top=0")
            assert status == 400 and json.loads(raw)["error"] == "bad_parameter"
            status, headers, raw = await _call(app, "GET", "/predict")
            assert status == 405 and headers["allow"] == "POST" and json.loads(raw)["error"] == "method_not_allowed"
            assert (await _call(app, "GET", "/readyz"))[0] == 200
            info = json.loads((await _call(app, "GET", "/"))[2])
            assert info["backend"] == "sleep" and info["max_batch"] == 1
            status, _, raw = await _call(app, "GET", "/metrics")
            assert status == 200 and b'imgclass_server_requests_total{route="/predict",status="200"} 1.0' in raw
        finally:
            await app.shutdown()

    asyncio.run(scenario())


def test_server_app_readyz_goes_503_on_shutdown(model_dir: Path) -> None:
    async def scenario() -> None:
        app = await _server_app(model_dir)
        await app.shutdown()  # what SIGTERM triggers once in-flight requests are answered
        status, headers, raw = await _call(app, "GET", "/readyz")
        assert status == 503 and json.loads(raw)["error"] == "not_ready" and headers["retry-after"] == "1"
        body, ctype = multipart({"image": ("x.jpg", _jpeg(), "image/jpeg")})
        status, _, raw = await _call(app, "POST", "/predict", body, {"Content-Type": ctype})
        assert status == 503 and json.loads(raw)["error"] == "not_ready"

    asyncio.run(scenario())


def test_balancer_app_forwards_in_process(model_dir: Path) -> None:
    async def scenario() -> None:
        backend = await _server_app(model_dir)
        front = frontend.FrontEnd(backend.dispatch, frontend.Limits(max_upload=backend.max_upload))
        sock = bind_socket("127.0.0.1", 0)
        await front.start(sock)
        url = socket_url(sock)
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
            await front.drain(1.0)
            await backend.shutdown()

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
