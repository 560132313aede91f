"""Bench: insert N Iris rows, then time `job.py --once` with 1 and with 2 processes.

Each configuration gets its own fresh database (batch_bench_<random>_<p>), dropped at the end.
Reports rows/min (wall time from starting the processes to the last exit, start-up included)
and the peak resident memory of each job process.

--metrics-overhead instead times the API's requests with and without the HTTP metrics
middleware (two API processes, METRICS=1 and METRICS=0, alternating rounds), and the middleware
alone in process.
"""

import argparse
import asyncio
import csv
import dataclasses
import http.client
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import api
import db
from config import MODELS_DIR, Settings
from metrics import HttpMetrics
from prometheus_client import CollectorRegistry
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HERE = Path(__file__).resolve().parent
INSERT_BATCH = 10_000
TIMEOUT_S = 900  # per configuration: the bench never runs unbounded


def iris_values() -> list[str]:
    with open(MODELS_DIR / "iris.csv") as f:
        rows = list(csv.reader(f))[1:]
    return [json.dumps([float(v) for v in row[:4]]) for row in rows]


def insert_rows(settings: Settings, n: int) -> float:
    """Fill a fresh database with n rows (the Iris rows, cycled); returns seconds taken."""
    db.apply_schema(settings)
    iris = iris_values()
    started = time.perf_counter()
    conn = db.connect(settings)
    try:
        with conn.cursor() as cur:
            for start in range(0, n, INSERT_BATCH):
                count = min(INSERT_BATCH, n - start)
                values = [iris[(start + i) % len(iris)] for i in range(count)]
                sql = "INSERT INTO items (`values`) VALUES " + ",".join(["(%s)"] * count)
                cur.execute(sql, values)
                conn.commit()
    finally:
        conn.close()
    return time.perf_counter() - started


def run_jobs(settings: Settings, processes: int, logdir: Path) -> tuple[float, list[float], float]:
    """Start the jobs together; returns wall seconds, each job's peak RSS in MiB, and the CPU
    seconds the jobs used (the rest of the time is the database's)."""
    env = dict(os.environ, MYSQL_DATABASE=settings.mysql_database)
    procs: list[subprocess.Popen[bytes]] = []
    started = time.perf_counter()
    for i in range(processes):
        with open(logdir / f"{settings.mysql_database}_{i}.log", "w") as out:
            cmd = [sys.executable, "job.py", "--once"]
            procs.append(subprocess.Popen(cmd, cwd=HERE, env=env, stdout=out, stderr=out))

    def kill_all() -> None:
        for p in procs:
            p.kill()

    watchdog = threading.Timer(TIMEOUT_S, kill_all)
    watchdog.start()
    peaks, codes, cpu = [], [], 0.0
    try:
        for p in procs:
            # wait4 rather than Popen.wait: it also returns the child's peak memory (KiB).
            _, status, usage = os.wait4(p.pid, 0)
            p.returncode = os.waitstatus_to_exitcode(status)
            codes.append(p.returncode)
            peaks.append(usage.ru_maxrss / 1024)
            cpu += usage.ru_utime + usage.ru_stime
    finally:
        watchdog.cancel()
        for p in procs:  # Ctrl-C or an error: no job outlives the bench (nor its database)
            if p.returncode is None:
                p.kill()
                p.wait()
    seconds = time.perf_counter() - started
    if any(codes):
        raise RuntimeError(f"a job exited with {codes}; logs in {logdir}")
    return seconds, peaks, cpu


def count_predicted(settings: Settings) -> int:
    conn = db.connect(settings)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM items WHERE prediction IS NOT NULL")
            row = cur.fetchone()
            assert row is not None  # COUNT(*) always answers one row
            count: int = row[0]
            return count
    finally:
        conn.close()


def start_api(settings: Settings, port: int, metrics: str, logdir: Path) -> subprocess.Popen:
    env = dict(
        os.environ, MYSQL_DATABASE=settings.mysql_database, PORT=str(port), HOST="127.0.0.1",
        METRICS=metrics, API_KEY="",
    )  # fmt: skip
    with open(logdir / f"api_metrics_{metrics}.log", "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "api.py"], cwd=HERE, env=env, stdout=out, stderr=out
        )
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start; log in {logdir}") from None
            time.sleep(0.1)


def time_requests(port: int, method: str, path: str, body: bytes | None, n: int) -> list[float]:
    """n requests one after another on one kept-alive connection; seconds each."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json"}
    times = []
    try:
        for _ in range(n):
            started = time.perf_counter()
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            times.append(time.perf_counter() - started)
            if response.status >= 300:
                raise RuntimeError(f"{method} {path}: {response.status}")
    finally:
        conn.close()
    return times


def middleware_alone(n: int = 20_000) -> float:
    """Microseconds HttpMetrics adds to one request, around an app that answers at once."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        scope["endpoint"] = endpoint  # as the router does
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def send(message: Message) -> None:
        pass

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    # The API's own routes (creating the app touches no database), GET /data/{item_id}.
    routes = [r for r in api.create_app(Settings()).routes if isinstance(r, Route)]
    endpoint = next(r.endpoint for r in routes if r.path_format == "/data/{item_id}")
    wrapped = HttpMetrics(app, CollectorRegistry(), routes)
    scope: Scope = {
        "type": "http",
        "method": "GET",
        "path": "/data/7",
        "headers": [],
        "root_path": "",
    }

    async def loop(target: ASGIApp) -> float:
        started = time.perf_counter()
        for _ in range(n):
            await target(scope, receive, send)
        return time.perf_counter() - started

    async def both() -> float:
        bare = min([await loop(app) for _ in range(3)])
        timed = min([await loop(wrapped) for _ in range(3)])
        return (timed - bare) / n * 1e6

    return asyncio.run(both())


def metrics_overhead(base: Settings, rounds: int, per_round: int) -> None:
    settings = dataclasses.replace(base, mysql_database=f"batch_bench_{secrets.token_hex(3)}_m")
    db.apply_schema(settings)
    calls = {
        "POST /data": ("POST", "/data", b'{"values": [5.1, 3.5, 1.4, 0.2]}'),
        "GET /metadata": ("GET", "/metadata", None),
    }
    times: dict[tuple[str, str], list[float]] = {(c, m): [] for c in calls for m in ("1", "0")}
    procs = []
    with tempfile.TemporaryDirectory(prefix="batch-bench-") as logdir:
        try:
            ports = {"1": free_port(), "0": free_port()}
            procs = [start_api(settings, ports[m], m, Path(logdir)) for m in ports]
            for call, (method, path, body) in calls.items():
                for m in ports:  # warm-up: connections, the pool, first-call costs
                    time_requests(ports[m], method, path, body, 50)
                for i in range(rounds):
                    # Alternate which goes first, so drift on a shared machine hits both.
                    for m in ("1", "0") if i % 2 == 0 else ("0", "1"):
                        times[call, m] += time_requests(ports[m], method, path, body, per_round)
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait()
            db.drop_database(settings)
    alone = middleware_alone()
    print(f"API requests, {rounds} alternating rounds of {per_round} per variant, sequential")
    print("call             metrics  p50 ms  p90 ms  mean ms")
    results = []
    for call in calls:
        for m, name in (("1", "on"), ("0", "off")):
            t = sorted(times[call, m])
            p50, p90 = t[len(t) // 2] * 1e3, t[len(t) * 9 // 10] * 1e3
            mean = sum(t) / len(t) * 1e3
            print(f"{call:15}  {name:>7}  {p50:6.2f}  {p90:6.2f}  {mean:7.2f}")
            results.append(
                {"call": call, "metrics": name, "requests": len(t), "p50_ms": round(p50, 3),
                 "p90_ms": round(p90, 3), "mean_ms": round(mean, 3)}
            )  # fmt: skip
    print(f"the middleware alone: {alone:.1f} us per request (in process, no server)")
    load = round(os.getloadavg()[0], 1)
    print(f"load average: {load}")
    print(json.dumps({"bench": "03_batch_metrics", "results": results,
                      "middleware_us": round(alone, 1), "load_avg": load}))  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts")
    parser.add_argument(
        "--metrics-overhead", action="store_true", help="the API with and without HTTP metrics"
    )
    parser.add_argument("--rounds", type=int, default=6, help="with --metrics-overhead")
    parser.add_argument("--per-round", type=int, default=300, help="with --metrics-overhead")
    args = parser.parse_args()
    base = Settings.from_env()
    if args.metrics_overhead:
        metrics_overhead(base, args.rounds, args.per_round)
        return
    prefix = f"batch_bench_{secrets.token_hex(3)}"
    results = []
    with tempfile.TemporaryDirectory(prefix="batch-bench-") as logdir:
        for processes in [int(p) for p in args.processes.split(",")]:
            settings = dataclasses.replace(base, mysql_database=f"{prefix}_{processes}")
            try:
                insert_s = insert_rows(settings, args.rows)
                print(f"inserted {args.rows:,} rows in {insert_s:.1f} s", flush=True)
                seconds, peaks, cpu = run_jobs(settings, processes, Path(logdir))
                predicted = count_predicted(settings)
            finally:
                db.drop_database(settings)
            result = {
                "processes": processes,
                "rows": predicted,
                "seconds": round(seconds, 1),
                "rows_per_min": round(predicted / seconds * 60),
                "peak_rss_mib": round(max(peaks), 1),
                "job_cpu_s": round(cpu, 1),
                # The machine is shared: the 1-minute load average says how busy it was.
                "load_avg": round(os.getloadavg()[0], 1),
                "insert_rows_per_min": round(args.rows / insert_s * 60),
            }
            print(f"{processes} job process(es): {result}", flush=True)
            if predicted != args.rows:
                raise SystemExit(f"only {predicted} of {args.rows} rows predicted")
            results.append(result)

    print()
    print(f"batch job, {args.rows:,} rows, chunk {base.chunk_size}, {base.threads} threads/process")
    print("processes  seconds   rows/min  peak RSS/process  job CPU s  load avg  insert rows/min")
    for r in results:
        print(
            f"{r['processes']:>9}  {r['seconds']:>7}  {r['rows_per_min']:>9,}"
            f"  {r['peak_rss_mib']:>12} MiB  {r['job_cpu_s']:>9}  {r['load_avg']:>8}"
            f"  {r['insert_rows_per_min']:>15,}"
        )
    print(json.dumps({"bench": "03_batch", "rows": args.rows, "results": results}))


if __name__ == "__main__":
    main()
