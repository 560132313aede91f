"""Measure the two halves of the pattern on loopback, with real processes:

1. submit: POST /predict at concurrency 1 and 50 (requests/s, p50, p99), no worker running, so
   this is the proxy + Redis alone: what a client waits for.
2. drain: a queue of pre-submitted jobs (one row each) emptied by 1 and then 2 worker processes
   (jobs/s from the moment the queue is handed to the workers until every job is completed).

Uses Redis at REDIS_URL (default 127.0.0.1:6379) database 3, which it flushes; starts its own
TensorFlow Serving (chapter 01's local server), proxy and workers on free ports, and stops them.
The last line printed is one JSON object with the headline figures.
"""

import asyncio
import contextlib
import json
import os
import statistics
import sys
import time

import aiohttp
import redis
from launch import free_port, redis_url, start_proxy, start_tf_serving, start_worker

ROW = [5.9, 3.0, 5.1, 1.8]
SUBMITS = {1: 1_000, 50: 10_000}  # requests per concurrency level
MAX_SECONDS = 60  # per measurement: the bench always ends
DRAIN_JOBS = 10_000
BATCH_SIZE = int(os.environ.get("BATCH_SIZE", "32"))  # as in compose.yaml and run.sh


async def submit_load(url: str, concurrency: int, total: int) -> dict:
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + MAX_SECONDS
    body = json.dumps({"data": [ROW]})
    headers = {"Content-Type": "application/json"}

    async def client(session: aiohttp.ClientSession, n: int) -> None:
        nonlocal errors
        for _ in range(n):
            if time.monotonic() > deadline:
                return
            t = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                errors += response.status != 202
            latencies.append(time.perf_counter() - t)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        # Warm up at full concurrency: every HTTP and Redis connection is open before timing.
        await asyncio.gather(*(client(session, 5) for _ in range(concurrency)))
        latencies.clear()
        started = time.perf_counter()
        await asyncio.gather(*(client(session, total // concurrency) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": len(latencies),
        "errors": errors,
        "rps": len(latencies) / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
    }


async def fill_queue(url: str, n: int) -> None:
    connector = aiohttp.TCPConnector(limit=50)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> None:
            async with session.post(url, json={"data": [ROW]}) as response:
                assert response.status == 202, await response.text()

        for start in range(0, n, 500):
            await asyncio.gather(*(one() for _ in range(min(500, n - start))))


def drain(r: redis.Redis, proxy_url: str, env: dict, workers: int) -> dict:
    """The queue is filled first and parked under another key while the workers start (importing
    TensorFlow takes seconds), then renamed back in one step: the clock runs from there."""
    r.flushdb()
    asyncio.run(fill_queue(proxy_url, DRAIN_JOBS))
    r.rename("queue:predict", "bench:parked")
    with contextlib.ExitStack() as stack:
        for _ in range(workers):
            stack.callback(start_worker(env).close)
        started = time.perf_counter()
        r.rename("bench:parked", "queue:predict")  # wakes the workers blocked in BLMOVE
        deadline = time.monotonic() + MAX_SECONDS
        while time.monotonic() < deadline:
            if r.llen("queue:predict") + r.llen("queue:predict:processing") == 0:
                break
            time.sleep(0.01)
        elapsed = time.perf_counter() - started
    ids = [str(i) for i in r.zrange("jobs:recent", 0, -1)]  # str already: decode_responses
    statuses = r.mget([f"job:{i}:status" for i in ids])
    done = sum(s == "completed" for s in statuses)
    return {"workers": workers, "jobs": len(ids), "completed": done, "jobs_s": done / elapsed}


def main() -> int:
    bench_redis = redis_url(db=3)
    r = redis.Redis.from_url(bench_redis, decode_responses=True)
    try:
        r.ping()
    except redis.ConnectionError as e:
        sys.exit(f"bench: no Redis at {bench_redis} ({e}); start one (e.g. redis-server)")
    r.flushdb()
    grpc_port, rest_port, http_port = free_port(), free_port(), free_port()
    env = {
        "REDIS_URL": bench_redis,
        "TF_SERVING_GRPC_PORT": str(grpc_port),
        "TF_SERVING_REST_PORT": str(rest_port),
        "PORT": str(http_port),
        "ACCESS_LOG": "0",  # a log line per request costs as much as the request itself
        "BATCH_SIZE": str(BATCH_SIZE),
        "NUM_WORKERS": "1",
        # No worker runs while submits are timed, so the 11,000 submits stay queued: above the
        # default MAX_QUEUE (10,000), which would answer the last ones 429. The limit is not what
        # is measured here; the check it costs (one LLEN in the script) is.
        "MAX_QUEUE": str(2 * sum(SUBMITS.values())),
    }
    url = f"http://127.0.0.1:{http_port}/predict"
    with contextlib.ExitStack() as stack:  # every process is stopped, whatever happens
        stack.callback(r.flushdb)
        stack.callback(start_tf_serving(grpc_port, rest_port).close)
        stack.callback(start_proxy(env).close)
        submit = {c: asyncio.run(submit_load(url, c, n)) for c, n in SUBMITS.items()}
        r.flushdb()
        drains = {w: drain(r, url, env, w) for w in (1, 2)}

    print(f"\n{'measurement':<34}{'count':>8}{'rate /s':>10}{'p50 ms':>9}{'p99 ms':>9}")
    for c, s in submit.items():
        errors = f"  errors {s['errors']}" if s["errors"] else ""
        print(
            f"{f'POST /predict, concurrency {c}':<34}{s['requests']:>8}{s['rps']:>10.0f}"
            f"{s['p50_ms']:>9.2f}{s['p99_ms']:>9.2f}{errors}"
        )
    for w, d in drains.items():
        missing = f"  of {d['jobs']}" if d["completed"] != d["jobs"] else ""
        print(
            f"{f'drain, {w} worker(s), batch {BATCH_SIZE}':<34}{d['completed']:>8}"
            f"{d['jobs_s']:>10.0f}{missing}"
        )
    print(f"machine: {os.cpu_count()} cores, shared; loopback; Redis {bench_redis}")
    headline = {
        "submit_c1_rps": round(submit[1]["rps"]),
        "submit_c1_p50_ms": round(submit[1]["p50_ms"], 2),
        "submit_c1_p99_ms": round(submit[1]["p99_ms"], 2),
        "submit_c50_rps": round(submit[50]["rps"]),
        "submit_c50_p50_ms": round(submit[50]["p50_ms"], 2),
        "submit_c50_p99_ms": round(submit[50]["p99_ms"], 2),
        "drain_1_worker_jobs_s": round(drains[1]["jobs_s"]),
        "drain_2_workers_jobs_s": round(drains[2]["jobs_s"]),
        "batch_size": BATCH_SIZE,
    }
    print(json.dumps(headline))
    incomplete = any(d["completed"] != d["jobs"] for d in drains.values())
    return 1 if incomplete or any(s["errors"] for s in submit.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
