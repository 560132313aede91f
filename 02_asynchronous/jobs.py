"""The job queue in Redis: what a job is, where it lives, and every way it moves.

Keys (every job key expires `job_ttl` seconds after it is written):

    job:{id}:status        pending | processing | completed | failed | cancelled
    job:{id}:data          the input rows (JSON)
    job:{id}:result        one {prediction, class_name, probabilities} per row (JSON)
    job:{id}:error         why a job failed
    job:{id}:submitted     when it was submitted (us, by Redis's clock); gone once it is final
    queue:predict          List of pending ids. The head is the RIGHT end: workers take from
                           there, normal jobs join at the left, "high" jobs and requeued jobs
                           jump to the right (so among high jobs the newest goes first).
    queue:predict:processing  List of ids a worker has claimed and not finished
    queue:predict:claimed     Sorted set: id -> when it was claimed (ms), for the reaper
    queue:predict:holder      Hash: id -> the token of its current claim; only the worker with
                              that token may finish the job or give it back
    queue:predict:attempts    Hash: id -> claims not ended cleanly (its worker died or hung)
    jobs:recent               Sorted set: id -> when it was submitted (ms), for GET /jobs; the
                              newest MAX_RECENT only

Submit and finish both read the time with Redis's TIME, inside their scripts: the latency
FINISH returns (submit to completed) needs no agreement between the proxy's and the workers'
clocks.

Every change that touches more than one key is a Lua script, so it happens all at once: a job
is never queued without its data, never finished by a worker that no longer holds it, never
lost between two commands. Every script that moves a job refreshes the TTL of its status and
data together, so a job that waits long never loses its data while it is still queued. The
scripts build `job:{id}:*` keys from ids, which is fine on one Redis server (not on Redis
Cluster).
"""

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from redis.asyncio import Redis

MAX_ROWS = 1000
FEATURES = 4  # sepal length, sepal width, petal length, petal width (cm)
MAX_RECENT = 10_000  # ids kept in jobs:recent for GET /jobs; older ones drop off the list


class JobStatus(StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class InvalidInput(ValueError):
    """The rows are not 1..1000 rows of 4 finite numbers in (0, 10)."""


def validate_rows(data: Any) -> list[list[float]]:
    """Return the rows as floats, or raise InvalidInput naming the first problem."""
    if type(data) is not list or not data:
        raise InvalidInput("data must be a non-empty list of rows")
    if len(data) > MAX_ROWS:
        raise InvalidInput(f"data has {len(data)} rows; at most {MAX_ROWS} are allowed")
    for i, row in enumerate(data):
        if type(row) is not list or len(row) != FEATURES:
            raise InvalidInput(f"data[{i}] must be a list of exactly {FEATURES} numbers")
        for j, value in enumerate(row):
            # type(), not isinstance(): True is an int to Python, but it is not a measurement.
            if type(value) not in (int, float):
                raise InvalidInput(f"data[{i}][{j}] must be a number, got {value!r}")
            if not 0 < value < 10:  # also false for NaN and the infinities
                raise InvalidInput(f"data[{i}][{j}] must be in (0, 10), got {value!r}")
    return [[float(v) for v in row] for row in data]


def new_job_id() -> str:
    # 40 random bits: short to type, and a collision is still refused by SUBMIT below.
    return secrets.token_hex(5)


_SUBMIT = """
-- KEYS: status, data, queue, recent, submitted   ARGV: id, rows, ttl, priority, max queue,
-- max recent
-- Returns 1: queued, 0: id taken by another job, -1: queue full.
if redis.call('EXISTS', KEYS[1]) == 1 then
  -- Same id and same rows: redis-py retried this very call after its answer was lost, and the
  -- first attempt went through. That job is ours; anything else is a collision.
  if redis.call('GET', KEYS[2]) == ARGV[2] then return 1 end
  return 0  -- never overwrite
end
if redis.call('LLEN', KEYS[3]) >= tonumber(ARGV[5]) then return -1 end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ttl = tonumber(ARGV[3])
redis.call('SET', KEYS[2], ARGV[2], 'EX', ttl)
redis.call('SET', KEYS[1], 'pending', 'EX', ttl)
redis.call('SET', KEYS[5], t[1] .. string.format('%06d', t[2]), 'EX', ttl)  -- us
if ARGV[4] == 'high' then
  redis.call('RPUSH', KEYS[3], ARGV[1])
else
  redis.call('LPUSH', KEYS[3], ARGV[1])
end
redis.call('ZADD', KEYS[4], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - ttl * 1000)
redis.call('ZREMRANGEBYRANK', KEYS[4], 0, -tonumber(ARGV[6]) - 1)
redis.call('EXPIRE', KEYS[4], ttl)
return 1
"""

_CLAIM = """
-- The worker has moved ARGV[1] into processing with BLMOVE; take up to ARGV[2] more at once,
-- each under this claim's token.
-- KEYS: queue, processing, claimed, holder, attempts   ARGV: first id, how many more, ttl,
-- token, max claims. Returns how many it gave up (failed), then id, data, id, data...
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ids = {}
-- The worker may have stalled since its BLMOVE, long enough for the reaper to hand the job to
-- someone else: take it only if it is still in processing and nobody holds it.
if redis.call('LPOS', KEYS[2], ARGV[1]) and redis.call('HEXISTS', KEYS[4], ARGV[1]) == 0 then
  ids[1] = ARGV[1]
end
for _ = 1, tonumber(ARGV[2]) do
  local id = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT')
  if not id then break end
  ids[#ids + 1] = id
end
local out = {0}
for _, id in ipairs(ids) do
  local job = 'job:' .. id .. ':'
  local data = redis.call('GET', job .. 'data')
  local claims = redis.call('HINCRBY', KEYS[5], id, 1)
  local why
  if not data then
    why = 'job data expired before a worker took it'
  elseif claims > tonumber(ARGV[5]) then
    why = 'given up: ' .. (claims - 1) .. ' workers died or hung while holding it'
  end
  if why then
    redis.call('LREM', KEYS[2], 1, id)
    redis.call('ZREM', KEYS[3], id)
    redis.call('HDEL', KEYS[5], id)
    redis.call('DEL', job .. 'submitted')
    if redis.call('GET', job .. 'status') ~= 'cancelled' then
      redis.call('SET', job .. 'error', why, 'EX', ARGV[3])
      redis.call('SET', job .. 'status', 'failed', 'EX', ARGV[3])
      out[1] = out[1] + 1
    end
  else
    redis.call('ZADD', KEYS[3], now, id)
    redis.call('HSET', KEYS[4], id, ARGV[4])
    redis.call('SET', job .. 'status', 'processing', 'EX', ARGV[3])
    redis.call('EXPIRE', job .. 'data', ARGV[3])
    redis.call('EXPIRE', job .. 'submitted', ARGV[3])
    out[#out + 1] = id
    out[#out + 1] = data
  end
end
return out
"""

_FINISH = """
-- Store outcomes, but only for jobs still held under the caller's token (the reaper may have
-- given a slow job to someone else). KEYS: processing, claimed, holder, attempts
-- ARGV: ttl, then id, token, status, payload...
-- Returns, for each job stored: id, its claims, microseconds since its submit (-1: unknown).
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local out = {}
for i = 2, #ARGV, 4 do
  local id, job = ARGV[i], 'job:' .. ARGV[i] .. ':'
  if redis.call('HGET', KEYS[3], id) == ARGV[i + 1] then
    local submitted = redis.call('GET', job .. 'submitted')
    out[#out + 1] = id
    out[#out + 1] = tonumber(redis.call('HGET', KEYS[4], id) or '1')
    out[#out + 1] = submitted and now - tonumber(submitted) or -1
    redis.call('LREM', KEYS[1], 1, id)
    redis.call('ZREM', KEYS[2], id)
    redis.call('HDEL', KEYS[3], id)
    redis.call('HDEL', KEYS[4], id)
    redis.call('DEL', job .. 'submitted')
    local field = ARGV[i + 2] == 'completed' and 'result' or 'error'
    redis.call('SET', job .. field, ARGV[i + 3], 'EX', ARGV[1])
    redis.call('SET', job .. 'status', ARGV[i + 2], 'EX', ARGV[1])
    redis.call('EXPIRE', job .. 'data', ARGV[1])
  end
end
return out
"""

# Prepended to REQUEUE and REAP. KEYS: queue, processing, claimed, holder, attempts.
_GIVE_BACK = """
local function give_back(id, ttl)  -- from processing to the head of the queue
  if redis.call('LREM', KEYS[2], 1, id) == 0 then return 0 end
  redis.call('ZREM', KEYS[3], id)
  redis.call('HDEL', KEYS[4], id)
  redis.call('RPUSH', KEYS[1], id)
  redis.call('SET', 'job:' .. id .. ':status', 'pending', 'EX', ttl)
  redis.call('EXPIRE', 'job:' .. id .. ':data', ttl)
  redis.call('EXPIRE', 'job:' .. id .. ':submitted', ttl)
  return 1
end
"""

_REQUEUE = """
-- The holder puts jobs back (TF Serving down, or stopping), the first claimed frontmost. A
-- clean give-back is not a failed attempt. ARGV: ttl, then id, token... in claim order
local n = 0
for i = #ARGV - 1, 2, -2 do
  local id = ARGV[i]
  if redis.call('HGET', KEYS[4], id) == ARGV[i + 1] then
    n = n + give_back(id, ARGV[1])
    redis.call('HINCRBY', KEYS[5], id, -1)
  end
end
return n
"""

_REAP = """
-- Jobs claimed longer than the visibility timeout go back: their worker died or hung (the
-- attempt counts). A job seen without a claim time (its worker died between BLMOVE and CLAIM)
-- gets one now. ARGV: timeout ms, ttl
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local n = 0
for _, id in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
  local since = redis.call('ZSCORE', KEYS[3], id)
  if not since then
    redis.call('ZADD', KEYS[3], now, id)
  elseif now - tonumber(since) > tonumber(ARGV[1]) then
    n = n + give_back(id, ARGV[2])
  end
end
return n
"""

_CANCEL = """
-- KEYS: status, data, queue, submitted   ARGV: id, ttl.
-- Returns the status after the call (nil: unknown).
local status = redis.call('GET', KEYS[1])
if status ~= 'pending' then return status end
-- Pending but no longer in the queue: a worker has just taken it.
if redis.call('LREM', KEYS[3], 1, ARGV[1]) == 0 then return 'processing' end
redis.call('DEL', KEYS[2], KEYS[4])
redis.call('SET', KEYS[1], 'cancelled', 'EX', ARGV[2])
return 'cancelled'
"""


def _iso(ms: float) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


class Batch(list):
    """What claim() returns: the (id, data) pairs taken, and how many jobs the CLAIM script
    failed instead (data expired, or MAX_CLAIMS reached): those are final too."""

    given_up = 0


@dataclass(frozen=True)
class Finished:
    """A job finish() stored: its final status, its claims, seconds since its submit."""

    job_id: str
    status: str
    claims: int
    latency: float | None  # None: submitted before its submit time was recorded


class IdCollision(RuntimeError):
    pass


class QueueFull(RuntimeError):
    """The queue holds max_queue jobs already: the caller should come back later."""


class JobStore:
    """All reads and writes of jobs, for the proxy and the worker alike."""

    def __init__(
        self,
        redis: Redis,
        queue: str = "queue:predict",
        ttl: int = 86400,
        new_id: Callable[[], str] = new_job_id,
        max_queue: int = 10_000,
        max_claims: int = 3,
        max_recent: int = MAX_RECENT,
    ):
        self.redis = redis
        self.queue = queue
        self.processing = f"{queue}:processing"
        self.claimed = f"{queue}:claimed"
        self.holder = f"{queue}:holder"
        self.attempts = f"{queue}:attempts"
        self.recent = "jobs:recent"
        self.ttl = ttl
        self.new_id = new_id
        self.max_queue = max_queue
        self.max_claims = max_claims
        self.max_recent = max_recent
        self.tokens: dict[str, str] = {}  # job id -> token of this store's claim on it
        self._submit = redis.register_script(_SUBMIT)
        self._claim = redis.register_script(_CLAIM)
        self._finish = redis.register_script(_FINISH)
        self._requeue = redis.register_script(_GIVE_BACK + _REQUEUE)
        self._reap = redis.register_script(_GIVE_BACK + _REAP)
        self._cancel = redis.register_script(_CANCEL)

    @staticmethod
    def key(job_id: str, field: str) -> str:
        return f"job:{job_id}:{field}"

    # --- the proxy's side -------------------------------------------------------------------

    async def submit(self, rows: list[list[float]], priority: str = "normal") -> str:
        data = json.dumps(rows)
        for _ in range(5):
            # The id is drawn before the first attempt: a retry of the same call (redis-py
            # retries once on a timeout) finds its own job instead of queueing a second one.
            job_id = self.new_id()
            keys = [
                self.key(job_id, "status"),
                self.key(job_id, "data"),
                self.queue,
                self.recent,
                self.key(job_id, "submitted"),
            ]
            args: list[str | int] = [
                job_id,
                data,
                self.ttl,
                priority,
                self.max_queue,
                self.max_recent,
            ]
            done = await self._submit(keys=keys, args=args)
            if done == 1:
                return job_id
            if done == -1:
                raise QueueFull(f"the queue holds {self.max_queue} jobs")
        raise IdCollision("could not find a free job id in 5 tries")

    async def get(self, job_id: str) -> dict | None:
        status, result, error = await self.redis.mget(
            [self.key(job_id, f) for f in ("status", "result", "error")]
        )
        if status is None:
            return None
        job: dict[str, Any] = {"job_id": job_id, "status": status}
        if status == JobStatus.COMPLETED:
            assert result is not None  # FINISH sets the result with the status, the same TTL
            job["result"] = json.loads(result)
        elif status == JobStatus.FAILED:
            job["error"] = error
        return job

    async def cancel(self, job_id: str) -> str | None:
        keys = [
            self.key(job_id, "status"),
            self.key(job_id, "data"),
            self.queue,
            self.key(job_id, "submitted"),
        ]
        status: str | None = await self._cancel(keys=keys, args=[job_id, self.ttl])
        return status

    async def recent_jobs(self, offset: int, limit: int) -> tuple[int, list[dict]]:
        """Newest first. Ids whose keys have expired are left out."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(self.recent)
            pipe.zrevrange(self.recent, offset, offset + limit - 1, withscores=True)
            total, page = await pipe.execute()
        if not page:
            return total, []
        statuses = await self.redis.mget([self.key(job_id, "status") for job_id, _ in page])
        jobs = [
            {"job_id": job_id, "status": status, "submitted_at": _iso(ms)}
            for (job_id, ms), status in zip(page, statuses, strict=True)
            if status is not None
        ]
        return total, jobs

    async def queue_length(self) -> int:
        return await self.redis.llen(self.queue)

    async def queue_lengths(self) -> tuple[int, int]:
        """(waiting, claimed): jobs in the queue, and jobs workers hold."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.llen(self.queue)
            pipe.llen(self.processing)
            waiting, claimed = await pipe.execute()
        return waiting, claimed

    # --- the worker's side ------------------------------------------------------------------

    async def claim(self, batch_size: int, block: float) -> Batch:
        """Wait up to `block` seconds for a job; return up to batch_size (id, data) pairs."""
        first = await self.redis.blmove(
            self.queue,
            self.processing,
            block,  # type: ignore[arg-type]  # Redis >= 6 takes fractional seconds; the hint: int
            "RIGHT",
            "LEFT",
        )
        if first is None:
            return Batch()
        token = secrets.token_hex(8)  # this claim's, and nobody else's
        keys = [self.queue, self.processing, self.claimed, self.holder, self.attempts]
        args = [first, batch_size - 1, self.ttl, token, self.max_claims]
        given_up, *flat = await self._claim(keys=keys, args=args)
        batch = Batch(zip(flat[::2], flat[1::2], strict=True))
        batch.given_up = given_up
        self.tokens.update((job_id, token) for job_id, _ in batch)
        return batch

    async def finish(self, outcomes: list[tuple[str, JobStatus, str]]) -> list[Finished]:
        """Store (id, COMPLETED|FAILED, result or error) for jobs still held; return those."""
        args: list = [self.ttl]
        statuses = {}
        for job_id, status, payload in outcomes:
            args += [job_id, self.tokens.pop(job_id, ""), str(status), payload]
            statuses[job_id] = str(status)
        keys = [self.processing, self.claimed, self.holder, self.attempts]
        flat = await self._finish(keys=keys, args=args)
        return [
            Finished(job_id, statuses[job_id], claims, us / 1e6 if us >= 0 else None)
            for job_id, claims, us in zip(flat[::3], flat[1::3], flat[2::3], strict=True)
        ]

    async def requeue(self, job_ids: list[str]) -> int:
        """Give back jobs this store still holds, to the head of the queue; return how many."""
        args: list = [self.ttl]
        for job_id in job_ids:
            args += [job_id, self.tokens.pop(job_id, "")]
        keys = [self.queue, self.processing, self.claimed, self.holder, self.attempts]
        given_back: int = await self._requeue(keys=keys, args=args)
        return given_back

    async def reap(self, visibility_timeout: float) -> int:
        keys = [self.queue, self.processing, self.claimed, self.holder, self.attempts]
        reaped: int = await self._reap(keys=keys, args=[int(visibility_timeout * 1000), self.ttl])
        return reaped
