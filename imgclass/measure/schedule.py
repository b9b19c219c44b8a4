"""A rate that changes over time, and the send times of a Poisson process that follows it (by thinning).

    step:20@30s,200@60s,20@60s     20/s for 30 s, then 200/s for 60 s, then 20/s for 60 s
    ramp:20-200@60s,200@30s        from 20/s to 200/s over 60 s, linearly; then 200/s for 30 s
    csv:trace.csv                  rows "time_s,rate": the rate holds from each time to the next

A segment is `R@D` (constant) or `R1-R2@D` (a linear ramp); `step:` and `ramp:` only name the
shape. The send times are those of a non-homogeneous Poisson process, sampled by thinning (Lewis
and Shedler): a homogeneous process at the highest rate, each point kept with probability
rate(t) / highest rate. Requests still leave at their scheduled times, and latency still counts
from them, as for a constant rate.
"""

from __future__ import annotations

import bisect
import csv
import itertools
import random
import re
from dataclasses import dataclass
from pathlib import Path

from ..config import parse_duration


@dataclass(frozen=True)
class Segment:
    start: float  # seconds from the start of the run
    duration: float
    rate_from: float
    rate_to: float

    def rate(self, t: float) -> float:
        if self.duration <= 0:
            return self.rate_to
        return self.rate_from + (self.rate_to - self.rate_from) * (t - self.start) / self.duration


@dataclass(frozen=True)
class Schedule:
    segments: tuple[Segment, ...]
    text: str

    @property
    def duration(self) -> float:
        last = self.segments[-1]
        return last.start + last.duration

    @property
    def peak(self) -> float:
        return max(max(s.rate_from, s.rate_to) for s in self.segments)

    @property
    def mean_rate(self) -> float:
        area = sum((s.rate_from + s.rate_to) / 2 * s.duration for s in self.segments)
        return area / self.duration

    def rate(self, t: float) -> float:
        starts = [s.start for s in self.segments]
        i = max(0, bisect.bisect_right(starts, t) - 1)
        return self.segments[i].rate(t)

    def offsets(self, seed: int | None) -> list[float]:
        """Send times (s) of the non-homogeneous Poisson process, by thinning."""
        rng = random.Random(seed)
        peak, end = self.peak, self.duration
        if peak <= 0:
            return []
        out, t = [], 0.0
        while True:
            t += rng.expovariate(peak)
            if t >= end:
                return out
            if rng.random() * peak < self.rate(t):
                out.append(t)


_SEGMENT = re.compile(r"^\s*([0-9.]+)(?:\s*-\s*([0-9.]+))?\s*@\s*(\S+)\s*$")
FIX = "write step:20@30s,200@60s,20@60s, ramp:20-200@60s, or csv:FILE with rows time_s,rate"


def parse_schedule(text: str) -> Schedule:
    kind, _, body = text.partition(":")
    kind = kind.strip().lower()
    if kind == "csv":
        return _from_csv(body.strip(), text)
    if kind not in ("step", "ramp") or not body:
        raise ValueError(f"{text!r} is not a schedule; {FIX}")
    segments, start = [], 0.0
    for part in body.split(","):
        match = _SEGMENT.match(part)
        if not match:
            raise ValueError(f"{part!r} in {text!r} is not RATE@DURATION or FROM-TO@DURATION; {FIX}")
        first = float(match.group(1))
        last = float(match.group(2)) if match.group(2) else first
        duration = parse_duration(match.group(3))
        if duration <= 0:
            raise ValueError(f"{part!r}: a segment lasts more than 0 s; {FIX}")
        segments.append(Segment(start, duration, first, last))
        start += duration
    return Schedule(tuple(segments), text)


def _from_csv(path: str, text: str) -> Schedule:
    try:
        with open(Path(path), newline="") as fh:
            rows = [(float(r[0]), float(r[1])) for r in csv.reader(fh) if r and not r[0].startswith("#")
                    and r[0].strip().replace(".", "", 1).isdigit()]  # fmt: skip
    except OSError as exc:
        raise ValueError(f"cannot read the trace {path!r} ({exc.strerror}); {FIX}") from exc
    if len(rows) < 2:
        raise ValueError(f"the trace {path!r} needs at least two rows time_s,rate; {FIX}")
    rows.sort()
    segments = tuple(Segment(t0, t1 - t0, r0, r0) for (t0, r0), (t1, _) in itertools.pairwise(rows))
    return Schedule(segments, text)
