"""Open Inference Protocol v2 and TF Serving REST on the model server: tritonclient against a real server, and in-process."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from imgclass.process import Child
from imgclass.serving.protocols.tensors import Limits, join_bytes, parse_infer, split_bytes

from ..conftest import PHOTOS, http
from .test_app import client_for, jpeg, server_app

httpclient = pytest.importorskip("tritonclient.http", reason="pip install 'tritonclient[http]' (a dev dependency)")
from tritonclient.utils import InferenceServerException  # noqa: E402

MODEL = "mobilenet_v2"


def photos(images_dir: Path) -> list[tuple[str, bytes, int]]:
    return [(name, (images_dir / name).read_bytes(), index) for name, index in PHOTOS.items()]


def image_input(images: list[bytes], binary: bool = True) -> object:
    """tritonclient's BYTES input [B, 1]: the files themselves, or their base64 as JSON strings."""
    rows = images if binary else [base64.b64encode(data) for data in images]
    tensor = httpclient.InferInput("image", [len(rows), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[row] for row in rows], dtype=np.object_), binary_data=binary)
    return tensor


def top1(row: np.ndarray) -> int:
    """The class index of the first 'score:index:label' string of a classification row."""
    first = row[0].decode() if isinstance(row[0], bytes) else row[0]
    return int(first.split(":")[1])


@pytest.fixture(scope="module")
def server(spawn: Callable[..., Child]) -> str:
    return spawn("serve", "--port", "0", "--log-level", "warning").url  # type: ignore[return-value]


@pytest.fixture(scope="module")
def triton(server: str):
    client = httpclient.InferenceServerClient(server.removeprefix("http://"), network_timeout=60)
    yield client
    client.close()


@pytest.mark.integration
def test_tritonclient_health_metadata_and_config(triton) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready(MODEL) and triton.is_model_ready(MODEL, "1")
    assert not triton.is_model_ready("resnet50")
    meta = triton.get_server_metadata()
    assert {"binary_tensor_data", "classification", "model_configuration", "statistics"} <= set(meta["extensions"])
    model = triton.get_model_metadata(MODEL)
    assert model["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1, 1]}]
    assert model["outputs"] == [{"name": "probs", "datatype": "FP32", "shape": [-1, 1000]}]
    config = triton.get_model_config(MODEL)
    assert config["max_batch_size"] >= 4 and config["input"][0]["dims"] == [1] and "dynamic_batching" in config
    with pytest.raises(InferenceServerException, match="Unknown model 'resnet50'"):
        triton.get_model_metadata("resnet50")


@pytest.mark.integration
def test_tritonclient_infer_binary_json_and_batch(triton, images_dir: Path) -> None:
    classify = [httpclient.InferRequestedOutput("probs", class_count=5)]
    for name, data, expected in photos(images_dir):
        result = triton.infer(MODEL, [image_input([data])], outputs=classify)
        rows = result.as_numpy("probs")
        assert rows.shape == (1, 5) and top1(rows[0]) == expected, (name, rows)
        score, _, label = rows[0][0].decode().split(":", 2)
        assert 0 < float(score) <= 1 and label
    # JSON base64 strings, and a JSON answer
    for name, data, expected in photos(images_dir)[:3]:
        as_json = [httpclient.InferRequestedOutput("probs", binary_data=False, class_count=5)]
        rows = triton.infer(MODEL, [image_input([data], binary=False)], outputs=as_json).as_numpy("probs")
        assert top1(rows[0]) == expected, name
    # a batch of 4, the tensor itself this time (no outputs asked: all of them, binary)
    four = photos(images_dir)[:4]
    probs = triton.infer(MODEL, [image_input([d for _, d, _ in four])]).as_numpy("probs")
    assert probs.shape == (4, 1000) and probs.dtype == np.float32
    assert list(probs.argmax(axis=1)) == [expected for _, _, expected in four]
    assert ((probs.sum(axis=1) > 0.8) & (probs.sum(axis=1) < 1.05)).all()  # uint8 outputs, background dropped
    rows = triton.infer(MODEL, [image_input([d for _, d, _ in four])], outputs=classify).as_numpy("probs")
    assert rows.shape == (4, 5) and [top1(r) for r in rows] == [expected for _, _, expected in four]


@pytest.mark.integration
def test_stats_count_what_the_server_measured(triton, server: str, images_dir: Path) -> None:
    before = triton.get_inference_statistics(MODEL)["model_stats"][0]
    data = (images_dir / "parrot.jpg").read_bytes()
    triton.infer(MODEL, [image_input([data] * 3)])
    status, _, _ = http("POST", server + "/predict", data, {"Content-Type": "image/jpeg"})  # /predict counts too
    assert status == 200
    after = triton.get_inference_statistics(MODEL)["model_stats"][0]
    assert after["inference_count"] - before["inference_count"] == 4
    assert after["execution_count"] - before["execution_count"] == 4  # litert runs batches of 1
    stats, old = after["inference_stats"], before["inference_stats"]
    for key in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert stats[key]["count"] - old[key]["count"] == 4, key
    infer_ns = stats["compute_infer"]["ns"] - old["compute_infer"]["ns"]
    assert 4 * 0.5e6 < infer_ns < 4 * 1e9  # real inference: over half a millisecond an image
    assert stats["success"]["ns"] - old["success"]["ns"] >= infer_ns
    assert after["last_inference"] >= before["last_inference"] > 0
    assert after["batch_stats"][0]["batch_size"] == 1


@pytest.mark.integration
def test_tf_serving_rest(server: str, images_dir: Path) -> None:
    status, _, body = http("GET", f"{server}/v1/models/{MODEL}")
    assert status == 200 and json.loads(body)["model_version_status"][0]["state"] == "AVAILABLE"
    status, _, body = http("GET", f"{server}/v1/models/{MODEL}/metadata")
    assert status == 200 and "serving_default" in json.loads(body)["metadata"]["signature_def"]["signature_def"]
    items = photos(images_dir)[:3]
    doc = {"instances": [{"b64": base64.b64encode(data).decode()} for _, data, _ in items]}
    status, _, body = http("POST", f"{server}/v1/models/{MODEL}:predict", json.dumps(doc).encode(),
                           {"Content-Type": "application/json"})  # fmt: skip
    predictions = json.loads(body)["predictions"]
    assert status == 200 and [p["classes"][0] for p in predictions] == [e for _, _, e in items]
    assert len(predictions[0]["scores"]) == 5 and predictions[0]["labels"][0]
    one = {"instances": [{"image_bytes": {"b64": base64.b64encode(items[0][1]).decode()}}]}
    status, _, body = http("POST", f"{server}/v1/models/{MODEL}/versions/1:predict?top=2", json.dumps(one).encode())
    assert status == 200 and json.loads(body)["predictions"][0]["classes"][0] == items[0][2]
    assert len(json.loads(body)["predictions"][0]["classes"]) == 2


def raw_infer(url: str, header: dict, binary: bytes = b"", length: int | None = None) -> tuple[int, dict]:
    head = json.dumps(header).encode()
    headers = {"Inference-Header-Content-Length": str(len(head) if length is None else length)} if binary else {}
    status, _, body = http("POST", f"{url}/v2/models/{MODEL}/infer", head + binary, headers)
    return status, json.loads(body)


def image_tensor(shape: list[int], datatype: str = "BYTES", size: int | None = None) -> dict:
    return {"name": "image", "shape": shape, "datatype": datatype, "parameters": {"binary_data_size": size}}


@pytest.mark.integration
def test_malformed_requests_get_4xx_and_the_server_lives_on(server: str, triton, images_dir: Path) -> None:
    data = join_bytes([(images_dir / "parrot.jpg").read_bytes()])
    cases = {
        "header longer than the body": (image_tensor([1, 1], size=len(data)), data, 10**6),
        "wrong datatype": (image_tensor([1, 1], "FP32", len(data)), data, None),
        "wrong shape": (image_tensor([1, 3, 224], size=len(data)), data, None),
        "shape and data disagree": (image_tensor([2, 1], size=len(data)), data, None),
        "binary size past the body": (image_tensor([1, 1], size=len(data) + 9), data, None),
        "element cut short": (image_tensor([1, 1], size=len(data) - 5), data[:-5], None),
        "not an image": (image_tensor([1, 1], size=16), join_bytes([b"hello world!"]), None),
    }
    for what, (tensor, binary, length) in cases.items():
        status, doc = raw_infer(server, {"inputs": [tensor]}, binary, length)
        assert 400 <= status < 500 and isinstance(doc["error"], str) and doc["error"], (what, status, doc)
    status, doc = raw_infer(server, {"outputs": [{"name": "probs"}]})
    assert status == 400 and 'no "inputs"' in doc["error"] and doc["code"] == "missing_field"
    status, doc = raw_infer(server, {"inputs": [{"name": "pixels", "shape": [1, 1], "datatype": "BYTES", "data": []}]})
    assert status == 400 and "Unknown input 'pixels'" in doc["error"]
    status, _, body = http("POST", f"{server}/v2/models/resnet50/infer", b"{}")
    assert status == 404 and "Unknown model" in json.loads(body)["error"]
    status, _, body = http("POST", f"{server}/v2/models/{MODEL}/infer", b"{not json")
    assert status == 400 and json.loads(body)["code"] == "bad_json"
    with pytest.raises(InferenceServerException, match="datatype"):
        wrong = httpclient.InferInput("image", [1, 1], "INT32")
        wrong.set_data_from_numpy(np.array([[1]], dtype=np.int32))
        triton.infer(MODEL, [wrong])
    assert triton.is_server_live() and triton.is_model_ready(MODEL)
    result = triton.infer(MODEL, [image_input([(images_dir / "bird.bmp").read_bytes()])])
    assert int(result.as_numpy("probs").argmax()) == PHOTOS["bird.bmp"]


# --- in-process: the sleep backend, no sockets ----------------------------------------------


def test_codec_round_trips_and_refusals() -> None:
    items = [b"a", b"", b"\x00" * 300]
    assert split_bytes(join_bytes(items)) == items
    limits = Limits(max_batch=4, max_image=1000)
    header = json.dumps({"inputs": [{"name": "image", "shape": [2, 1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": 15}}],
                         "parameters": {"binary_data_output": True}, "id": "r1"}).encode()  # fmt: skip
    parsed = parse_infer(header + join_bytes([b"abc", b"defg"]), str(len(header)), limits)
    assert parsed.images == [b"abc", b"defg"] and parsed.id == "r1" and parsed.outputs[0].binary
    assert parsed.top == 1000  # the whole tensor was asked for
    doc = {"inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES", "data": [base64.b64encode(b"x").decode()],
                       "parameters": {"content_type": "base64"}}],
           "outputs": [{"name": "probs", "parameters": {"classification": 3}}]}  # fmt: skip
    parsed = parse_infer(json.dumps(doc).encode(), None, limits)
    assert parsed.images == [b"x"] and parsed.top == 3 and not parsed.outputs[0].binary
    for bad in ({"classification": -1}, {"classification": "5"}, {"classification": 1001}):
        doc["outputs"] = [{"name": "probs", "parameters": bad}]
        with pytest.raises(Exception, match="classification"):
            parse_infer(json.dumps(doc).encode(), None, limits)
    doc["outputs"] = []
    doc["inputs"][0]["shape"] = [5, 1]
    with pytest.raises(Exception, match="max_batch_size 4"):
        parse_infer(json.dumps(doc).encode(), None, limits)
    with pytest.raises(Exception, match="whole number"):
        parse_infer(b"{}", "12a", limits)
    assert struct.unpack("<I", join_bytes([b"abc"])[:4]) == (3,)


def test_routes_in_process(model_dir: Path) -> None:
    async def scenario() -> None:
        async with client_for(server_app(model_dir, model_name="m1")) as client:
            assert (await client.get("/v2/health/live")).status_code == 200
            assert (await client.get("/v2/health/ready")).status_code == 200
            assert (await client.get("/v2/models/m1/versions/1/ready")).status_code == 200
            r = await client.get("/v2/models/m1/versions/2")
            assert r.status_code == 404 and "no version '2'" in r.json()["error"]
            r = await client.get("/v2/models/mobilenet_v2")
            assert r.status_code == 404 and r.json()["code"] == "not_found"
            doc = {"inputs": [{"name": "image", "shape": [2, 1], "datatype": "BYTES",
                               "data": [base64.b64encode(jpeg()).decode()] * 2}],
                   "outputs": [{"name": "probs", "parameters": {"classification": 2, "binary_data": True}}]}  # fmt: skip
            r = await client.post("/v2/models/m1/infer", json=doc)
            assert r.status_code == 200, r.text
            length = int(r.headers["inference-header-content-length"])
            head = json.loads(r.content[:length])
            assert head["outputs"][0]["shape"] == [2, 2] and head["outputs"][0]["datatype"] == "BYTES"
            rows = split_bytes(r.content[length:])
            assert len(rows) == 4 and all(row.count(b":") >= 2 for row in rows)
            r = await client.post("/v2/models/m1/infer", json={**doc, "outputs": [{"name": "logits"}]})
            assert r.status_code == 400 and "Unknown output 'logits'" in r.json()["error"]
            r = await client.post(
                "/v1/models/m1:predict", json={"inputs": [{"b64": base64.b64encode(jpeg()).decode()}]}
            )
            assert r.status_code == 200 and len(r.json()["outputs"]["classes"][0]) == 5
            r = await client.post("/v1/models/m1:predict", json={"instances": ["abc"]})
            assert r.status_code == 400 and "b64" in r.json()["error"]
            r = await client.post("/v1/models/m1:predict?top=0", json={"instances": [{"b64": "eA=="}]})
            assert r.status_code == 400 and r.json()["code"] == "bad_parameter"
            r = await client.post("/v1/models/m1:predict", json={"instances": [{"b64": "bm90IGFuIGltYWdl"}]})
            assert r.status_code == 400 and r.json()["code"] == "not_an_image"
            good, bad = base64.b64encode(jpeg()).decode(), base64.b64encode(b"not an image").decode()
            mixed = {"inputs": [{**doc["inputs"][0], "data": [good, bad]}]}
            r = await client.post("/v2/models/m1/infer", json=mixed)
            assert r.status_code == 400 and r.json()["error"].startswith("Image 2 of 2:"), r.text
            too_many = {"inputs": [{**doc["inputs"][0], "shape": [1025, 1], "data": [good] * 1025}]}
            r = await client.post("/v2/models/m1/infer", json=too_many)
            assert r.status_code == 400 and "max_batch_size" in r.json()["error"]
            stats = (await client.get("/v2/models/stats")).json()["model_stats"][0]
            # the mixed batch's good image is answered, or dropped when its partner fails first
            assert stats["name"] == "m1" and stats["inference_count"] in (3, 4), stats
            assert stats["inference_stats"]["fail"]["count"] == 2, stats

    asyncio.run(scenario())
