"""Service-time distributions for the sleep backend, parsed from strings like 'exp:20ms'."""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*(s|ms|us)?\s*$")


def parse_duration(text: str) -> float:
    """'20ms' -> 0.02 seconds; a bare number is seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration such as 20ms, 0.5s or 300us")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


@dataclass(frozen=True)
class ServiceTime:
    """A distribution of service times in seconds."""

    kind: str
    mean: float
    sigma: float = 0.0

    def sample(self, rng: random.Random) -> float:
        if self.kind == "const":
            return self.mean
        if self.kind == "exp":
            return rng.expovariate(1.0 / self.mean)
        # lognormal parametrised by its mean and the sigma of the underlying normal
        mu = math.log(self.mean) - self.sigma**2 / 2
        return rng.lognormvariate(mu, self.sigma)

    @property
    def std(self) -> float:
        if self.kind == "const":
            return 0.0
        if self.kind == "exp":
            return self.mean
        return self.mean * math.sqrt(math.exp(self.sigma**2) - 1)


def parse_service_time(text: str) -> ServiceTime:
    kind, _, rest = text.partition(":")
    kind = kind.strip().lower()
    if kind not in ("exp", "const", "lognormal") or not rest:
        raise ValueError(f"{text!r}: write exp:20ms, const:5ms or lognormal:20ms,0.5")
    if kind == "lognormal":
        mean_text, _, sigma_text = rest.partition(",")
        if not sigma_text:
            raise ValueError(f"{text!r}: lognormal needs a mean and a sigma, e.g. lognormal:20ms,0.5")
        sigma = float(sigma_text)
        if sigma <= 0:
            raise ValueError(f"{text!r}: the lognormal sigma must be greater than 0")
        mean = parse_duration(mean_text)
    else:
        mean, sigma = parse_duration(rest), 0.0
    if mean <= 0:
        raise ValueError(f"{text!r}: the mean service time must be greater than 0")
    return ServiceTime(kind, mean, sigma)
