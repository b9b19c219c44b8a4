"""HAProxy's counters (`show stat`) read back into the Python engine's shapes: /backends entries and /metrics names."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .config import server_name
from .membership import Member

Rows = list[dict[str, str]]
CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


def _int(row: dict[str, str], key: str) -> int:
    value = row.get(key) or "0"
    return int(value) if value.lstrip("-").isdigit() else 0


@dataclass(frozen=True)
class SlotStats:
    """One slot's server: its state from the primary backend, its counts summed over every backend's copy."""

    status: str  # UP, "UP 1/3" (failing, still up), DOWN, "DOWN 1/2" (passing, still down), MAINT, DRAIN
    check: str  # the last check's result, e.g. L7OK, L4CON
    in_flight: int
    queued: int
    responses: dict[str, int]  # by class: 1xx..5xx
    errors: int  # connection errors and broken responses (econ + eresp)
    average_ms: int  # rtime: the mean response time of the last 1024 requests, HAProxy's figure

    @property
    def healthy(self) -> bool:
        return self.status.startswith("UP")

    @property
    def served(self) -> int:
        """Answers that count as served in the Python engine: anything but a 5xx."""
        return sum(v for k, v in self.responses.items() if k != "5xx")


def slot_stats(rows: Rows, primary: str) -> dict[str, SlotStats]:
    """Per server name (s1, s2, ...)."""
    out: dict[str, SlotStats] = {}
    servers = [r for r in rows if r.get("svname") not in ("FRONTEND", "BACKEND") and r.get("pxname") != "control"]
    for name in dict.fromkeys(r["svname"] for r in servers):
        copies = [r for r in servers if r["svname"] == name]
        main = next((r for r in copies if r["pxname"] == primary), copies[0])
        out[name] = SlotStats(
            status=main.get("status", ""),
            check=main.get("check_status", ""),
            in_flight=sum(_int(r, "scur") for r in copies),
            queued=sum(_int(r, "qcur") for r in copies),
            responses={c: sum(_int(r, f"hrsp_{c}") for r in copies) for c in CLASSES},
            errors=sum(_int(r, "econ") + _int(r, "eresp") for r in copies),
            average_ms=_int(main, "rtime"),
        )
    return out


def snapshot(member: Member, stats: SlotStats | None) -> dict[str, object]:
    """One /backends entry, in the Python engine's shape."""
    healthy = stats is not None and stats.healthy
    return {
        "url": member.url,
        "name": member.name,
        "healthy": healthy,
        "available": healthy,  # HAProxy marks a failing server down, no separate ejection
        "in_flight": stats.in_flight if stats else 0,
        "served": stats.served if stats else 0,
        "failures": stats.errors if stats else 0,
        "ejected_until": None,
        # HAProxy keeps a mean of the last 1024 answers, not a median
        "latency_p50_ms": float(stats.average_ms) if stats and stats.served else None,
    }


def forwarding(rows: Rows) -> Rows:
    """The BACKEND rows of the backends that forward to model servers."""
    return [r for r in rows if r.get("svname") == "BACKEND" and r.get("pxname") != "control"]


class EngineMetrics(Collector):
    """The Python engine's metric names, from the `show stat` read just before each scrape."""

    def __init__(self, primary: str, members: Callable[[], Sequence[Member]], restarts: Callable[[], int]) -> None:
        self.primary = primary
        self.members = members
        self.restarts = restarts
        self.rows: Rows = []
        self.counts: dict[str, int] = {}  # refusals HAProxy counted in proc.* variables

    def collect(self) -> Iterator[Metric]:
        slots = slot_stats(self.rows, self.primary)
        backends = forwarding(self.rows)
        members = [(m, slots.get(server_name(m.slot))) for m in self.members()]

        def total(key: str) -> int:
            return sum(_int(r, key) for r in backends)

        requests = CounterMetricFamily("imgclass_balancer_requests", "Forwarded requests by backend and status: "
                                       "HAProxy counts status classes (2xx), and errors (no usable response)",
                                       labels=["backend", "status"])  # fmt: skip
        for member, stats in members:
            if stats is not None:
                for cls, count in stats.responses.items():
                    requests.add_metric([member.url, cls], count)
                requests.add_metric([member.url, "error"], stats.errors)
        yield requests
        yield GaugeMetricFamily("imgclass_balancer_in_flight", "Requests being handled at the model servers",
                                value=sum(s.in_flight for _, s in members if s))  # fmt: skip
        yield GaugeMetricFamily("imgclass_balancer_queued", "Requests waiting in HAProxy for a free server slot",
                                value=total("qcur"))  # fmt: skip
        retries = CounterMetricFamily("imgclass_balancer_retries", "Requests retried on another backend "
                                      "(HAProxy's retries: no response, or a try timeout)", labels=["reason"])  # fmt: skip
        retries.add_metric(["no_response"], total("wretr"))
        yield retries
        yield GaugeMetricFamily("imgclass_balancer_backends_in_service", "Backends healthy and not in maintenance",
                                value=sum(1 for _, s in members if s and s.healthy))  # fmt: skip
        yield CounterMetricFamily("imgclass_balancer_no_backend", "Requests refused: no healthy backend",
                                  value=self.counts.get("no_backend", 0))  # fmt: skip
        refused = CounterMetricFamily("imgclass_balancer_queue_refused", "Requests refused by the queue",
                                      labels=["reason"])  # fmt: skip
        refused.add_metric(["full"], self.counts.get("queue_full", 0))
        yield refused
        gone = CounterMetricFamily("imgclass_balancer_client_gone", "Requests whose client left: queued (HAProxy "
                                   "ends them without a status), or forwarding (its client aborts)", labels=["stage"])  # fmt: skip
        gone.add_metric(["queued"], total("hrsp_other"))
        gone.add_metric(["forwarding"], total("cli_abrt"))
        yield gone
        yield CounterMetricFamily("imgclass_balancer_engine_restarts", "Times HAProxy died and was started again",
                                  value=self.restarts())  # fmt: skip
