"""The Redis layout and its scripts, against the real Redis (database 2), no other process."""

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import redis
from conftest import REDIS_URL
from jobs import (
    Batch,
    Finished,
    IdCollision,
    InvalidInput,
    JobStatus,
    JobStore,
    QueueFull,
    new_job_id,
    validate_rows,
)
from redis.asyncio import Redis

ROW = [5.1, 3.5, 1.4, 0.2]
DAY = 86400


T = TypeVar("T")


def run(scenario: Callable[[JobStore], Awaitable[T]], **store_options: Any) -> T:
    """Run `scenario(store)` on a fresh asyncio client: each test is one asyncio.run."""

    async def main() -> T:
        redis = Redis.from_url(REDIS_URL, decode_responses=True)
        try:
            return await scenario(JobStore(redis, **store_options))
        finally:
            await redis.aclose()

    return asyncio.run(main())


def stored_json(db: redis.Redis, key: str) -> Any:
    value = db.get(key)
    assert value is not None, key
    return json.loads(value)


async def status_of(store: JobStore, job_id: str) -> str:
    job = await store.get(job_id)
    assert job is not None, job_id
    return str(job["status"])


@pytest.mark.parametrize(
    "data, message",
    [
        (None, "non-empty list"),
        ([], "non-empty list"),
        ([ROW] * 1001, "at most 1000"),
        ([[1, 2, 3]], "exactly 4"),
        ([[1, 2, 3, 4, 5]], "exactly 4"),
        ([ROW, "1,2,3,4"], "data[1] must be a list"),
        ([[1, 2, "3", 4]], "data[0][2] must be a number"),
        ([[1, 2, True, 4]], "data[0][2] must be a number"),
        ([[1, 2, None, 4]], "must be a number"),
        ([[1, 2, 0, 4]], "data[0][2] must be in (0, 10)"),
        ([[1, 2, -1.5, 4]], "in (0, 10)"),
        ([[1, 2, 10, 4]], "in (0, 10)"),
        ([[1, 2, float("nan"), 4]], "in (0, 10)"),
        ([[1, 2, float("inf"), 4]], "in (0, 10)"),
    ],
)
def test_invalid_rows_are_refused_with_the_problem_named(data: Any, message: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(message)):
        validate_rows(data)


def test_valid_rows_become_floats() -> None:
    assert validate_rows([[5, 3.5, 1.4, 0.2]] * 1000)[0] == [5.0, 3.5, 1.4, 0.2]


def test_every_job_key_expires_within_a_day(db: redis.Redis) -> None:
    async def scenario(store: JobStore) -> tuple[str, str]:
        done = await store.submit([ROW])
        failed = await store.submit([ROW])
        claimed = await store.claim(batch_size=10, block=1)
        assert [job_id for job_id, _ in claimed] == [done, failed]
        await store.finish([(done, JobStatus.COMPLETED, "[]"), (failed, JobStatus.FAILED, "x")])
        return done, failed

    done, failed = run(scenario)
    keys = [f"job:{done}:{k}" for k in ("status", "data", "result")]
    keys += [f"job:{failed}:{k}" for k in ("status", "data", "error")] + ["jobs:recent"]
    for key in keys:
        assert 0 < db.ttl(key) <= DAY, key
    assert {k for k in db.keys("job:*")} == set(keys) - {"jobs:recent"}


def test_an_id_collision_cannot_overwrite_a_job(db: redis.Redis) -> None:
    ids = iter(["abc", "abc", "def"])

    async def scenario(store: JobStore) -> tuple[str, str]:
        first = await store.submit([ROW])
        second = await store.submit([[6.0, 3.0, 4.8, 1.8]])  # draws "abc" again, then "def"
        return first, second

    assert run(scenario, new_id=lambda: next(ids)) == ("abc", "def")
    assert stored_json(db, "job:abc:data") == [ROW]

    async def always_taken(store: JobStore) -> None:
        await store.submit([[6.0, 3.0, 4.8, 1.8]])

    with pytest.raises(IdCollision):
        run(always_taken, new_id=lambda: "abc")
    assert stored_json(db, "job:abc:data") == [ROW]
    assert db.lrange("queue:predict", 0, -1) == ["def", "abc"]


def test_high_priority_jobs_are_taken_before_normal_ones(db: redis.Redis) -> None:
    async def scenario(store: JobStore) -> tuple[list[str], str, list[str]]:
        normal = [await store.submit([ROW]) for _ in range(3)]
        high = await store.submit([ROW], priority="high")
        claimed = [job_id for job_id, _ in await store.claim(batch_size=10, block=1)]
        return normal, high, claimed

    normal, high, claimed = run(scenario)
    assert claimed == [high, *normal]


def test_cancel_only_pending_jobs(db: redis.Redis) -> None:
    async def scenario(
        store: JobStore,
    ) -> tuple[str, str, str | None, str | None, str | None, str | None, dict | None]:
        taken, pending = await store.submit([ROW]), await store.submit([ROW])
        await store.claim(batch_size=1, block=1)  # takes the oldest, `taken`
        return (
            pending,
            taken,
            await store.cancel(pending),
            await store.cancel(pending),
            await store.cancel(taken),
            await store.cancel("nosuchjob"),
            await store.get(pending),
        )

    pending, taken, first, again, started, unknown, job = run(scenario)
    assert (first, again, started, unknown) == ("cancelled", "cancelled", "processing", None)
    assert job == {"job_id": pending, "status": "cancelled"}
    assert db.llen("queue:predict") == 0
    assert db.exists(f"job:{pending}:data") == 0
    assert 0 < db.ttl(f"job:{pending}:status") <= DAY


def test_requeued_jobs_go_back_to_the_head_in_order(db: redis.Redis) -> None:
    async def scenario(store: JobStore) -> tuple[list[str], list[str], list[str]]:
        a, b, c = [await store.submit([ROW]) for _ in range(3)]
        held = [job_id for job_id, _ in await store.claim(batch_size=2, block=1)]
        assert held == [a, b]
        assert await store.requeue(held) == 2
        statuses = [await status_of(store, i) for i in (a, b, c)]
        again = [job_id for job_id, _ in await store.claim(batch_size=3, block=1)]
        return [a, b, c], statuses, again

    ids, statuses, again = run(scenario)
    assert statuses == ["pending"] * 3
    assert again == ids


def test_reaper_returns_jobs_held_past_the_visibility_timeout(db: redis.Redis) -> None:
    async def scenario(store: JobStore) -> tuple[str, str, list[Finished]]:
        job_id = await store.submit([ROW])
        await store.claim(batch_size=1, block=1)  # ... and the worker dies
        assert await store.reap(visibility_timeout=60) == 0
        await asyncio.sleep(0.05)
        assert await store.reap(visibility_timeout=0.01) == 1
        status = await status_of(store, job_id)
        # The dead worker's late answer is not stored: the job is someone else's now.
        late = await store.finish([(job_id, JobStatus.COMPLETED, "[]")])
        return job_id, status, late

    job_id, status, late = run(scenario)
    assert (status, late) == ("pending", [])
    assert db.lrange("queue:predict", 0, -1) == [job_id]
    assert db.llen("queue:predict:processing") == 0
    assert db.zcard("queue:predict:claimed") == 0


def test_a_job_claimed_without_a_claim_time_is_reaped_too(db: redis.Redis) -> None:
    """A worker that dies between BLMOVE and the CLAIM script leaves no claim time behind."""

    async def scenario(store: JobStore) -> str:
        job_id = await store.submit([ROW])
        await store.redis.lmove("queue:predict", "queue:predict:processing", "RIGHT", "LEFT")
        assert await store.reap(visibility_timeout=0.01) == 0  # first seen: clock starts
        await asyncio.sleep(0.05)
        assert await store.reap(visibility_timeout=0.01) == 1
        return job_id

    job_id = run(scenario)
    assert db.lrange("queue:predict", 0, -1) == [job_id]


def test_recent_jobs_newest_first_paginated(db: redis.Redis) -> None:
    async def scenario(
        store: JobStore,
    ) -> tuple[list[str], tuple[int, list[dict]], tuple[int, list[dict]]]:
        ids: list[str] = []
        for _ in range(5):
            ids.append(await store.submit([ROW]))
            await asyncio.sleep(0.002)  # distinct millisecond scores
        return ids, await store.recent_jobs(0, 2), await store.recent_jobs(4, 2)

    ids, (total, first), (_, last) = run(scenario)
    assert total == 5
    assert [j["job_id"] for j in first] == [ids[4], ids[3]]
    assert [j["job_id"] for j in last] == [ids[0]]
    assert first[0]["status"] == "pending"


def test_ids_are_short_and_distinct() -> None:
    ids = [new_job_id() for _ in range(10000)]
    assert len(set(ids)) == len(ids) and all(len(i) == 10 for i in ids)


def test_a_stale_worker_cannot_finish_or_give_back_a_job_it_lost(db: redis.Redis) -> None:
    """Worker A stalls past the visibility timeout; the reaper hands its job to worker B."""

    async def scenario(
        a: JobStore,
    ) -> tuple[str, list[Finished], int, tuple[str, int], list[Finished], dict | None]:
        b = JobStore(a.redis)  # another worker: its own store, its own claims
        job_id = await a.submit([ROW])
        await a.claim(batch_size=1, block=1)
        await asyncio.sleep(0.05)
        assert await b.reap(visibility_timeout=0.01) == 1
        assert [i for i, _ in await b.claim(batch_size=1, block=1)] == [job_id]
        # A wakes up: neither its failure nor its give-back may touch B's job.
        stale_finish = await a.finish([(job_id, JobStatus.FAILED, "stale")])
        stale_requeue = await a.requeue([job_id])
        during = await status_of(a, job_id), await a.redis.llen("queue:predict")
        held = await b.finish([(job_id, JobStatus.COMPLETED, "[]")])
        return job_id, stale_finish, stale_requeue, during, held, await a.get(job_id)

    job_id, stale_finish, stale_requeue, during, held, job = run(scenario)
    assert (stale_finish, stale_requeue) == ([], 0)
    assert during == ("processing", 0)
    assert [f.job_id for f in held] == [job_id]
    assert job == {"job_id": job_id, "status": "completed", "result": []}
    assert db.llen("queue:predict:processing") == 0
    assert db.hlen("queue:predict:holder") == db.hlen("queue:predict:attempts") == 0


def test_a_worker_that_stalled_before_its_claim_script_does_not_take_the_job(
    db: redis.Redis,
) -> None:
    """BLMOVE, then a stall past the visibility timeout, then the CLAIM script: too late."""

    async def scenario(a: JobStore) -> tuple[str, object, list[Finished]]:
        b = JobStore(a.redis)
        job_id = await a.submit([ROW])
        await a.redis.lmove("queue:predict", "queue:predict:processing", "RIGHT", "LEFT")
        await b.reap(visibility_timeout=0.01)  # first seen: clock starts
        await asyncio.sleep(0.05)
        assert await b.reap(visibility_timeout=0.01) == 1
        assert [i for i, _ in await b.claim(batch_size=1, block=1)] == [job_id]
        late = await a._claim(
            keys=[a.queue, a.processing, a.claimed, a.holder, a.attempts],
            args=[job_id, 0, a.ttl, "a-token", a.max_claims],
        )
        return job_id, late, await b.finish([(job_id, JobStatus.COMPLETED, "[]")])

    job_id, late, held = run(scenario)
    assert late == [0] and [f.job_id for f in held] == [job_id]
    assert db.get(f"job:{job_id}:status") == "completed"


def test_requeue_and_claim_keep_the_data_alive(db: redis.Redis) -> None:
    """A job that waits longer than its TTL in all, but never that long in one place."""

    async def scenario(store: JobStore) -> tuple[str, Batch]:
        job_id = await store.submit([ROW])
        await asyncio.sleep(1.2)
        await store.claim(batch_size=1, block=1)
        await asyncio.sleep(1.2)  # 2.4 s since submit: the data would have expired
        assert await store.requeue([job_id]) == 1
        await asyncio.sleep(1.2)
        return job_id, await store.claim(batch_size=1, block=1)

    job_id, batch = run(scenario, ttl=2)
    assert batch == [(job_id, json.dumps([ROW]))]
    assert db.ttl(f"job:{job_id}:data") == db.ttl(f"job:{job_id}:status") == 2
    assert db.ttl(f"job:{job_id}:submitted") == 2


def test_a_job_whose_data_expired_fails_with_a_reason(db: redis.Redis) -> None:
    async def scenario(store: JobStore) -> tuple[str, Batch, dict | None]:
        job_id = await store.submit([ROW])
        await store.redis.delete(f"job:{job_id}:data")  # as if its TTL had run out in the queue
        return job_id, await store.claim(batch_size=1, block=1), await store.get(job_id)

    job_id, batch, job = run(scenario)
    assert batch == []
    assert job == {
        "job_id": job_id,
        "status": "failed",
        "error": "job data expired before a worker took it",
    }
    assert db.llen("queue:predict") == db.llen("queue:predict:processing") == 0
    assert 0 < db.ttl(f"job:{job_id}:status") <= DAY


def test_a_job_whose_workers_keep_dying_fails_after_max_claims(db: redis.Redis) -> None:
    async def scenario(store: JobStore) -> tuple[str, Batch, dict | None]:
        job_id = await store.submit([ROW])
        for _ in range(2):  # claimed, its worker dies, reaped: twice
            assert len(await store.claim(batch_size=1, block=1)) == 1
            await asyncio.sleep(0.02)
            assert await store.reap(visibility_timeout=0.01) == 1
        # A clean give-back (TensorFlow Serving down) is not a failed attempt.
        assert len(await store.claim(batch_size=1, block=1)) == 1
        assert await store.requeue([job_id]) == 1
        assert len(await store.claim(batch_size=1, block=1)) == 1  # third claim: allowed
        await asyncio.sleep(0.02)
        assert await store.reap(visibility_timeout=0.01) == 1
        return job_id, await store.claim(batch_size=1, block=1), await store.get(job_id)

    job_id, batch, job = run(scenario, max_claims=3)
    assert batch == [] and batch.given_up == 1  # a final status: the worker counts it failed
    assert job is not None
    assert job["status"] == "failed"
    assert job["error"] == "given up: 3 workers died or hung while holding it"
    assert db.llen("queue:predict") == db.llen("queue:predict:processing") == 0
    assert db.hlen("queue:predict:attempts") == 0


def test_a_full_queue_refuses_new_jobs(db: redis.Redis) -> None:
    async def scenario(store: JobStore) -> list[str]:
        ids = [await store.submit([ROW]) for _ in range(2)]
        with pytest.raises(QueueFull):
            await store.submit([ROW], priority="high")
        await store.claim(batch_size=1, block=1)  # one leaves the queue: room for one more
        ids.append(await store.submit([ROW]))
        return ids

    ids = run(scenario, max_queue=2)
    assert sorted(db.zrange("jobs:recent", 0, -1)) == sorted(ids)
    assert len(db.keys("job:*:data")) == 3


def test_recent_jobs_keep_only_the_newest(db: redis.Redis) -> None:
    async def scenario(store: JobStore) -> list[str]:
        ids: list[str] = []
        for _ in range(5):
            ids.append(await store.submit([ROW]))
            await asyncio.sleep(0.002)
        return ids

    ids = run(scenario, max_recent=3)
    assert db.zrange("jobs:recent", 0, -1) == ids[2:]
