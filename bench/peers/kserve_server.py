"""The model on KServe's Python model server, as its custom-model docs show: a Model with load and predict."""

from __future__ import annotations

import argparse
import base64
import uuid

from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
from peer_model import TOP, Classifier


class MobileNet(Model):
    def __init__(self, name: str, model_dir: str) -> None:
        super().__init__(name)
        self.model_dir = model_dir
        self.load()

    def load(self) -> None:
        self.classifier = Classifier(self.model_dir)
        self.ready = True

    # With workers > 1 KServe spawns processes and pickles the model into each: every process loads
    # its own interpreter, which cannot be pickled.
    def __getstate__(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if k != "classifier"}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self.load()

    def predict(self, payload: InferRequest, headers: dict[str, str] | None = None) -> InferResponse:
        # JSON BYTES elements are the images' base64, as KServe's image examples send them
        images = [base64.b64decode(item) for item in payload.inputs[0].data]
        rows = [label for image in images for label in self.classifier.top5(image)]
        output = InferOutput(name="probs", shape=[len(images), TOP], datatype="BYTES", data=rows)
        return InferResponse(model_name=self.name, infer_outputs=[output], response_id=payload.id or str(uuid.uuid4()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    # One inference at a time per process (a sync predict runs on the event loop): --workers
    # processes give the same number of inference threads as imgclass's worker threads.
    ModelServer(http_port=args.port, workers=args.workers, enable_grpc=False).start(
        [MobileNet("mobilenet_v2", args.model_dir)]
    )
