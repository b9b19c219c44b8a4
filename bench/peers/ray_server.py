"""The model on Ray Serve, as its docs show: a deployment of 2 replicas, requests grouped by @serve.batch."""

from __future__ import annotations

import argparse
import base64
import signal
import threading

import ray
from peer_model import Classifier
from ray import serve
from starlette.requests import Request


@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 1})
class MobileNet:
    def __init__(self, model_dir: str) -> None:
        self.classifier = Classifier(model_dir)

    # LiteRT runs this int8 graph one image at a time, so a batch is a loop (as imgclass's --max-batch 1)
    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.002)
    async def classify(self, images: list[bytes]) -> list[list[str]]:
        return [self.classifier.top5(image) for image in images]

    async def __call__(self, request: Request) -> dict[str, list[str]]:
        doc = await request.json()
        return {"predictions": await self.classify(base64.b64decode(doc["image"]))}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-dir", required=True)
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(MobileNet.bind(args.model_dir), route_prefix="/predict")
    print("ready", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
