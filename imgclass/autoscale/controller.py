"""The control loop: observe, decide, act, every --interval; log each decision with its inputs.

A signal that cannot be read (Redis or the balancer briefly unreachable) holds the pool as it is:
a controller that read "no load" from an error would scale a busy service to its minimum.
"""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry, Gauge

from .. import log
from ..web.metrics import Counts
from .actuators import Actuator
from .policies import Decision, ScalingPolicy
from .signals import Signals


class Controller:
    def __init__(
        self, policy: ScalingPolicy, signals: Signals, actuator: Actuator, interval: float, logger: log.EventLogger,
        registry: CollectorRegistry | None = None,
    ) -> None:  # fmt: skip
        self.policy = policy
        self.signals = signals
        self.actuator = actuator
        self.interval = interval
        self.logger = logger
        self.desired = policy.bounds.minimum
        self.last: Decision | None = None
        self.history: list[dict[str, float | int | str | None]] = []  # every evaluation, for experiments
        self.registry = registry or CollectorRegistry()
        Gauge("imgclass_autoscale_desired", "Workers the policy wants", registry=self.registry).set_function(
            lambda: self.desired
        )
        Gauge("imgclass_autoscale_current", "Workers running and ready", registry=self.registry).set_function(
            lambda: self.actuator.ready
        )
        self.decisions = Counts("imgclass_autoscale_decisions", "Evaluations, by what they did", ["action"],
                                self.registry)  # fmt: skip
        self.started = time.monotonic()

    async def start(self) -> None:
        # What already serves (testbed nodes a deploy started) is the pool's first size: starting at
        # --min would cut a loaded service's capacity before anything was measured.
        await self.actuator.adopt()
        self.desired = self.policy.bounds.clamp(self.actuator.ready)
        await self.actuator.scale_to(self.desired)

    async def step(self) -> Decision | None:
        current = self.actuator.ready
        obs = await self.signals.observe(current)
        if obs is None:
            self.decisions.inc("hold_unreadable")
            self.logger.warning("signals_unreadable", current=current, holding=self.desired)
            return None
        decision = self.policy.decide(obs)
        self.last = decision
        action = "up" if decision.desired > self.desired else "down" if decision.desired < self.desired else "hold"
        self.decisions.inc(action)
        self.history.append({
            "t": round(obs.time - self.started, 3), "current": current, "desired": decision.desired,
            "depth": obs.depth, "arrival_rate": obs.arrival_rate, "service_rate": obs.service_rate,
            "action": action,
        })  # fmt: skip
        if action != "hold" or self.logger.enabled(10):
            self.logger.info("decision", policy=self.policy.name, change=action, current=current,
                             desired=decision.desired, raw=decision.raw, depth=obs.depth,
                             arrival=round(obs.arrival_rate or 0, 2), mu=round(obs.service_rate or 0, 3),
                             why=decision.reason)  # fmt: skip
        if decision.desired != self.desired:
            self.desired = decision.desired
            await self.actuator.scale_to(self.desired)
        return decision

    async def run(self, stop: asyncio.Event) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        due = loop.time()
        while not stop.is_set():
            due += self.interval
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, due - loop.time()))
                break
            except asyncio.TimeoutError:
                pass
            try:
                await self.step()
            except Exception as exc:  # a failed start or stop of a worker must not end the loop
                self.logger.error("step_failed", type=type(exc).__name__, message=str(exc))
            due = max(due, loop.time() - self.interval)

    async def close(self) -> None:
        await self.actuator.close()
        await self.signals.close()
