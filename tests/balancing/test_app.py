"""In-process: the balancer's app through httpx's ASGI transport, forwarding to a model server on uvicorn."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from imgclass.balancing.app import create_app
from imgclass.balancing.forward import annotate
from imgclass.balancing.settings import BalancerSettings

from ..conftest import ServedApp, multipart
from ..serving.test_app import client_for, jpeg, server_app


@pytest.fixture
def backend(model_dir: Path):
    served = ServedApp(server_app(model_dir))
    try:
        yield served.url
    finally:
        served.stop()


def test_forwards_in_process(backend: str) -> None:
    async def scenario() -> None:
        settings = BalancerSettings.make(backends=[backend], seed=1, health_interval=0.2)
        async with client_for(create_app(settings, name="lb")) as client:
            body, ctype = multipart({"image": ("x.jpg", jpeg(), "image/jpeg")})
            r = await client.post("/submit", content=body, headers={"Content-Type": ctype, "X-Request-ID": "inproc-1"})
            doc = r.json()
            assert r.status_code == 200 and doc["backend"] == backend, r.text
            assert r.headers["x-request-id"] == "inproc-1" and r.headers["x-backend"] == backend
            assert doc["timing_ms"]["upstream"] > 0 and doc["timing_ms"]["balancer"] >= 0
            r = await client.post("/predict?top=3", content=body, headers={"Content-Type": ctype})
            assert r.status_code == 200 and len(r.json()["predictions"]) == 3
            listed = (await client.get("/backends")).json()
            assert listed[0]["served"] == 2 and listed[0]["latency_p50_ms"] > 0
            assert listed[0]["name"] == "inproc"  # the model server's own name, from its /readyz
            labels = (await client.get("/labels")).json()["labels"]
            assert len(labels) == 1000 and labels[88] == "macaw"
            r = await client.get("/submit")
            assert r.status_code == 405 and r.headers["allow"] == "POST" and r.json()["error"] == "method_not_allowed"
            r = await client.get("/nowhere")
            assert r.status_code == 404 and r.json()["error"] == "not_found"
            r = await client.post("/submit?policy=nope", content=body, headers={"Content-Type": ctype})
            assert r.status_code == 400 and r.json()["error"] == "bad_parameter"
            r = await client.get("/metrics")
            assert f'imgclass_balancer_requests_total{{backend="{backend}",status="200"}} 2.0' in r.text
            assert "imgclass_balancer_request_seconds_count 2.0" in r.text

    asyncio.run(scenario())


def test_annotate_splices_like_json() -> None:
    payload = json.dumps(
        {"predictions": [], "model": "m", "server": "s", "timing_ms": {"infer": 1.0}, "batch_size": 1},
        separators=(",", ":"),
    ).encode()
    spliced = json.loads(annotate(payload, 'http://h:1/"x', 2.5, 0.25, 3.0))
    assert spliced["backend"] == 'http://h:1/"x'
    assert spliced["timing_ms"] == {"upstream": 2.5, "queued": 0.25, "balancer": 0.5, "infer": 1.0}
    other = json.loads(annotate(b'{"predictions": []}', "u", 1.0, 0.0, 1.5))
    assert other == {"predictions": [], "backend": "u", "timing_ms": {"upstream": 1.0, "queued": 0.0, "balancer": 0.5}}
