"""The model on LitServe, as its docs show: a LitAPI (setup, decode_request, predict, encode_response)."""

from __future__ import annotations

import argparse
import base64

import litserve as ls
from peer_model import Classifier


class MobileNetAPI(ls.LitAPI):
    def __init__(self, model_dir: str) -> None:
        super().__init__()
        self.model_dir = model_dir

    def setup(self, device: str) -> None:
        self.classifier = Classifier(self.model_dir)

    def decode_request(self, request: dict) -> bytes:
        return base64.b64decode(request["image"])

    def predict(self, x: bytes) -> list[str]:
        return self.classifier.top5(x)

    def encode_response(self, output: list[str]) -> dict[str, list[str]]:
        return {"predictions": output}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-dir", required=True)
    args = parser.parse_args()
    # two inference processes of one thread each, as imgclass's two worker threads
    server = ls.LitServer(MobileNetAPI(args.model_dir), accelerator="cpu", devices=1, workers_per_device=2)
    server.run(port=args.port, host="127.0.0.1", generate_client_file=False)
