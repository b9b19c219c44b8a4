"""The model every peer serves: imgclass's LiteRT file, its preprocessing (images.decode) and top-5, one thread."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # a peer's venv has no imgclass: its decode comes from the checkout

from ai_edge_litert.interpreter import Interpreter  # noqa: E402

from imgclass.serving.images import decode  # noqa: E402

MODEL_FILE = "mobilenet_v2_1.0_224_quant.tflite"
MAX_PIXELS = 50_000_000  # imgclass serve's --max-pixels default
TOP = 5


class Classifier:
    """One LiteRT interpreter with one thread, as each of imgclass's inference workers has."""

    def __init__(self, model_dir: str) -> None:
        self.interpreter = Interpreter(model_path=str(Path(model_dir) / MODEL_FILE), num_threads=1)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]["index"]
        output = self.interpreter.get_output_details()[0]
        self.output = output["index"]
        self.scale = output["quantization"][0] or 1 / 256
        lines = (Path(model_dir) / "imagenet_labels.txt").read_text(encoding="utf-8").splitlines()
        self.labels = lines[1:1001]  # line 0 is 'background'

    def top5(self, data: bytes) -> list[str]:
        """Triton's classification strings, 'score:index:label', best first, for one encoded image."""
        self.interpreter.set_tensor(self.input, decode(data, MAX_PIXELS)[None])
        self.interpreter.invoke()
        probs = self.interpreter.get_tensor(self.output)[0, 1:] * self.scale
        best = np.argpartition(-probs, TOP - 1)[:TOP]
        best = best[np.argsort(-probs[best], kind="stable")]
        return [f"{probs[i]:f}:{i}:{self.labels[i]}" for i in best]
