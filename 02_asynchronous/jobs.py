"""The job queue in Redis: what a job is, where it lives, and every way it moves.

Keys (every job key expires `job_ttl` seconds after it is written):

    job:{id}:status        pending | processing | completed | failed | cancelled
    job:{id}:data          the input rows (JSON)
    job:{id}:result        one {prediction, class_name, probabilities} per row (JSON)
    job:{id}:error         why a job failed
    queue:predict          List of pending ids. The head is the RIGHT end: workers take from
                           there, normal jobs join at the left, "high" jobs and requeued jobs
                           jump to the right (so among high jobs the newest goes first).
    queue:predict:processing  List of ids a worker has claimed and not finished
    queue:predict:claimed     Sorted set: id -> when it was claimed (ms), for the reaper
    jobs:recent               Sorted set: id -> when it was submitted (ms), for GET /jobs

Every change that touches more than one key is a Lua script, so it happens all at once: a job
is never queued without its data, never finished while another worker holds it, never lost
between two commands. The scripts build `job:{id}:*` keys from ids, which is fine on one Redis
server (not on Redis Cluster).
"""

import json
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from redis.asyncio import Redis

MAX_ROWS = 1000
FEATURES = 4  # sepal length, sepal width, petal length, petal width (cm)


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
-- KEYS: status, data, queue, recent   ARGV: id, rows, ttl, priority
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end  -- id taken: never overwrite
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ttl = tonumber(ARGV[3])
redis.call('SET', KEYS[2], ARGV[2], 'EX', ttl)
redis.call('SET', KEYS[1], 'pending', 'EX', ttl)
if ARGV[4] == 'high' then
  redis.call('RPUSH', KEYS[3], ARGV[1])
else
  redis.call('LPUSH', KEYS[3], ARGV[1])
end
redis.call('ZADD', KEYS[4], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - ttl * 1000)
redis.call('EXPIRE', KEYS[4], ttl)
return 1
"""

_CLAIM = """
-- The worker has moved ARGV[1] into processing with BLMOVE; take up to ARGV[2] more at once.
-- KEYS: queue, processing, claimed   ARGV: first id, how many more, ttl
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ids = {ARGV[1]}
for _ = 1, tonumber(ARGV[2]) do
  local id = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT')
  if not id then break end
  ids[#ids + 1] = id
end
local out = {}
for _, id in ipairs(ids) do
  local data = redis.call('GET', 'job:' .. id .. ':data')
  if data then
    redis.call('ZADD', KEYS[3], now, id)
    redis.call('SET', 'job:' .. id .. ':status', 'processing', 'EX', ARGV[3])
    out[#out + 1] = id
    out[#out + 1] = data
  else  -- expired or cancelled: nothing to do
    redis.call('LREM', KEYS[2], 1, id)
  end
end
return out
"""

_FINISH = """
-- Store outcomes, but only for jobs this worker still holds (the reaper may have given a
-- slow job to someone else). KEYS: processing, claimed   ARGV: ttl, then id, status, payload...
local n = 0
for i = 2, #ARGV, 3 do
  local id = ARGV[i]
  if redis.call('LREM', KEYS[1], 1, id) > 0 then
    redis.call('ZREM', KEYS[2], id)
    local field = ARGV[i + 1] == 'completed' and ':result' or ':error'
    redis.call('SET', 'job:' .. id .. field, ARGV[i + 2], 'EX', ARGV[1])
    redis.call('SET', 'job:' .. id .. ':status', ARGV[i + 1], 'EX', ARGV[1])
    n = n + 1
  end
end
return n
"""

# Prepended to REQUEUE and REAP. KEYS: queue, processing, claimed.
_GIVE_BACK = """
local function give_back(id, ttl)  -- from processing to the head of the queue
  if redis.call('LREM', KEYS[2], 1, id) == 0 then return 0 end
  redis.call('ZREM', KEYS[3], id)
  redis.call('RPUSH', KEYS[1], id)
  redis.call('SET', 'job:' .. id .. ':status', 'pending', 'EX', ttl)
  return 1
end
"""

_REQUEUE = """
-- Put held jobs back, the first claimed frontmost.   ARGV: ttl, ids in claim order
local n = 0
for i = #ARGV, 2, -1 do n = n + give_back(ARGV[i], ARGV[1]) end
return n
"""

_REAP = """
-- Jobs claimed longer than the visibility timeout go back: their worker died or hung. A job
-- seen without a claim time (its worker died between BLMOVE and CLAIM) gets one now.
-- ARGV: timeout ms, ttl
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
-- KEYS: status, data, queue   ARGV: id, ttl. Returns the status after the call (nil: unknown).
local status = redis.call('GET', KEYS[1])
if status ~= 'pending' then return status end
-- Pending but no longer in the queue: a worker has just taken it.
if redis.call('LREM', KEYS[3], 1, ARGV[1]) == 0 then return 'processing' end
redis.call('DEL', KEYS[2])
redis.call('SET', KEYS[1], 'cancelled', 'EX', ARGV[2])
return 'cancelled'
"""


def _iso(ms: float) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


class IdCollision(RuntimeError):
    pass


class JobStore:
    """All reads and writes of jobs, for the proxy and the worker alike."""

    def __init__(
        self,
        redis: Redis,
        queue: str = "queue:predict",
        ttl: int = 86400,
        new_id: Callable[[], str] = new_job_id,
    ):
        self.redis = redis
        self.queue = queue
        self.processing = f"{queue}:processing"
        self.claimed = f"{queue}:claimed"
        self.recent = "jobs:recent"
        self.ttl = ttl
        self.new_id = new_id
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
            job_id = self.new_id()
            keys = [self.key(job_id, "status"), self.key(job_id, "data"), self.queue, self.recent]
            if await self._submit(keys=keys, args=[job_id, data, self.ttl, priority]):
                return job_id
        raise IdCollision("could not find a free job id in 5 tries")

    async def get(self, job_id: str) -> dict | None:
        status, result, error = await self.redis.mget(
            [self.key(job_id, f) for f in ("status", "result", "error")]
        )
        if status is None:
            return None
        job = {"job_id": job_id, "status": status}
        if status == JobStatus.COMPLETED:
            job["result"] = json.loads(result)
        elif status == JobStatus.FAILED:
            job["error"] = error
        return job

    async def cancel(self, job_id: str) -> str | None:
        keys = [self.key(job_id, "status"), self.key(job_id, "data"), self.queue]
        return await self._cancel(keys=keys, args=[job_id, self.ttl])

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

    # --- the worker's side ------------------------------------------------------------------

    async def claim(self, batch_size: int, block: float) -> list[tuple[str, str]]:
        """Wait up to `block` seconds for a job; return up to batch_size (id, data) pairs."""
        first = await self.redis.blmove(self.queue, self.processing, block, "RIGHT", "LEFT")
        if first is None:
            return []
        flat = await self._claim(
            keys=[self.queue, self.processing, self.claimed], args=[first, batch_size - 1, self.ttl]
        )
        return list(zip(flat[::2], flat[1::2], strict=True))

    async def finish(self, outcomes: list[tuple[str, JobStatus, str]]) -> int:
        """Store (id, COMPLETED|FAILED, result or error) for jobs still held; return how many."""
        args: list = [self.ttl]
        for job_id, status, payload in outcomes:
            args += [job_id, str(status), payload]
        return await self._finish(keys=[self.processing, self.claimed], args=args)

    async def requeue(self, job_ids: list[str]) -> int:
        keys = [self.queue, self.processing, self.claimed]
        return await self._requeue(keys=keys, args=[self.ttl, *job_ids])

    async def reap(self, visibility_timeout: float) -> int:
        keys = [self.queue, self.processing, self.claimed]
        return await self._reap(keys=keys, args=[int(visibility_timeout * 1000), self.ttl])
