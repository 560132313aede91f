"""Bench: insert N Iris rows, then time `job.py --once` with 1 and with 2 processes.

Each configuration gets its own fresh database (batch_bench_<random>_<p>), dropped at the end.
Reports rows/min (wall time from starting the processes to the last exit, start-up included)
and the peak resident memory of each job process.
"""

import argparse
import csv
import dataclasses
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import db
from config import MODELS_DIR, Settings

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
    procs = []
    started = time.perf_counter()
    for i in range(processes):
        with open(logdir / f"{settings.mysql_database}_{i}.log", "w") as out:
            cmd = [sys.executable, "job.py", "--once"]
            procs.append(subprocess.Popen(cmd, cwd=HERE, env=env, stdout=out, stderr=out))
    watchdog = threading.Timer(TIMEOUT_S, lambda: [p.kill() for p in procs])
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
            return cur.fetchone()[0]
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts")
    args = parser.parse_args()
    base = Settings.from_env()
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
