"""The notifier's safety net, without Redis: its looks back off, and a failed look does not fail the wait."""

from __future__ import annotations

import asyncio

from redis.exceptions import ConnectionError as RedisConnectionError

from imgclass import log
from imgclass.queue.notify import Notifier


class Broker:
    """Answers job() from a script: a dict, None, or an exception to raise."""

    def __init__(self, answers: list[object]) -> None:
        self.answers = answers
        self.looks = 0

    async def job(self, job_id: str) -> dict[str, str] | None:
        self.looks += 1
        answer = self.answers[min(self.looks - 1, len(self.answers) - 1)]
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[return-value]


def notifier(broker: Broker) -> Notifier:
    return Notifier(broker, log.get_logger("t", "front", "WARNING"), fallback_s=0.05)  # type: ignore[arg-type]


def test_looks_at_a_waiting_job_at_doubling_intervals() -> None:
    broker = Broker([{"status": "queued"}])
    fields = asyncio.run(notifier(broker).wait("j", 1.6))
    assert fields == {"status": "queued"}
    # 0.05 + 0.1 + 0.2 + 0.4 + 0.8 = 1.55 s: five looks after the first, not the 31 of a 50 ms poll
    assert 5 <= broker.looks <= 7


def test_a_failed_look_keeps_waiting_and_a_later_one_finds_the_outcome() -> None:
    broker = Broker([{"status": "queued"}, RedisConnectionError("down"), {"status": "done", "result": "{}"}])
    n = notifier(broker)
    fields = asyncio.run(n.wait("j", 5.0))
    assert fields == {"status": "done", "result": "{}"}
    assert n.fallbacks == 1


def test_a_notification_answers_at_once() -> None:
    broker = Broker([{"status": "queued"}])
    n = notifier(broker)

    async def scenario() -> dict[str, str] | None:
        waiting = asyncio.create_task(n.wait("j", 5.0))
        await asyncio.sleep(0.01)
        for future in n.waiters["j"]:
            future.set_result({"status": "done"})
        return await waiting

    assert asyncio.run(scenario()) == {"status": "done"}
    assert broker.looks == 1 and n.fallbacks == 0
