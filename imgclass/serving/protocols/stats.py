"""The model's statistics in Triton's shape (GET /v2/models/{m}/stats), from the batcher's own timings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ...errors import ImgclassError
from ..batching import Batcher, Job, Result


@dataclass
class Duration:
    """A count and the nanoseconds they took in all, as Triton's StatisticDuration."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += max(0, round(seconds * 1e9))

    def to_json(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class BatchDurations:
    """Per batch size: executions, and their decoding, inference and output time."""

    executions: float = 0.0  # a job of a batch of n adds 1/n, so a whole batch adds one
    compute_input_s: float = 0.0
    compute_infer_s: float = 0.0
    compute_output_s: float = 0.0


@dataclass
class ModelStats:
    """Every image the batcher answered, /predict's as well as the protocols': each is one request
    in Triton's terms (a batch of B in one infer request is B of them)."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, BatchDurations] = field(default_factory=dict)
    last_inference_ms: int = 0

    def record(self, result: Result, seconds: float) -> None:
        """One image answered in `seconds` from submission: queue (until a worker took it), decoding
        (compute_input), inference (compute_infer, the whole batch's, as Triton counts it), and the
        rest (top-k and the hand-back to the event loop) as compute_output."""
        queue_s, decode_s, infer_s = result.queue_ms / 1000, result.decode_ms / 1000, result.infer_ms / 1000
        output_s = max(0.0, seconds - queue_s - decode_s - infer_s)
        self.success.add(seconds)
        self.queue.add(queue_s)
        self.compute_input.add(decode_s)
        self.compute_infer.add(infer_s)
        self.compute_output.add(output_s)
        size = max(1, result.batch_size)
        batch = self.batches.setdefault(size, BatchDurations())
        batch.executions += 1 / size
        batch.compute_input_s += decode_s
        batch.compute_infer_s += infer_s / size
        batch.compute_output_s += output_s / size
        self.last_inference_ms = int(time.time() * 1000)

    def failed(self, seconds: float) -> None:
        self.fail.add(seconds)

    def watch(self, batcher: Batcher) -> None:
        """Count every job `batcher` answers. Wrapping its submit, rather than each route, keeps
        /predict's images in the figures with no change to /predict."""
        submit = batcher.submit

        async def counted(job: Job) -> Result:
            start = time.perf_counter()
            try:
                result = await submit(job)
            except ImgclassError:
                self.failed(time.perf_counter() - start)
                raise
            self.record(result, time.perf_counter() - start)
            return result

        batcher.submit = counted  # type: ignore[method-assign]

    def to_json(self, name: str, version: str) -> dict[str, object]:
        """One entry of Triton's "model_stats" list."""
        executions = round(sum(b.executions for b in self.batches.values()))
        batch_stats = []
        for size, batch in sorted(self.batches.items()):
            count = round(batch.executions)
            batch_stats.append({
                "batch_size": size,
                "compute_input": {"count": count, "ns": round(batch.compute_input_s * 1e9)},
                "compute_infer": {"count": count, "ns": round(batch.compute_infer_s * 1e9)},
                "compute_output": {"count": count, "ns": round(batch.compute_output_s * 1e9)},
            })  # fmt: skip
        return {
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.success.count,
            "execution_count": executions,
            "inference_stats": {
                "success": self.success.to_json(),
                "fail": self.fail.to_json(),
                "queue": self.queue.to_json(),
                "compute_input": self.compute_input.to_json(),
                "compute_infer": self.compute_infer.to_json(),
                "compute_output": self.compute_output.to_json(),
                "cache_hit": {"count": 0, "ns": 0},
                "cache_miss": {"count": 0, "ns": 0},
            },
            "response_stats": {},
            "batch_stats": batch_stats,
            "memory_usage": [],
        }
