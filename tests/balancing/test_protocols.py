"""Open Inference Protocol v2 and TF Serving REST through a real balancer: tritonclient works as against one server."""

from __future__ import annotations

import asyncio
import base64
import csv
import json
import os
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from imgclass.balancing.app import create_app
from imgclass.balancing.protocols import sum_stats
from imgclass.balancing.settings import BalancerSettings
from imgclass.process import Child
from imgclass.serving.protocols.tensors import join_bytes

from ..conftest import PHOTOS, http
from ..serving.test_app import client_for
from ..serving.test_protocols import MODEL, image_input, photos, raw_infer, top1

httpclient = pytest.importorskip("tritonclient.http", reason="pip install 'tritonclient[http]' (a dev dependency)")
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture(scope="module")
def cluster(spawn: Callable[..., Child]) -> tuple[str, list[str]]:
    """Two litert servers of one inference thread each, and a balancer in front of them; their queues
    do not shed (perf_analyzer stops at the first error, and a Poisson burst on a busy host may be one)."""
    servers = [spawn("serve", "--port", "0", "--threads", "1", "--name", f"oip{i}", "--log-level", "warning",
                     "--max-wait-ms", "0", "--max-queue", "64").url for i in (1, 2)]  # fmt: skip
    front = spawn("balance", "--port", "0", "--backends", ",".join(servers), "--health-interval", "0.2",
                  "--policy", "round_robin", "--log-level", "warning").url  # fmt: skip
    return front, servers  # type: ignore[return-value]


@pytest.fixture(scope="module")
def triton(cluster: tuple[str, list[str]]):
    client = httpclient.InferenceServerClient(cluster[0].removeprefix("http://"), network_timeout=60)
    yield client
    client.close()


def stats_of(url: str) -> dict:
    status, _, body = http("GET", f"{url}/v2/models/{MODEL}/stats")
    assert status == 200, body
    return json.loads(body)["model_stats"][0]


@pytest.mark.integration
def test_tritonclient_through_the_balancer(triton, images_dir: Path) -> None:
    assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready(MODEL)
    assert not triton.is_model_ready("resnet50")
    assert "binary_tensor_data" in triton.get_server_metadata()["extensions"]
    assert triton.get_model_metadata(MODEL)["inputs"][0]["name"] == "image"
    assert triton.get_model_config(MODEL, "1")["input"][0]["data_type"] == "TYPE_STRING"
    classify = [httpclient.InferRequestedOutput("probs", class_count=5)]
    for name, data, expected in photos(images_dir):
        rows = triton.infer(MODEL, [image_input([data])], outputs=classify).as_numpy("probs")
        assert rows.shape == (1, 5) and top1(rows[0]) == expected, name
    name, data, expected = photos(images_dir)[5]
    as_json = [httpclient.InferRequestedOutput("probs", binary_data=False, class_count=5)]
    rows = triton.infer(MODEL, [image_input([data], binary=False)], outputs=as_json).as_numpy("probs")
    assert top1(rows[0]) == expected, name
    four = photos(images_dir)[4:]
    probs = triton.infer(MODEL, [image_input([d for _, d, _ in four])]).as_numpy("probs")
    assert probs.shape == (4, 1000) and list(probs.argmax(axis=1)) == [e for _, _, e in four]
    with pytest.raises(InferenceServerException, match="Unknown model"):
        triton.infer("resnet50", [image_input([data])])


@pytest.mark.integration
def test_stats_are_the_sum_over_backends(cluster: tuple[str, list[str]], triton, images_dir: Path) -> None:
    front, servers = cluster
    data = (images_dir / "cat.bmp").read_bytes()
    for _ in range(4):  # round robin: both servers get some
        triton.infer(MODEL, [image_input([data])])
    total = stats_of(front)
    parts = [stats_of(url) for url in servers]
    assert all(p["inference_count"] > 0 for p in parts)
    assert total["inference_count"] == sum(p["inference_count"] for p in parts)
    for key in ("success", "queue", "compute_infer"):
        assert total["inference_stats"][key]["ns"] == sum(p["inference_stats"][key]["ns"] for p in parts)
    assert total["last_inference"] == max(p["last_inference"] for p in parts)
    assert total["batch_stats"][0]["compute_infer"]["count"] == sum(p["batch_stats"][0]["compute_infer"]["count"]
                                                                   for p in parts)  # fmt: skip
    assert triton.get_inference_statistics(MODEL)["model_stats"][0]["inference_count"] >= total["inference_count"]


@pytest.mark.integration
def test_tf_serving_and_malformed_requests_through_the_balancer(
    cluster: tuple[str, list[str]], images_dir: Path
) -> None:
    front, _ = cluster
    status, _, body = http("GET", f"{front}/v1/models/{MODEL}")
    assert status == 200 and json.loads(body)["model_version_status"][0]["state"] == "AVAILABLE"
    status, _, body = http("GET", f"{front}/v1/models/{MODEL}/metadata")
    assert status == 200 and json.loads(body)["model_spec"]["name"] == MODEL
    data = (images_dir / "parrot.jpg").read_bytes()
    doc = {"instances": [{"b64": base64.b64encode(data).decode()}] * 2}
    status, headers, body = http("POST", f"{front}/v1/models/{MODEL}:predict", json.dumps(doc).encode())
    predictions = json.loads(body)["predictions"]
    assert status == 200 and [p["classes"][0] for p in predictions] == [PHOTOS["parrot.jpg"]] * 2
    assert headers["X-Backend"] and "timing_ms" not in json.loads(body)  # passed through untouched
    element = join_bytes([data])
    tensor = {"name": "image", "shape": [1, 1], "datatype": "BYTES", "parameters": {"binary_data_size": len(element)}}
    status, doc = raw_infer(front, {"inputs": [tensor]}, element, 10**6)
    assert status == 400 and "Inference-Header-Content-Length" in doc["error"]
    status, doc = raw_infer(front, {"inputs": [{**tensor, "datatype": "UINT8"}]}, element)
    assert status == 400 and "datatype" in doc["error"]
    status, doc = raw_infer(front, {"inputs": []})
    assert status == 400 and doc["code"] == "missing_field"
    status, _, body = http("POST", f"{front}/v2/models/nope/infer", b"{}")
    assert status == 404 and "Unknown model" in json.loads(body)["error"]
    status, doc = raw_infer(front, {"inputs": [tensor]}, element)
    assert status == 200 and doc["outputs"][0]["shape"] == [1, 1000]


def test_sum_stats_adds_counts_and_keeps_names() -> None:
    def one(count: int, last: int) -> dict:
        timing = {"count": count, "ns": count * 10}
        return {"model_stats": [{"name": "m", "version": "1", "last_inference": last, "inference_count": count,
                                 "execution_count": count, "inference_stats": {"success": timing, "queue": timing},
                                 "response_stats": {}, "memory_usage": [],
                                 "batch_stats": [{"batch_size": 1, "compute_infer": timing}]}]}  # fmt: skip

    total = sum_stats([one(2, 5), one(3, 9)])["model_stats"]
    assert len(total) == 1 and total[0]["name"] == "m" and total[0]["version"] == "1"
    assert total[0]["inference_count"] == 5 and total[0]["last_inference"] == 9
    assert total[0]["inference_stats"]["queue"] == {"count": 5, "ns": 50}
    assert total[0]["batch_stats"] == [{"batch_size": 1, "compute_infer": {"count": 5, "ns": 50}}]
    assert one(2, 5)["model_stats"][0]["inference_count"] == 2  # the inputs are left alone


def test_no_backend_in_the_protocols_shape() -> None:
    async def scenario() -> None:
        settings = BalancerSettings.make(backends=["http://127.0.0.1:9"], health_interval=0.2, connect_timeout=0.2)
        async with client_for(create_app(settings, name="lb")) as client:
            assert (await client.get("/v2/health/live")).status_code == 200
            r = await client.get("/v2/health/ready")
            assert r.status_code == 503 and r.json()["code"] == "no_backend" and "ready" in r.json()["error"]
            r = await client.get(f"/v2/models/{MODEL}")
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            r = await client.post(f"/v2/models/{MODEL}/infer", content=b"{}")
            assert r.status_code == 503 and isinstance(r.json()["error"], str)

    asyncio.run(scenario())


def test_forwarded_binary_answer_keeps_its_header_length(cluster: tuple[str, list[str]], images_dir: Path) -> None:
    front, _ = cluster
    element = join_bytes([(images_dir / "bird.bmp").read_bytes()])
    head = json.dumps({"inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(element)}}],
                       "parameters": {"binary_data_output": True}}).encode()  # fmt: skip
    status, headers, body = http("POST", f"{front}/v2/models/{MODEL}/versions/1/infer", head + element,
                                 {"Inference-Header-Content-Length": str(len(head))})  # fmt: skip
    assert status == 200
    length = int(headers["Inference-Header-Content-Length"])
    assert json.loads(body[:length])["outputs"][0]["parameters"]["binary_data_size"] == 4000
    probs = np.frombuffer(body[length:], dtype="<f4")
    assert int(probs.argmax()) == PHOTOS["bird.bmp"]


def perf_analyzer() -> tuple[str, dict[str, str]]:
    """Triton's perf_analyzer, as bench/peers.py installs it (tritonclient 2.51.0 in .peer-venvs/perf)."""
    venv = Path(__file__).resolve().parents[2] / ".peer-venvs" / "perf"
    binary = venv / "bin" / "perf_analyzer"
    cudart = next(venv.glob("lib/python*/site-packages/nvidia/cuda_runtime/lib"), None)
    if not binary.exists() or cudart is None:
        pytest.skip("perf_analyzer is not installed: bench/peers.py creates .peer-venvs/perf with it")
    return str(binary), {**os.environ, "LD_LIBRARY_PATH": str(cudart)}


@pytest.mark.integration
@pytest.mark.slow
def test_perf_analyzer_directly_and_through_the_balancer(
    cluster: tuple[str, list[str]], images_dir: Path, tmp_path: Path
) -> None:
    binary, env = perf_analyzer()
    data = (images_dir / "parrot.jpg").read_bytes()
    element = base64.b64encode(struct.pack("<I", len(data)) + data).decode()  # as Triton serializes BYTES
    (tmp_path / "data.json").write_text(json.dumps({"data": [{"image": {"b64": element}}]}))
    front, servers = cluster
    for url in (servers[0], front):
        out = tmp_path / "pa.csv"
        done = subprocess.run(
            [binary, "-m", MODEL, "-u", url.removeprefix("http://"), "-i", "http", "--input-data",
             str(tmp_path / "data.json"), "--request-rate-range", "20", "--request-distribution", "poisson",
             "--measurement-mode", "count_windows", "--measurement-request-count", "40", "--max-trials", "3",
             "--stability-percentage", "1000", "-f", str(out)],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        row = next(csv.DictReader(out.read_text().splitlines()))
        assert float(row["Inferences/Second"]) > 5 and float(row["p50 latency"]) > 0, row
        assert "Server:" in done.stdout and "compute infer" in done.stdout  # it read our statistics
