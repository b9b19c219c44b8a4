"""Inference backends (litert, keras, sleep) behind one interface, picked by name from a table."""

from __future__ import annotations

import os
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..config import ServiceTime, parse_service_time
from ..errors import ConfigError, ModelFileError
from .modelfiles import LABELS_FILE, load_labels, locate

NUM_CLASSES = 1000

# One engine per worker thread: LiteRT interpreters must not be shared between threads.
Engine = Callable[[np.ndarray, float], np.ndarray]
"""(batch, arrived) -> probabilities: batch is (n, 224, 224, 3) uint8 RGB, arrived the
time.perf_counter() at which the batch's first job joined the queue; the result is
(n, 1000) float32 class probabilities in Keras index order."""


@dataclass(frozen=True)
class BackendOptions:
    model_dir: str
    weights: str = "imagenet"
    service_time: str = "exp:20ms"
    seed: int | None = None


class Backend(ABC):
    """A loaded model that hands out per-thread engines."""

    name: str = ""
    default_max_batch = 1
    # Waiting images per worker thread when --max-queue is 0. A bounded queue is what keeps the
    # answers a server accepts fast under overload: what does not fit gets a 503 at once (and the
    # balancer tries another server). With 128 places, a 2x overload made accepted requests wait
    # 3.7 s (195 x the unloaded p50, bench/overload.py); --max-wait-ms bounds the wait in time.
    queue_per_worker = 8
    bounded_wait = True  # honours --max-wait-ms
    # True when the engine itself uses every core, so one worker thread is right.
    multithreaded_engine = False

    def __init__(self, options: BackendOptions) -> None:
        self.options = options
        self.labels: list[str] = []
        self.model_name = self.name

    @abstractmethod
    def engine(self, worker: int) -> Engine: ...

    def max_batch_allowed(self) -> int:
        return 1024

    def default_threads(self) -> int:
        return 1 if self.multithreaded_engine else (os.cpu_count() or 1)

    def warm_up(self, engine: Engine, max_batch: int) -> None:
        engine(np.zeros((1, 224, 224, 3), np.uint8), time.perf_counter())
        if max_batch > 1:
            engine(np.zeros((max_batch, 224, 224, 3), np.uint8), time.perf_counter())


class LiteRTBackend(Backend):
    """MobileNetV2 1.0/224 int8 on LiteRT with XNNPACK, one interpreter per worker thread."""

    name = "litert"

    def __init__(self, options: BackendOptions) -> None:
        super().__init__(options)
        files = locate(options.model_dir)
        self.labels = files.labels
        self.model_path = str(files.model)
        self.model_name = "mobilenet_v2_1.0_224_quant"
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as exc:
            raise ConfigError("the litert backend needs ai-edge-litert; run ./install_script.sh") from exc
        self._interpreter_class = Interpreter

    def max_batch_allowed(self) -> int:
        return 1  # XNNPACK refuses to resize this int8 graph ("failed to reshape")

    def engine(self, worker: int) -> Engine:
        try:
            interpreter = self._interpreter_class(model_path=self.model_path, num_threads=1)
            interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelFileError(
                f"{self.model_path} cannot be loaded by LiteRT ({exc}); re-download it with ./install_script.sh."
            ) from exc
        inp = interpreter.get_input_details()[0]["index"]
        out = interpreter.get_output_details()[0]["index"]
        scale = interpreter.get_output_details()[0]["quantization"][0] or 1 / 256

        def run(batch: np.ndarray, arrived: float) -> np.ndarray:
            result = np.empty((len(batch), NUM_CLASSES), np.float32)
            for i, image in enumerate(batch):
                interpreter.set_tensor(inp, image[None])
                interpreter.invoke()
                # index 0 of this model is 'background'; drop it to get Keras indices
                result[i] = interpreter.get_tensor(out)[0, 1:] * scale
            return result

        return run


class KerasBackend(Backend):
    """Keras MobileNetV2 (float), called through one compiled tf.function, batched."""

    name = "keras"
    default_max_batch = 8
    multithreaded_engine = True
    queue_per_worker = 16  # two full batches: batches form from the queue

    def __init__(self, options: BackendOptions) -> None:
        super().__init__(options)
        self.labels = load_labels(options.model_dir)
        try:
            import tensorflow as tf
        except ImportError as exc:
            raise ConfigError(
                "the keras backend needs TensorFlow; install the extra: pip install '.[tensorflow]'"
            ) from exc
        weights = options.weights
        if weights == "random":
            tf.keras.utils.set_random_seed(options.seed or 0)
            keras_weights = None
        elif weights == "imagenet":
            keras_weights = "imagenet"
        elif os.path.isfile(weights):
            keras_weights = weights
        else:
            raise ConfigError(
                f"--weights {weights!r} is neither 'imagenet', 'random' nor an existing file; fix the path."
            )
        try:
            model = tf.keras.applications.MobileNetV2(weights=keras_weights)
        except Exception as exc:  # Keras raises bare Exception subclasses for download/load failures
            raise ModelFileError(
                f"Keras MobileNetV2 weights could not be loaded ({exc}); pass --weights PATH to a local weights file."
            ) from exc
        self.model_name = "keras_mobilenet_v2" + ("_random_weights" if weights == "random" else "")

        @tf.function(input_signature=[tf.TensorSpec([None, 224, 224, 3], tf.uint8)], reduce_retracing=True)
        def infer(images: tf.Tensor) -> tf.Tensor:
            x = tf.cast(images, tf.float32) / 127.5 - 1.0  # keras mobilenet_v2.preprocess_input
            return model(x, training=False)

        self._infer = infer

    def engine(self, worker: int) -> Engine:
        def run(batch: np.ndarray, arrived: float) -> np.ndarray:
            return self._infer(batch).numpy().astype(np.float32)

        return run


class SleepBackend(Backend):
    """No model: each image 'takes' a service time drawn from a distribution, using no CPU."""

    name = "sleep"
    # It emulates a FIFO server for queueing experiments (M/M/1, M/M/c), whose queues are unbounded:
    # at rho = 0.8 more than 4 wait a quarter of the time, and shedding them would change the queue.
    queue_per_worker = 1024
    bounded_wait = False

    def __init__(self, options: BackendOptions) -> None:
        super().__init__(options)
        self.distribution: ServiceTime = parse_service_time(options.service_time)
        self.model_name = f"sleep({options.service_time})"
        try:
            self.labels = load_labels(options.model_dir)
        except ModelFileError:
            # The sleep backend is for scaling runs on hosts without the model; names are cosmetic.
            self.labels = [f"class {i}" for i in range(NUM_CLASSES)]
        self._seed = options.seed

    def warm_up(self, engine: Engine, max_batch: int) -> None:
        return None  # nothing to warm, and a warm-up sleep would only delay readiness

    def engine(self, worker: int) -> Engine:
        return _SleepEngine(
            self.distribution, random.Random(None if self._seed is None else self._seed * 1000 + worker)
        )


class _SleepEngine:
    """One worker's emulated FIFO server; `service_ms` is the service time drawn for its last batch."""

    def __init__(self, distribution: ServiceTime, rng: random.Random) -> None:
        self.distribution = distribution
        self.rng = rng
        self.uniform = np.full(NUM_CLASSES, 1.0 / NUM_CLASSES, np.float32)
        self.overshoot = 0.0  # how late time.sleep wakes, learned as we go, so the mean stays exact
        self.free_at = 0.0  # when this worker's previous job left, on the emulated clock
        self.service_ms = 0.0

    def __call__(self, batch: np.ndarray, arrived: float) -> np.ndarray:
        # An exact FIFO server: service starts when the job arrives or the previous one leaves,
        # whichever is later (Lindley's recursion), and the whole of it is the drawn time; decoding
        # runs inside it. Starting from when a worker thread gets going instead would add the
        # thread -> event loop -> thread handoff (~0.4 ms on a busy host) to every service.
        start = max(arrived, self.free_at)
        service = sum(self.distribution.sample(self.rng) for _ in range(len(batch)))
        self.service_ms = service * 1000
        deadline = self.free_at = start + service
        wait = deadline - time.perf_counter() - self.overshoot
        if wait > 0:
            time.sleep(wait)
            late = time.perf_counter() - deadline
            self.overshoot = min(0.002, max(0.0, self.overshoot + 0.2 * late))
        return np.tile(self.uniform, (len(batch), 1))


BACKENDS: dict[str, type[Backend]] = {b.name: b for b in (LiteRTBackend, KerasBackend, SleepBackend)}


def load_backend(name: str, options: BackendOptions) -> Backend:
    try:
        cls = BACKENDS[name]
    except KeyError:
        raise ConfigError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}.") from None
    return cls(options)


__all__ = ["BACKENDS", "LABELS_FILE", "Backend", "BackendOptions", "Engine", "load_backend"]
