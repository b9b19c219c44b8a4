"""Dispatch policies: small classes behind one interface, picked by name from POLICIES."""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Protocol


class Candidate(Protocol):
    in_flight: int


class Policy(ABC):
    name = ""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    @abstractmethod
    def choose(self, candidates: Sequence[Candidate]) -> Candidate:
        """Pick one of a non-empty sequence of healthy candidates."""


class Random(Policy):
    """Uniform over the healthy backends: the original design."""

    name = "random"

    def choose(self, candidates: Sequence[Candidate]) -> Candidate:
        return candidates[self.rng.randrange(len(candidates))]


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self._next = 0

    def choose(self, candidates: Sequence[Candidate]) -> Candidate:
        chosen = candidates[self._next % len(candidates)]
        self._next += 1
        return chosen


class LeastOutstanding(Policy):
    """Fewest requests in flight; ties broken at random so equal backends share the load."""

    name = "least_outstanding"

    def choose(self, candidates: Sequence[Candidate]) -> Candidate:
        low = min(c.in_flight for c in candidates)
        best = [c for c in candidates if c.in_flight == low]
        return best[self.rng.randrange(len(best))] if len(best) > 1 else best[0]


class PowerOfTwoChoices(Policy):
    """Sample two, take the one with fewer in flight (HAProxy random(2), Envoy LEAST_REQUEST)."""

    name = "p2c"

    def choose(self, candidates: Sequence[Candidate]) -> Candidate:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self.rng.sample(range(len(candidates)), 2)
        first, second = candidates[a], candidates[b]
        return second if second.in_flight < first.in_flight else first


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (Random, RoundRobin, LeastOutstanding, PowerOfTwoChoices)}


def make_policies(seed: int | None) -> dict[str, Policy]:
    """One instance of each policy, sharing a seeded RNG, so per-request `policy=` keeps its state."""
    rng = random.Random(seed)
    return {name: cls(rng) for name, cls in POLICIES.items()}
