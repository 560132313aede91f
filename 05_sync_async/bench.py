"""Measures the pattern on loopback: the fast answer's latency (alone, with 8 clients, with the
worker saturated) and the time from submit to the accurate answer.

Starts its own proxy and worker on a free port against Redis DB 5 (which it empties), runs for a
bounded number of requests, prints a table, and as its last line one JSON object.

`bench.py --metrics-overhead` measures only what the HTTP metrics middleware costs: two proxies,
one with METRICS=0, asked in alternating rounds so both see the same load from other programs.
"""

import asyncio
import base64
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import redis
import redis.asyncio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import jobs

HERE = Path(__file__).resolve().parent
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/5")
SAMPLE = (HERE / "samples" / "chelsea.jpg").read_bytes()
BODY = json.dumps({"image_data": base64.b64encode(SAMPLE).decode()})


def percentiles(samples: list[float]) -> dict[str, float]:
    ms = sorted(1000 * s for s in samples)
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return {"n": len(ms), "p50": round(q[49], 1), "p90": round(q[89], 1), "p99": round(q[98], 1)}


def start(script: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, script],
        cwd=HERE,
        env={**os.environ, "REDIS_URL": REDIS_URL, **env},
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def count_results(db: redis.Redis) -> int:
    return sum(1 for _ in db.scan_iter("result:*", count=1000))


async def wait_for(condition: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def predict(session: aiohttp.ClientSession, base: str) -> tuple[float, str]:
    started = time.perf_counter()
    async with session.post(f"{base}/predict", data=BODY) as response:
        body = await response.json()
        response.raise_for_status()
    return time.perf_counter() - started, body["job_id"]


async def sync_latency(
    session: aiohttp.ClientSession, base: str, concurrency: int, total: int
) -> tuple[list[float], float]:
    """`total` POST /predict from `concurrency` clients; latencies and requests per second."""
    latencies: list[float] = []

    async def client(n: int) -> None:
        for _ in range(n):
            latencies.append((await predict(session, base))[0])

    started = time.perf_counter()
    await asyncio.gather(*(client(total // concurrency) for _ in range(concurrency)))
    return latencies, len(latencies) / (time.perf_counter() - started)


async def accurate_latency(session: aiohttp.ClientSession, base: str, total: int) -> list[float]:
    """Submit, then poll every 5 ms until the accurate answer is there: time from submit."""
    results: list[float] = []
    for _ in range(total):
        started = time.perf_counter()
        _, job_id = await predict(session, base)
        while True:
            async with session.get(f"{base}/job/{job_id}") as response:
                if (await response.json())[job_id]["status"] == "complete":
                    break
            await asyncio.sleep(0.005)
        results.append(time.perf_counter() - started)
    return results


async def main() -> dict[str, float | bool]:
    db = redis.Redis.from_url(REDIS_URL)
    db.flushdb()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proxy = start("proxy.py", {"PORT": str(port)})
    worker = None
    try:
        async with aiohttp.ClientSession() as session:

            async def proxy_up() -> bool:
                try:
                    async with session.get(f"{base}/health") as response:
                        return response.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_for(proxy_up, 60, "the proxy")
            await sync_latency(session, base, 1, 20)  # warm-up

            # 1. The fast answer alone: no worker runs, queued jobs simply wait.
            sync1, rps1 = await sync_latency(session, base, 1, 200)
            sync8, rps8 = await sync_latency(session, base, 8, 400)
            db.flushdb()

            # 2. Submit to accurate answer, one job at a time, with the worker idle in between.
            worker = start("worker.py", {"NUM_WORKERS": "2", "METRICS_PORT": str(free_port())})

            async def workers_waiting() -> bool:
                return sum(c["cmd"] == "blmove" for c in db.client_list() if c["db"] == "5") >= 2

            await wait_for(workers_waiting, 120, "the worker processes")
            await accurate_latency(session, base, 3)  # warm-up
            accurate = await accurate_latency(session, base, 50)

            # 3. The fast answer while the worker is saturated: a backlog queued straight into
            # Redis keeps both worker processes busy for the whole measurement.
            backlog = 300
            client = redis.asyncio.Redis.from_url(REDIS_URL)
            for _ in range(backlog):
                await jobs.submit(client, jobs.Keys(), SAMPLE, 3600, max_queue_length=2 * backlog)
            await client.aclose()
            done_before, started = count_results(db), time.perf_counter()
            saturated, _ = await sync_latency(session, base, 1, 200)
            elapsed = time.perf_counter() - started
            done, left = count_results(db) - done_before, db.llen("queue:jobs")
    finally:
        stop(proxy)
        if worker is not None:
            stop(worker)
        db.flushdb()

    rows = [
        ("sync POST /predict, concurrency 1", percentiles(sync1), f"{rps1:.0f} req/s"),
        ("sync POST /predict, concurrency 8", percentiles(sync8), f"{rps8:.0f} req/s"),
        ("submit -> accurate result, concurrency 1", percentiles(accurate), ""),
        ("sync POST /predict, c=1, worker saturated", percentiles(saturated), ""),
    ]
    print(f"{'measurement':44} {'n':>4} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}  throughput")
    for name, p, extra in rows:
        print(f"{name:44} {p['n']:>4} {p['p50']:>8} {p['p90']:>8} {p['p99']:>8}  {extra}")
    worker_rate = done / elapsed
    print(
        f"worker: {done} jobs in {elapsed:.1f} s = {worker_rate:.1f} jobs/s with 2 processes; "
        f"backlog {backlog} jobs, {left} still queued at the end (saturated throughout: "
        f"{'yes' if left > 0 else 'NO'})"
    )
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: {os.cpu_count()} cores, shared with other work; load average {load}")
    return {
        "sync_p50_ms_c1": percentiles(sync1)["p50"],
        "sync_p99_ms_c1": percentiles(sync1)["p99"],
        "sync_p50_ms_c8": percentiles(sync8)["p50"],
        "sync_rps_c8": round(rps8, 1),
        "accurate_p50_ms": percentiles(accurate)["p50"],
        "accurate_p99_ms": percentiles(accurate)["p99"],
        "sync_p99_ms_saturated": percentiles(saturated)["p99"],
        "sync_p50_ms_saturated": percentiles(saturated)["p50"],
        "worker_jobs_per_s": round(worker_rate, 1),
        "saturated_throughout": left > 0,
    }


async def middleware_alone(calls: int = 20_000) -> float:
    """Microseconds HttpMetrics adds to one request, against an app that answers at once: the
    figure the loaded machine's noise hides in the end-to-end numbers."""
    from starlette.routing import Route

    import proxy

    async def empty_app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> Message:  # never called: the app reads no body
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        pass

    routes = [Route("/predict", empty_app, methods=["POST"]), Route("/job/{job_id}", empty_app)]
    measured = proxy.HttpMetrics(empty_app, proxy.Metrics(), routes)
    scope = {"type": "http", "method": "POST", "path": "/predict", "root_path": ""}

    async def run(app: ASGIApp) -> float:
        started = time.perf_counter()
        for _ in range(calls):
            await app(dict(scope), receive, send)
        return time.perf_counter() - started

    return 1e6 * (await run(measured) - await run(empty_app)) / calls


async def metrics_overhead(rounds: int = 6, per_round: int = 50) -> dict[str, float]:
    """sync POST /predict at concurrency 1 with and without the middleware, interleaved."""
    db = redis.Redis.from_url(REDIS_URL)
    db.flushdb()
    bases: dict[str, str] = {}
    proxies: list[subprocess.Popen[bytes]] = []
    try:
        for metrics in ("1", "0"):
            port = free_port()
            # A queue as long as the run: no worker drains it here.
            env = {"PORT": str(port), "METRICS": metrics, "MAX_QUEUE_LENGTH": "100000"}
            proxies.append(start("proxy.py", env))
            bases[metrics] = f"http://127.0.0.1:{port}"
        samples: dict[str, list[float]] = {"1": [], "0": []}
        async with aiohttp.ClientSession() as session:
            for metrics, base in bases.items():

                async def up(base: str = base) -> bool:
                    try:
                        async with session.get(f"{base}/health") as response:
                            return response.status == 200
                    except aiohttp.ClientError:
                        return False

                await wait_for(up, 60, f"the proxy with METRICS={metrics}")
                await sync_latency(session, base, 1, 20)  # warm-up
            for n in range(rounds):  # each first in every other round: no order bias
                for metrics, base in sorted(bases.items(), reverse=n % 2 == 1):
                    latencies, _ = await sync_latency(session, base, 1, per_round)
                    samples[metrics] += latencies
    finally:
        for proxy in proxies:
            stop(proxy)
        db.flushdb()
    title = "sync POST /predict, concurrency 1"
    print(f"{title:44} {'n':>4} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}")
    for metrics, name in (("1", "with the metrics middleware"), ("0", "without (METRICS=0)")):
        p = percentiles(samples[metrics])
        print(f"{name:44} {p['n']:>4} {p['p50']:>8} {p['p90']:>8} {p['p99']:>8}")
    alone = await middleware_alone()
    print(f"the middleware alone, in process around an empty app: {alone:.1f} us per request")
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: {os.cpu_count()} cores, shared with other work; load average {load}")
    return (
        {"middleware_us": round(alone, 1)}
        | {f"p50_ms_metrics_{m}": percentiles(samples[m])["p50"] for m in samples}
        | {f"p99_ms_metrics_{m}": percentiles(samples[m])["p99"] for m in samples}
    )


if __name__ == "__main__":
    measure = metrics_overhead if sys.argv[1:] == ["--metrics-overhead"] else main
    print(json.dumps(asyncio.run(measure())))
