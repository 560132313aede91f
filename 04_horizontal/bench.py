"""Measure the fan-out: /predict/label through the proxy vs /predict on one service directly.

Starts three services and a proxy on free loopback ports (as the tests do), then, in one run,
sends the same one-row request to both targets at concurrency 1 and 50 from one aiohttp client.
Bounded in count and time. Prints a table, and as its last line one JSON object.

    python bench.py [--requests-c1 N] [--requests-c50 N] [--seconds S]
"""

import argparse
import asyncio
import json
import os
import statistics
import time

import aiohttp
from processes import start_proxy, start_services, wait_healthy

BODY = json.dumps({"data": [[5.1, 3.5, 1.4, 0.2]]}).encode()
HEADERS = {"Content-Type": "application/json"}


async def measure(session, url: str, concurrency: int, requests: int, seconds: float) -> dict:
    """Keep `concurrency` requests in flight until `requests` are done or `seconds` have passed."""
    latencies: list[float] = []
    errors = 0
    started = time.perf_counter()
    deadline = started + seconds

    async def worker():
        nonlocal errors
        while len(latencies) + errors < requests and time.perf_counter() < deadline:
            t0 = time.perf_counter()
            async with session.post(url, data=BODY, headers=HEADERS) as response:
                await response.read()
                if response.status != 200:
                    errors += 1
                    continue
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": len(latencies),
        "errors": errors,
        "rps": len(latencies) / wall,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
    }


async def bench(targets: dict[str, str], args) -> dict:
    # One client session, enough connections for the highest concurrency.
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        for url in targets.values():  # warm up connections, caches and the services' models
            await measure(session, url, 10, 300, 10)
        results = {}
        for concurrency, requests in ((1, args.requests_c1), (50, args.requests_c50)):
            for name, url in targets.items():
                results[name, concurrency] = await measure(
                    session, url, concurrency, requests, args.seconds
                )
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests-c1", type=int, default=2000)
    parser.add_argument("--requests-c50", type=int, default=10000)
    parser.add_argument("--seconds", type=float, default=20, help="time limit for each case")
    parser.add_argument(
        "--access-log", action="store_true", help="keep the servers' per-request JSON log lines"
    )
    args = parser.parse_args()

    log = {"ACCESS_LOG": "1" if args.access_log else "0"}
    services = start_services(**log)
    processes = list(services.values())
    try:
        urls = {name: process.url for name, process in services.items()}
        proxy = start_proxy(urls, **log)
        processes.append(proxy)
        wait_healthy(*processes)
        targets = {
            "proxy /predict/label": proxy.url + "/predict/label",
            "service /predict (setosa)": services["setosa"].url + "/predict",
        }
        load_before = os.getloadavg()[0]
        results = asyncio.run(bench(targets, args))
    finally:
        for process in processes:
            process.kill()

    print(
        f"{os.cpu_count()} cores, load average {load_before:.2f} before the run, "
        f"access log {'on' if args.access_log else 'off'}"
    )
    print(f"{'target':<28}{'conc':>5}{'requests':>10}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}")
    for (name, concurrency), r in results.items():
        print(
            f"{name:<28}{concurrency:>5}{r['requests']:>10}{r['rps']:>9.0f}"
            f"{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
        )
    proxy_name, direct_name = targets
    overhead = {
        c: results[proxy_name, c]["p50_ms"] - results[direct_name, c]["p50_ms"] for c in (1, 50)
    }
    for c, value in overhead.items():
        print(f"fan-out overhead at concurrency {c:>2} (proxy p50 - direct p50): {value:.2f} ms")
    summary = {
        "proxy_c1_p50_ms": round(results[proxy_name, 1]["p50_ms"], 2),
        "proxy_c1_p99_ms": round(results[proxy_name, 1]["p99_ms"], 2),
        "proxy_c50_rps": round(results[proxy_name, 50]["rps"]),
        "proxy_c50_p50_ms": round(results[proxy_name, 50]["p50_ms"], 2),
        "direct_c1_p50_ms": round(results[direct_name, 1]["p50_ms"], 2),
        "direct_c50_rps": round(results[direct_name, 50]["rps"]),
        "fanout_overhead_c1_ms": round(overhead[1], 2),
        "fanout_overhead_c50_ms": round(overhead[50], 2),
        "errors": sum(r["errors"] for r in results.values()),
        "goal_proxy_c1_p50_under_3ms": results[proxy_name, 1]["p50_ms"] < 3,
        "goal_proxy_c50_at_least_1000_rps": results[proxy_name, 50]["rps"] >= 1000,
        "cores": os.cpu_count(),
        "load_before": round(load_before, 2),
        "access_log": args.access_log,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
