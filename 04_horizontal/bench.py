"""Measure the fan-out: /predict/label through the proxy vs /predict on one service directly.

Starts three services and a proxy on free loopback ports (as the tests do), then, in one run,
sends the same one-row request to both targets at concurrency 1 and 50 from one aiohttp client.
The two targets take turns in short rounds, so both see the same load from the rest of the
machine. Also counts the CPU time the proxy, the services and this client spend per request.
Bounded in count and time. Prints a table, and as its last line one JSON object.

    python bench.py [--requests-c1 N] [--requests-c50 N] [--seconds S] [--access-log]
                    [--no-metrics]
"""

import argparse
import asyncio
import json
import os
import resource
import statistics
import time

import aiohttp
import uvloop
from processes import start_proxy, start_services, wait_healthy

BODY = json.dumps({"data": [[5.1, 3.5, 1.4, 0.2]]}).encode()
HEADERS = {"Content-Type": "application/json"}
ROUNDS = 5

Results = dict[tuple[str, int], dict[str, float]]  # (target, concurrency) -> Tally.summary()


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes so far, from /proc (Linux)."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Tally:
    """Latencies, wall time, errors and CPU time of one target, summed over its rounds."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors = 0
        self.wall = self.proxy_cpu = self.services_cpu = self.client_cpu = 0.0

    def summary(self) -> dict[str, float]:
        done = sorted(self.latencies)
        return {
            "requests": len(done),
            "errors": self.errors,
            "rps": len(done) / self.wall,
            "p50_ms": statistics.median(done) * 1000,
            "p99_ms": done[max(0, int(len(done) * 0.99) - 1)] * 1000,
            "proxy_cpu_us": self.proxy_cpu / len(done) * 1e6,
            "services_cpu_us": self.services_cpu / len(done) * 1e6,
            "client_cpu_us": self.client_cpu / len(done) * 1e6,
        }


async def measure(
    session: aiohttp.ClientSession,
    url: str,
    concurrency: int,
    requests: int,
    seconds: float,
    tally: Tally,
) -> None:
    """Keep `concurrency` requests in flight until `requests` are done or `seconds` have passed."""
    started = time.perf_counter()
    deadline = started + seconds
    issued = 0

    async def worker() -> None:
        nonlocal issued
        while issued < requests and time.perf_counter() < deadline:
            issued += 1
            t0 = time.perf_counter()
            async with session.post(url, data=BODY, headers=HEADERS) as response:
                await response.read()
            if response.status == 200:
                tally.latencies.append(time.perf_counter() - t0)
            else:
                tally.errors += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    tally.wall += time.perf_counter() - started


async def bench(
    targets: dict[str, str], proxy_pid: int, service_pids: list[int], args: argparse.Namespace
) -> Results:
    # One client session, enough connections for the highest concurrency.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for url in targets.values():  # warm up connections and the services' models
            await measure(session, url, 10, 300, 10, Tally())
        results: Results = {}
        for concurrency, requests in ((1, args.requests_c1), (50, args.requests_c50)):
            tallies = {name: Tally() for name in targets}
            for _ in range(ROUNDS):
                for name, url in targets.items():
                    tally = tallies[name]
                    proxy0, services0 = cpu_seconds([proxy_pid]), cpu_seconds(service_pids)
                    client0 = own_cpu_seconds()
                    await measure(
                        session, url, concurrency, requests // ROUNDS, args.seconds / ROUNDS, tally
                    )
                    tally.proxy_cpu += cpu_seconds([proxy_pid]) - proxy0
                    tally.services_cpu += cpu_seconds(service_pids) - services0
                    tally.client_cpu += own_cpu_seconds() - client0
            for name, tally in tallies.items():
                results[name, concurrency] = tally.summary()
        return results


def report(
    results: Results, targets: dict[str, str], args: argparse.Namespace, load_before: float
) -> None:
    print(
        f"{os.cpu_count()} cores shared with other work, load average {load_before:.2f} before"
        f" the run, access log {'on' if args.access_log else 'off'},"
        f" HTTP metrics {'off' if args.no_metrics else 'on'}"
    )
    header = "target                      conc  requests   req/s  p50 ms  p99 ms"
    print(header + "   CPU us/request: proxy services client")
    for (name, concurrency), r in results.items():
        print(
            f"{name:<28}{concurrency:>4}{r['requests']:>10}{r['rps']:>8.0f}{r['p50_ms']:>8.2f}"
            f"{r['p99_ms']:>8.2f}{r['proxy_cpu_us']:>23.0f}{r['services_cpu_us']:>9.0f}"
            f"{r['client_cpu_us']:>7.0f}"
        )
    proxy, direct = targets
    overhead = {c: results[proxy, c]["p50_ms"] - results[direct, c]["p50_ms"] for c in (1, 50)}
    for c, value in overhead.items():
        print(f"fan-out overhead at concurrency {c:>2} (proxy p50 - direct p50): {value:.2f} ms")
    summary = {
        "proxy_c1_p50_ms": round(results[proxy, 1]["p50_ms"], 2),
        "proxy_c1_p99_ms": round(results[proxy, 1]["p99_ms"], 2),
        "proxy_c50_rps": round(results[proxy, 50]["rps"]),
        "proxy_c50_p50_ms": round(results[proxy, 50]["p50_ms"], 2),
        "direct_c1_p50_ms": round(results[direct, 1]["p50_ms"], 2),
        "direct_c50_rps": round(results[direct, 50]["rps"]),
        "fanout_overhead_c1_ms": round(overhead[1], 2),
        "fanout_overhead_c50_ms": round(overhead[50], 2),
        "proxy_c50_cpu_us_per_request": {
            part: round(results[proxy, 50][f"{part}_cpu_us"])
            for part in ("proxy", "services", "client")
        },
        "errors": sum(r["errors"] for r in results.values()),
        "goal_proxy_c1_p50_under_3ms": results[proxy, 1]["p50_ms"] < 3,
        "goal_proxy_c50_at_least_1000_rps": results[proxy, 50]["rps"] >= 1000,
        "cores": os.cpu_count(),
        "load_before": round(load_before, 2),
        "access_log": args.access_log,
        "http_metrics": not args.no_metrics,
    }
    print(json.dumps(summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests-c1", type=int, default=2000)
    parser.add_argument("--requests-c50", type=int, default=10000)
    parser.add_argument("--seconds", type=float, default=20, help="time limit for each case")
    parser.add_argument(
        "--access-log", action="store_true", help="keep the servers' per-request JSON log lines"
    )
    parser.add_argument(
        "--no-metrics", action="store_true", help="METRICS=0: no HTTP metrics middleware"
    )
    args = parser.parse_args()

    log = {
        "ACCESS_LOG": "1" if args.access_log else "0",
        "METRICS": "0" if args.no_metrics else "1",
    }
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
        service_pids = [process.popen.pid for process in services.values()]
        # uvloop for the client too: its CPU is taken from the same two cores as the servers'.
        results = uvloop.run(bench(targets, proxy.popen.pid, service_pids, args))
    finally:
        for process in processes:
            process.stop()
    report(results, targets, args, load_before)


if __name__ == "__main__":
    main()
