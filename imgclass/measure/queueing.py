"""Queueing theory for the scaling overlay: M/M/1 per server for random dispatch, M/M/c (Erlang C)."""

from __future__ import annotations

import math
import random
from collections import deque

from scipy.stats import poisson


def mm1_mean_response(arrival_rate: float, service_rate: float) -> float:
    """Mean time in system W = 1 / (mu - lambda) of an M/M/1 queue; inf when unstable."""
    if arrival_rate >= service_rate:
        return math.inf
    return 1.0 / (service_rate - arrival_rate)


def erlang_c(servers: int, offered_load: float) -> float:
    """Probability that an arrival waits in M/M/c, with offered load a = lambda / mu (Erlangs).

    Written with Poisson terms, which stay finite for large c:
    C = pmf(c; a) / (pmf(c; a) + (1 - rho) * cdf(c - 1; a)), rho = a / c.
    """
    if servers < 1:
        raise ValueError("servers must be >= 1")
    rho = offered_load / servers
    if rho >= 1:
        return 1.0
    top = float(poisson.pmf(servers, offered_load))
    return top / (top + (1 - rho) * float(poisson.cdf(servers - 1, offered_load)))


def mmc_mean_response(arrival_rate: float, service_rate: float, servers: int) -> float:
    """Mean time in system W = C / (c mu - lambda) + 1 / mu of an M/M/c queue."""
    if arrival_rate >= servers * service_rate:
        return math.inf
    wait = erlang_c(servers, arrival_rate / service_rate) / (servers * service_rate - arrival_rate)
    return wait + 1.0 / service_rate


def mmc_held_mean_response(arrival_rate: float, mean_service: float, mean_hold: float, servers: int) -> float:
    """Mean time in system of a central queue in front of c slots, each held `mean_hold` per job.

    The balancer's queue with --max-conn 1: a slot is taken from dispatch until the answer is
    back, so it is held for the service plus the dispatch round trip, while the job itself is
    only served for `mean_service`. The wait is Erlang C's with service rate 1/mean_hold.
    """
    held = mmc_mean_response(arrival_rate, 1.0 / mean_hold, servers)
    return held - mean_hold + mean_service


PULL = "queue"  # pull dispatch: c workers take jobs from one FIFO queue, which is M/M/c exactly


def theory_mean_response(
    policy: str, arrival_rate: float, mean_service: float, servers: int, mean_hold: float | None = None
) -> float | None:
    """Mean response time (s) the model predicts for `policy`, or None where no model applies.

    random: each of n servers is M/M/1 with arrival rate lambda/n (Poisson splitting).
    least_outstanding: approximately M/M/c (a central queue; dispatching at once to the least
    busy server is join-the-shortest-queue, which is close to, and never better than, M/M/c).
    mean_hold given: the balancer queues centrally (--max-conn 1), which is M/M/c for every
    policy, since the policy only chooses among idle servers.
    queue (pull dispatch): workers take jobs from one FIFO stream as they are free: M/M/c.
    """
    if mean_hold is not None:
        return mmc_held_mean_response(arrival_rate, mean_service, mean_hold, servers)
    mu = 1.0 / mean_service
    if policy == "random":
        return mm1_mean_response(arrival_rate / servers, mu)
    if policy in ("least_outstanding", PULL):
        return mmc_mean_response(arrival_rate, mu, servers)
    return None


def simulate_jsq_mean_response(
    arrival_rate: float, service_rate: float, servers: int, arrivals: int = 100_000, seed: int = 1
) -> float:
    """Mean time in system (s) of join-the-shortest-queue, by discrete-event simulation.

    least_outstanding dispatches each request on arrival to the server with the fewest in
    system, and it then waits *there*; M/M/c keeps one central queue and never lets a job wait
    while another server is idle, so it is a lower bound that drifts away at high load. No
    closed form is exact for JSQ; this seeded simulation (Poisson arrivals, exponential
    service, FIFO per server, ties broken at random) is the reference the overlay shows beside it.
    """
    rng = random.Random(seed)
    queues: list[deque[float]] = [deque() for _ in range(servers)]  # departure times, in order
    t = total = 0.0
    warm = arrivals // 10
    for i in range(arrivals):
        t += rng.expovariate(arrival_rate)
        for q in queues:
            while q and q[0] <= t:
                q.popleft()
        shortest = min(len(q) for q in queues)
        candidates = [q for q in queues if len(q) == shortest]
        q = candidates[rng.randrange(len(candidates))]
        done = max(q[-1] if q else t, t) + rng.expovariate(service_rate)
        q.append(done)
        if i >= warm:
            total += done - t
    return total / (arrivals - warm)
