"""Routes every server has: liveness and Prometheus metrics, and a cheap labelled counter."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

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


class CountByLabels:
    """A labelled Prometheus counter whose children are looked up once per label set:
    `.labels()` on every request was a measurable share of the CPU per request."""

    def __init__(self, counter: Counter) -> None:
        self._counter = counter
        self._children: dict[tuple[object, ...], Counter] = {}

    def inc(self, *key: object) -> None:
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._counter.labels(*(str(k) for k in key))
        child.inc()
