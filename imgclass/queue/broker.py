"""Jobs on Redis Streams: the keys, and the few atomic steps (Lua scripts) every front and worker shares.

One stream holds the jobs waiting or in work; a consumer group `workers` hands each entry to one
worker at a time. Each job has a hash (status, timestamps, worker, result), and its image is
stored once, under its own key, until the job is done. Every change that must be all or nothing
is one Lua script, run by Redis as one step:
- enqueue: refuse past the queue bound, else store the image, create the job hash (only if the id
  is new) and add the stream entry, so no job exists without its entry or its image;
- start: mark a delivered job running, unless a result already exists (then it is skipped);
- finish: write the result once (only if none exists), notify, acknowledge and delete the entry,
  delete the image; a second worker finishing the same job changes nothing;
- fail: the same for a job that failed or was delivered too often, which is also dead-lettered.
Entries are deleted only once acknowledged: no MAXLEN can drop a job that nobody has read.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis
from redis.exceptions import NoScriptError, RedisError

from ..errors import ServiceError

GROUP = "workers"


class BrokerUnavailable(ServiceError):
    """Redis cannot be reached: the front answers 503 at once instead of waiting."""

    status = 503
    code = "queue_unavailable"


@dataclass(frozen=True)
class Keys:
    """Every Redis key of one deployment, under one prefix."""

    prefix: str = "imgclass"

    @property
    def jobs(self) -> str:
        return f"{self.prefix}:jobs"

    @property
    def done(self) -> str:
        return f"{self.prefix}:done"  # notifications only; results live in the job hashes

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"

    @property
    def stats(self) -> str:
        return f"{self.prefix}:stats"

    @property
    def labels(self) -> str:
        return f"{self.prefix}:labels"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def image(self, job_id: str) -> str:
        return f"{self.prefix}:image:{job_id}"

    def worker(self, name: str) -> str:
        return f"{self.prefix}:worker:{name}"

    @property
    def worker_pattern(self) -> str:
        return f"{self.prefix}:worker:*"


# KEYS: jobs stream, job hash, image, stats. ARGV: id, image, created, top, max queue, image ttl, request id.
# Returns 1 (queued), 0 (the queue is full), -1 (the id exists already).
_ENQUEUE = """
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
if tonumber(ARGV[5]) > 0 and redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[5]) then return 0 end
redis.call('SET', KEYS[3], ARGV[2], 'EX', ARGV[6])
redis.call('HSET', KEYS[2], 'id', ARGV[1], 'status', 'queued', 'created', ARGV[3], 'top', ARGV[4],
           'request_id', ARGV[7])
redis.call('XADD', KEYS[1], '*', 'id', ARGV[1])
redis.call('HINCRBY', KEYS[4], 'enqueued', 1)
return 1
"""

# KEYS: job hash, image. ARGV: worker, started. Returns {the job's fields (deliveries counted), its
# image}, or nothing if it has an outcome already (a job finished by another worker is skipped).
_START = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == false or status == 'done' or status == 'failed' then return {} end
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1], 'started', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'deliveries', 1)
return {redis.call('HGETALL', KEYS[1]), redis.call('GET', KEYS[2])}
"""

# KEYS: jobs stream, job hash, image, done stream, dead stream, stats.
# ARGV: entry id, group, status (done|failed), field (result|error), value, worker, finished, ttl,
#       job id, dead-letter (1|0), done stream length.
# Returns 1 if this call wrote the outcome, 0 if one existed (then only the entry is cleaned up).
_FINISH = """
local status = redis.call('HGET', KEYS[2], 'status')
local wrote = 0
if status ~= false and status ~= 'done' and status ~= 'failed' then
  redis.call('HSET', KEYS[2], 'status', ARGV[3], ARGV[4], ARGV[5], 'worker', ARGV[6], 'finished', ARGV[7])
  if tonumber(ARGV[8]) > 0 then redis.call('EXPIRE', KEYS[2], ARGV[8]) end
  -- the notification carries the whole outcome, 'started' too: a waiter may have looked at the job
  -- while it was still queued, and merges only what the notification brings
  local started = redis.call('HGET', KEYS[2], 'started') or ARGV[7]
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[11], '*', 'id', ARGV[9], 'status', ARGV[3], ARGV[4], ARGV[5],
            'worker', ARGV[6], 'started', started, 'finished', ARGV[7])
  if ARGV[10] == '1' then
    redis.call('XADD', KEYS[5], '*', 'id', ARGV[9], 'error', ARGV[5], 'worker', ARGV[6])
    redis.call('HINCRBY', KEYS[6], 'dead_lettered', 1)
  end
  redis.call('HINCRBY', KEYS[6], 'finished', 1)
  wrote = 1
end
redis.call('DEL', KEYS[3])
redis.call('XACK', KEYS[1], ARGV[2], ARGV[1])
redis.call('XDEL', KEYS[1], ARGV[1])
return wrote
"""


@dataclass(frozen=True)
class Outcome:
    """What a worker writes for one job: its result, or its error (code, message, HTTP status)."""

    entry: str
    job_id: str
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    dead_letter: bool = False


def client(url: str, *, timeout: float | None = 2.0) -> redis.Redis:
    """A Redis client that fails fast: a down Redis costs a request a second at most, never a hang."""
    return redis.Redis.from_url(
        url, socket_connect_timeout=min(1.0, timeout or 1.0), socket_timeout=timeout, health_check_interval=10,
        retry_on_timeout=False,
    )  # fmt: skip


class Broker:
    """The atomic steps on one Redis, for fronts and workers alike."""

    def __init__(self, redis_client: redis.Redis, keys: Keys | None = None, done_maxlen: int = 20_000) -> None:
        self.redis = redis_client
        self.keys = keys or Keys()
        self.done_maxlen = done_maxlen  # notifications carry the outcome: a few MB of them at most
        self._enqueue = redis_client.register_script(_ENQUEUE)
        self._start = redis_client.register_script(_START)
        self._finish = redis_client.register_script(_FINISH)

    async def _pipelined(self, script: Any, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """Many calls of one script in one round trip, by its SHA. (redis-py's pipeline asks Redis
        whether the script exists before every run: a second round trip each time.)"""
        for attempt in range(2):
            async with self.redis.pipeline(transaction=False) as pipe:
                for keys, args in calls:
                    pipe.evalsha(script.sha, len(keys), *keys, *args)
                try:
                    return await pipe.execute()
                except NoScriptError:
                    if attempt:
                        raise
                    await self.redis.script_load(script.script)  # Redis restarted: its script cache is empty
        raise AssertionError("unreachable")

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.keys.jobs, GROUP, id="0", mkstream=True)
        except RedisError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def enqueue(
        self, job_id: str, image: bytes, top: int, max_queue: int, image_ttl: int, request_id: str
    ) -> int:
        k = self.keys
        return int(
            await self._enqueue(
                keys=[k.jobs, k.job(job_id), k.image(job_id), k.stats],
                args=[job_id, image, repr(time.time()), top, max_queue, max(1, image_ttl), request_id],
            )
        )

    async def start(self, job_ids: list[str], worker: str) -> list[tuple[dict[str, str], bytes | None] | None]:
        """Mark delivered jobs running, in one round trip: for each, its fields (deliveries counted)
        and its image, or None to skip it (it has an outcome)."""
        now = repr(time.time())
        replies = await self._pipelined(
            self._start, [([self.keys.job(job_id), self.keys.image(job_id)], [worker, now]) for job_id in job_ids]
        )
        out: list[tuple[dict[str, str], bytes | None] | None] = []
        for reply in replies:
            if not reply:
                out.append(None)
                continue
            flat, image = reply
            out.append(({flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}, image or None))
        return out

    async def discard(self, entry: str) -> None:
        """Acknowledge and delete an entry whose job already has its outcome."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.keys.jobs, GROUP, entry)
            pipe.xdel(self.keys.jobs, entry)
            await pipe.execute()

    async def finish(self, outcomes: list[Outcome], worker: str, ttl: int = 0) -> list[bool]:
        """Write each outcome once (with its notification, then the acknowledgement), in one round
        trip; for each, whether this call wrote it (False: another worker had already)."""
        k, now = self.keys, repr(time.time())
        calls = []
        for o in outcomes:
            status, field, value = (("done", "result", json.dumps(o.result)) if o.error is None
                                    else ("failed", "error", json.dumps(o.error)))  # fmt: skip
            calls.append((
                [k.jobs, k.job(o.job_id), k.image(o.job_id), k.done, k.dead, k.stats],
                [o.entry, GROUP, status, field, value, worker, now, ttl, o.job_id, "1" if o.dead_letter else "0",
                 self.done_maxlen],
            ))  # fmt: skip
        return [bool(wrote) for wrote in await self._pipelined(self._finish, calls)]

    async def job(self, job_id: str) -> dict[str, str] | None:
        raw = await self.redis.hgetall(self.keys.job(job_id))
        if not raw:
            return None
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def image(self, job_id: str) -> bytes | None:
        return await self.redis.get(self.keys.image(job_id))

    async def count(self, field: str, by: int = 1) -> None:
        await self.redis.hincrby(self.keys.stats, field, by)

    async def stats(self) -> dict[str, int]:
        raw = await self.redis.hgetall(self.keys.stats)
        return {k.decode(): int(v) for k, v in raw.items()}

    async def depth(self) -> dict[str, int]:
        """Queue length, the group's lag (entries never delivered) and pending (delivered, unacknowledged)."""
        length = await self.redis.xlen(self.keys.jobs)
        lag = pending = 0
        for group in await self.redis.xinfo_groups(self.keys.jobs):
            if group["name"] in (GROUP, GROUP.encode()):
                lag = int(group.get("lag") or 0)
                pending = int(group.get("pending") or 0)
        return {"length": length, "lag": lag, "pending": pending}

    async def workers(self) -> list[dict[str, Any]]:
        """The live workers, from their heartbeat keys."""
        out = []
        async for key in self.redis.scan_iter(match=self.keys.worker_pattern, count=100):
            raw = await self.redis.get(key)
            if raw:
                try:
                    out.append(json.loads(raw))
                except ValueError:
                    continue
        return sorted(out, key=lambda w: str(w.get("name")))
