"""Routes every server has: liveness and Prometheus metrics, and a cheap labelled counter."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .app import Handler, Request, Response, json_response


async def healthz(request: Request) -> Response:
    """Liveness: the process is up and its event loop answers."""
    return json_response({"status": "alive"})


def metrics_handler(registry: CollectorRegistry) -> Handler:
    """GET /metrics in Prometheus' text format, for `registry`."""
    content_type = [(b"content-type", CONTENT_TYPE_LATEST.encode())]

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), 200, list(content_type))

    return metrics


# The per-request metrics are plain numbers that prometheus_client turns into its text format at
# scrape time (its custom-collector interface). Its own Counter and Histogram take a lock and walk
# the buckets in Python on every update: on the balancer, about a tenth of the Python run for each
# forwarded request. Everything here runs on the event loop's thread, so no lock is needed.


class Counts(Collector):
    """A counter per label set: `inc(*labels)` is one dict update."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str], registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = list(labels)
        self.values: dict[tuple[object, ...], int] = {}
        registry.register(self)

    def inc(self, *key: object) -> None:
        values = self.values
        values[key] = values.get(key, 0) + 1

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for key, value in list(self.values.items()):
            family.add_metric([str(k) for k in key], value)
        yield family


class Buckets(Collector):
    """A histogram: `observe(value)` is one bisect and two additions."""

    def __init__(self, name: str, documentation: str, bounds: Sequence[float], registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = sorted(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        registry.register(self)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def collect(self) -> Iterator[Metric]:
        cumulative, buckets = 0, []
        for bound, count in zip([*map(str, self.bounds), "+Inf"], self.counts, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=self.sum)


class CountedBy(Collector):
    """A counter whose value another object keeps (an int attribute), read at scrape time."""

    def __init__(self, name: str, documentation: str, read: Callable[[], float], registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.read = read
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, self.documentation, value=self.read())
