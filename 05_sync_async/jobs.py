"""The job layout in Redis and every operation on it: the proxy's and the worker's side.

    queue:jobs             List    job ids waiting; LPUSH by the proxy, popped from the right
    queue:jobs:processing  List    job ids a worker has claimed (BLMOVE) and not yet finished
    queue:jobs:claims      ZSet    job id -> deadline; a claim past it is handed out again
    queue:jobs:attempts    Hash    job id -> number of claims, to stop retrying a poison job
    submit:{id}            Hash    token: the submission that took the id; at: when (TTL 1 h)
    image:{id}             String  the uploaded image bytes (TTL 1 h), deleted once answered
    result:{id}            String  JSON {"status", "prediction", "top5", ...} (TTL 1 h)

A job is never lost: it is always in exactly one of the two lists until its result is written
(one transaction writes the result and takes it off `processing`). If a worker dies holding it,
the reaper moves it back to the queue once its claim deadline has passed.
"""

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, NotRequired, TypedDict

from redis import Redis
from redis.asyncio import Redis as AsyncRedis

if TYPE_CHECKING:  # only the type: this module needs no model code
    from classifier import Guess

ID_BYTES = 3  # six hex characters, as specified; uniqueness comes from SUBMIT, not from luck


class JobStatus(StrEnum):
    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    COMPLETE = "complete"
    FAILED = "failed"
    NOT_FOUND = "not_found"


class Result(TypedDict):
    """What result:{id} holds, and what GET /job/{id} answers for the job."""

    status: str  # a JobStatus
    prediction: str  # "" unless complete
    top5: NotRequired[list["Guess"]]  # complete
    model: NotRequired[str]  # complete
    error: NotRequired[str]  # failed


@dataclass(frozen=True)
class Keys:
    queue: str = "queue:jobs"

    @property
    def processing(self) -> str:
        return f"{self.queue}:processing"

    @property
    def claims(self) -> str:
        return f"{self.queue}:claims"

    @property
    def attempts(self) -> str:
        return f"{self.queue}:attempts"

    @staticmethod
    def submitted(job_id: str) -> str:
        return f"submit:{job_id}"

    @staticmethod
    def image(job_id: str) -> str:
        return f"image:{job_id}"

    @staticmethod
    def result(job_id: str) -> str:
        return f"result:{job_id}"


# Reserve the id and enqueue in one atomic step: an id is refused while its submission or its
# result still exists, so two live jobs never share an id, and no image is ever stored without its
# job. Idempotent: a retried call (same id, same token) whose first run did happen, but whose reply
# was lost, finds its own token and answers 1 again instead of queueing a second job. A queue
# already `max_queue_length` long refuses the job (-1): the worker is that far behind. The submit
# time travels with the job, by Redis's clock, which also stamps its result: the latency metric
# then needs no agreement between the proxy's and the worker's clocks.
SUBMIT = """
local owner = redis.call('HGET', KEYS[1], 'token')
if owner then return owner == ARGV[1] and 1 or 0 end
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
if redis.call('LLEN', KEYS[4]) >= tonumber(ARGV[5]) then return -1 end
local now = redis.call('TIME')
redis.call('HSET', KEYS[1], 'token', ARGV[1], 'at', now[1] .. '.' .. string.format('%06d', now[2]))
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
redis.call('LPUSH', KEYS[4], ARGV[4])
return 1
"""

# The reaper. A claim gets its deadline the first time the reaper sees it (so a worker that dies
# between BLMOVE and anything else is still covered); an expired claim goes back to the head of
# the queue. Atomic, so several reapers (one per worker host) can run side by side, and each
# requeued job is returned by exactly one of them: the reaped-jobs metric counts it once.
REAP = """
local now, timeout = tonumber(ARGV[1]), tonumber(ARGV[2])
for _, id in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
  redis.call('ZADD', KEYS[3], 'NX', now + timeout, id)
end
local requeued = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do
  redis.call('ZREM', KEYS[3], id)
  if redis.call('LREM', KEYS[2], 1, id) == 1 then
    redis.call('RPUSH', KEYS[1], id)
    table.insert(requeued, id)
  end
end
return requeued
"""


class QueueFull(Exception):
    """The queue holds `max_queue_length` jobs already; nothing was stored."""


def new_job_id() -> str:
    return secrets.token_hex(ID_BYTES)


# --- the proxy's side (redis.asyncio) -------------------------------------------------------


async def submit(
    redis: AsyncRedis,
    keys: Keys,
    image: bytes,
    ttl: int,
    max_queue_length: int,
    new_id: Callable[[], str] = new_job_id,
) -> str:
    """Store the image and queue its job; returns the new job id, or raises QueueFull.

    Safe to retry (redis-py retries a command whose connection failed): the id and the token are
    chosen before the first attempt, and only a taken id (another submission's) draws a new one.
    """
    script = redis.register_script(SUBMIT)
    token = secrets.token_hex(8)
    while True:
        job_id = new_id()
        keys_ = [keys.submitted(job_id), keys.image(job_id), keys.result(job_id), keys.queue]
        queued = await script(keys=keys_, args=[token, image, ttl, job_id, max_queue_length])
        if queued == -1:
            raise QueueFull
        if queued:
            return job_id


async def lookup(redis: AsyncRedis, keys: Keys, job_id: str) -> Result:
    """The job's state as {"status", "prediction", ...}; "prediction" is "" until complete."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.get(keys.result(job_id))
        pipe.exists(keys.image(job_id))
        pipe.lpos(keys.processing, job_id)
        result, has_image, position = await pipe.execute()
    if result is not None:
        stored: Result = json.loads(result)  # as the worker wrote it (finish)
        return stored
    if has_image:
        status = JobStatus.QUEUED if position is None else JobStatus.IN_PROGRESS
        return {"status": status, "prediction": ""}
    return {"status": JobStatus.NOT_FOUND, "prediction": ""}


# --- the worker's side (redis, blocking) ----------------------------------------------------


def claim(redis: Redis, keys: Keys, timeout: int) -> str | None:
    """Wait up to `timeout` s for a job; it moves to `processing` in the same atomic step."""
    job_id = redis.blmove(keys.queue, keys.processing, timeout, "RIGHT", "LEFT")
    return job_id.decode() if isinstance(job_id, bytes) else job_id  # bytes: no decode_responses


@dataclass(frozen=True)
class Claimed:
    image: bytes | None  # None once expired
    attempts: int  # claims so far, this one included
    submitted_at: float | None  # Redis's clock, seconds; None for a job not queued by `submit`


def start(redis: Redis, keys: Keys, job_id: str) -> Claimed:
    """The job's image, how many times it has been claimed, and when it was submitted."""
    with redis.pipeline(transaction=False) as pipe:
        pipe.get(keys.image(job_id))
        pipe.hincrby(keys.attempts, job_id, 1)
        pipe.hget(keys.submitted(job_id), "at")
        image, attempts, at = pipe.execute()
    return Claimed(image, attempts, float(at) if at is not None else None)


def finish(redis: Redis, keys: Keys, job_id: str, result: Result, ttl: int) -> float | None:
    """Write the result and release the job, all or nothing. Returns when the result was written
    (Redis's clock, seconds), or None if the job had an answer already.

    The first answer wins (NX): a job can run twice when its claim expired while its worker was
    merely slow, and the second run, finding the image gone, must not overwrite a good answer.
    """
    with redis.pipeline(transaction=True) as pipe:
        pipe.set(keys.result(job_id), json.dumps(result), ex=ttl, nx=True)
        pipe.delete(keys.image(job_id))
        pipe.lrem(keys.processing, 1, job_id)
        pipe.zrem(keys.claims, job_id)
        pipe.hdel(keys.attempts, job_id)
        pipe.time()
        written, *_, (seconds, microseconds) = pipe.execute()
    return seconds + microseconds / 1e6 if written else None


def reap(redis: Redis, keys: Keys, now: float, visibility_timeout: float) -> list[str]:
    """Requeue the jobs whose claim has expired; returns their ids."""
    expired = redis.register_script(REAP)(
        keys=[keys.queue, keys.processing, keys.claims], args=[now, visibility_timeout]
    )
    return [job_id.decode() for job_id in expired]
