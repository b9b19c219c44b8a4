"""The keras backend's plumbing: real TensorFlow MobileNetV2 with random weights (no internet for 'imagenet')."""

from __future__ import annotations

import importlib.util
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from imgclass.serving.modelfiles import load_labels

from ..conftest import http, post_image

pytestmark = [pytest.mark.integration, pytest.mark.keras]

if importlib.util.find_spec("tensorflow") is None:
    pytest.skip(
        "TensorFlow is not installed: run ./install_script.sh --dev (the tensorflow extra)", allow_module_level=True
    )


@pytest.fixture(scope="module")
def keras_server(spawn) -> str:
    return spawn(
        "serve", "--port", "0", "--backend", "keras", "--weights", "random", "--seed", "3",
        "--max-batch", "8", "--batch-timeout-ms", "20", "--max-wait-ms", "0",  # bursts here check batching
    ).url  # fmt: skip


def test_keras_plumbing(keras_server: str, images_dir: Path, model_dir: Path) -> None:
    labels = load_labels(model_dir)
    status, _, doc = post_image(keras_server + "/predict?top=7", (images_dir / "cat_720p.jpg").read_bytes())
    assert status == 200, doc
    assert doc["model"] == "keras_mobilenet_v2_random_weights"
    preds = doc["predictions"]
    assert len(preds) == 7
    for p in preds:
        assert 0 <= p["index"] < 1000 and p["label"] == labels[p["index"]]
    scores = [p["score"] for p in preds]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001


def test_keras_batches_concurrent_requests(keras_server: str, images_dir: Path) -> None:
    data = (images_dir / "parrot.jpg").read_bytes()
    barrier = threading.Barrier(16)

    def one(_: int) -> dict:
        barrier.wait()
        status, _, doc = post_image(keras_server + "/predict", data)
        assert status == 200
        return doc

    with ThreadPoolExecutor(16) as pool:
        docs = list(pool.map(one, range(16)))
    assert max(d["batch_size"] for d in docs) > 1
    # same image, same answer whatever batch it ran in
    assert len({d["predictions"][0]["index"] for d in docs}) == 1
    text = http("GET", keras_server + "/metrics")[2].decode()
    count = next(line for line in text.splitlines() if line.startswith("imgclass_server_batch_size_count"))
    assert float(count.split()[-1]) < 17
