"""Threads, processes and onnxruntime's own threads, measured on this machine.

1. The GIL: pure-Python work in 2 threads against 1 thread and 2 processes; numpy's matmul and
   onnxruntime in 2 threads, which release the GIL while they compute.
2. intra_op_num_threads against more processes, with chapter 05's two ImageNet models.
3. A thread pool's size against throughput and latency, with 16 requests always in flight.

    ../.venv/bin/python bench_threads.py           # the full run, about 4 minutes
    ../.venv/bin/python bench_threads.py --quick   # the same code paths, tiny counts (CI)

Every measurement runs for a fixed time after a warm-up and counts the calls that finished.
Prints a table per section and, as its last line, one JSON object of headline figures.
"""

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import queue
import statistics
import sys
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnxruntime as ort
import report
from report import table
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

HERE = Path(__file__).resolve().parent
MODELS = HERE.parent / "models" / "imagenet"
IMAGE_MODELS = ("efficientnet_lite0", "resnet50")  # 05's fast (proxy) and accurate (worker) model
PROXY_MODEL = "efficientnet_lite0"
PYTHON_LOOPS = 100_000  # one call of the pure-Python task: a few milliseconds
MATMUL_SIZE = 512  # one 512x512 float32 matmul: a few milliseconds on one core
POOL_CLIENTS = 16  # requests in flight at once in section 3
POOL_SIZES = (1, 2, 4, 16)


@dataclass(frozen=True)
class Timing:
    """One worker's timed loop: calls finished, seconds spent, each call's latency."""

    calls: int
    seconds: float
    latencies: list[float]

    @property
    def rate(self) -> float:
        return self.calls / self.seconds


@dataclass(frozen=True)
class Counts:
    """How long each measurement runs; --quick keeps the code paths and shrinks these."""

    gil_s: float
    model_s: dict[str, float]
    pool_s: float
    models: tuple[str, ...]
    rounds: int  # each figure is the median of this many rounds, run in turn


FULL = Counts(2.0, {"efficientnet_lite0": 3.0, "resnet50": 5.0}, 4.0, IMAGE_MODELS, 3)
QUICK = Counts(0.3, {"efficientnet_lite0": 0.5}, 0.5, (PROXY_MODEL,), 1)
K = TypeVar("K")
R = TypeVar("R")


def python_task() -> int:
    """Pure Python: every step is bytecode, so the thread holds the GIL the whole time."""
    total = 0
    for i in range(PYTHON_LOOPS):
        total += i * i % 7
    return total


def open_session(name: str, intra_threads: int) -> ort.InferenceSession:
    """The session options of 05's classifier.py, with a chosen intra_op_num_threads."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_threads
    options.inter_op_num_threads = 1
    # Idle intra-op threads sleep instead of spinning: on 2 shared cores spinning steals CPU.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    path = MODELS / f"{name}.onnx"
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def model_task(name: str, intra_threads: int) -> Callable[[], object]:
    """One image through the model; a fixed random 224x224 input (the cost does not depend on
    the pixels)."""
    session = open_session(name, intra_threads)
    spec = session.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in spec.shape]  # the batch axis is dynamic
    feed = {spec.name: np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)}
    return lambda: session.run(None, feed)


def make_task(name: str, intra_threads: int = 1) -> Callable[[], object]:
    if name == "python":
        return python_task
    if name == "numpy":
        rng = np.random.default_rng(0)
        a = rng.standard_normal((MATMUL_SIZE, MATMUL_SIZE), dtype=np.float32)
        b = rng.standard_normal((MATMUL_SIZE, MATMUL_SIZE), dtype=np.float32)
        return lambda: a @ b
    return model_task(name, intra_threads)


def limit_blas() -> None:
    """numpy's OpenBLAS starts one thread per core: pinned to 1 so that "2 threads" means 2
    cores, not 4 threads fighting over 2."""
    threadpool_limits(limits=1, user_api="blas")


def timed_loop(task: Callable[[], object], seconds: float) -> Timing:
    latencies: list[float] = []
    start = now = time.perf_counter()
    deadline = start + seconds
    while now < deadline:
        task()
        after = time.perf_counter()
        latencies.append(after - now)
        now = after
    return Timing(len(latencies), now - start, latencies)


def in_threads(task: Callable[[], object], workers: int, seconds: float) -> list[Timing]:
    """`workers` threads of one process call the same task (one shared session, as 05's proxy
    shares its model between its pool's threads)."""
    task()  # warm-up: the first call allocates
    with ThreadPoolExecutor(workers) as pool:
        barrier = threading.Barrier(workers)

        def work() -> Timing:
            barrier.wait()
            return timed_loop(task, seconds)

        futures = [pool.submit(work) for _ in range(workers)]
        return [f.result() for f in futures]


def process_main(
    name: str,
    intra: int,
    seconds: float,
    barrier: Barrier,
    results: "Queue[tuple[int, float, list[float]]]",
) -> None:
    """One worker process: build its own task (its own session), warm up, start with the others."""
    limit_blas()
    task = make_task(name, intra)
    task()
    barrier.wait(timeout=120)
    t = timed_loop(task, seconds)
    results.put((t.calls, t.seconds, t.latencies))


def in_processes(name: str, workers: int, seconds: float, intra: int = 1) -> list[Timing]:
    """`workers` processes, each with its own copy of the task; started by spawn, like 05's
    worker, and stopped by their own handles if anything goes wrong."""
    context = mp.get_context("spawn")
    barrier = context.Barrier(workers)
    results: Queue[tuple[int, float, list[float]]] = context.Queue()
    processes = [
        context.Process(target=process_main, args=(name, intra, seconds, barrier, results))
        for _ in range(workers)
    ]
    try:
        for p in processes:
            p.start()
        timings: list[Timing] = []
        deadline = time.monotonic() + seconds + 180
        while len(timings) < workers:
            try:
                calls, spent, latencies = results.get(timeout=1)
            except queue.Empty:
                # A worker that died (a missing model, say) fails the run now, not at the deadline.
                failed = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
                if failed or time.monotonic() > deadline:
                    raise RuntimeError(f"{name}: worker processes failed ({failed})") from None
                continue
            timings.append(Timing(calls, spent, latencies))
        for p in processes:
            p.join(timeout=30)
            if p.exitcode != 0:
                raise RuntimeError(f"{name}: worker process exited with {p.exitcode}")
        return timings
    finally:
        for p in processes:
            if p.is_alive():
                p.kill()
                p.join()


def in_rounds(
    measures: Mapping[K, Callable[[], R]], rounds: int, rate: Callable[[R], float]
) -> dict[K, R]:
    """Every measurement `rounds` times, in turn (a b c a b c ...), keeping each one's median
    round by rate: a burst of other work on this shared machine then spoils one round of each
    measurement, not every round of one."""
    results: dict[K, list[R]] = {key: [] for key in measures}
    for _ in range(rounds):
        for key, measure in measures.items():
            results[key].append(measure())
    return {key: sorted(runs, key=rate)[len(runs) // 2] for key, runs in results.items()}


def ms(seconds: float) -> float:
    return round(1000 * seconds, 2)


def pct(samples: list[float], q: int) -> float:
    """The q-th percentile in ms (inclusive method; with one sample, that sample)."""
    if len(samples) < 2:
        return ms(samples[0])
    return ms(statistics.quantiles(samples, n=100, method="inclusive")[q - 1])


def total_rate(timings: list[Timing]) -> float:
    return sum(t.rate for t in timings)


def all_latencies(timings: list[Timing]) -> list[float]:
    return [x for t in timings for x in t.latencies]


def gil(counts: Counts) -> dict[str, dict[str, float]]:
    """The same task in 1 thread, 2 threads of one process, and 2 processes: calls per second."""
    rows: list[list[object]] = []
    figures: dict[str, dict[str, float]] = {}
    for name in ("python", "numpy", PROXY_MODEL):
        task = make_task(name)
        measures: dict[str, Callable[[], list[Timing]]] = {
            "1 thread": partial(in_threads, task, 1, counts.gil_s),
            "2 threads": partial(in_threads, task, 2, counts.gil_s),
            "2 processes": partial(in_processes, name, 2, counts.gil_s),
        }
        runs = in_rounds(measures, counts.rounds, total_rate)
        base = total_rate(runs["1 thread"])
        figures[name] = {"calls_per_s_1_thread": round(base, 1)}
        for how, timings in runs.items():
            rate = total_rate(timings)
            lat = all_latencies(timings)
            speedup = round(rate / base, 2)
            rows.append([name, how, round(rate, 1), f"{speedup}x", pct(lat, 50), pct(lat, 99)])
            if how != "1 thread":
                figures[name][f"speedup_{how.replace(' ', '_')}"] = speedup
    table(
        "1. The GIL: the same task in threads and processes",
        ["task", "run as", "calls/s", "vs 1 thread", "call p50 ms", "call p99 ms"],
        rows,
    )
    return figures


def intra_vs_processes(counts: Counts) -> dict[str, dict[str, dict[str, float]]]:
    """Processes x intra_op_num_threads with 05's models; 2 x 2 asks for 4 threads on 2 cores."""
    rows: list[list[object]] = []
    figures: dict[str, dict[str, dict[str, float]]] = {}
    for name in counts.models:
        figures[name] = {}
        seconds = counts.model_s[name]
        configs = ((1, 1), (1, 2), (2, 1), (2, 2))
        measures = {c: partial(in_processes, name, c[0], seconds, c[1]) for c in configs}
        for (processes, intra), timings in in_rounds(measures, counts.rounds, total_rate).items():
            lat = all_latencies(timings)
            rate = round(total_rate(timings), 1)
            p50, p99 = pct(lat, 50), pct(lat, 99)
            rows.append([name, processes, intra, processes * intra, rate, p50, p99])
            figures[name][f"{processes}x{intra}"] = {"images_per_s": rate, "p50_ms": p50}
    table(
        "2. intra_op_num_threads or more processes (one image per call)",
        ["model", "processes", "intra_op", "threads", "images/s", "image p50 ms", "p99 ms"],
        rows,
    )
    return figures


async def through_pool(
    task: Callable[[], object], size: int, clients: int, seconds: float
) -> tuple[float, list[float], list[float]]:
    """`clients` requests always in flight (each sends the next when its answer arrives), every
    one run in a pool of `size` threads; returns images/s, latencies, time inside the model."""
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    in_model: list[float] = []

    def timed() -> float:
        start = time.perf_counter()
        task()
        return time.perf_counter() - start

    with ThreadPoolExecutor(size) as pool:
        await asyncio.gather(*(loop.run_in_executor(pool, task) for _ in range(size)))  # warm-up
        start = time.perf_counter()
        deadline = start + seconds

        async def client() -> None:
            while time.perf_counter() < deadline:
                sent = time.perf_counter()
                in_model.append(await loop.run_in_executor(pool, timed))
                latencies.append(time.perf_counter() - sent)

        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return len(latencies) / elapsed, latencies, in_model


def pool_size(counts: Counts) -> dict[str, dict[str, float]]:
    task = make_task(PROXY_MODEL)
    rows: list[list[object]] = []
    figures: dict[str, dict[str, float]] = {}

    def measure(size: int) -> tuple[float, list[float], list[float]]:
        return asyncio.run(through_pool(task, size, POOL_CLIENTS, counts.pool_s))

    measures = {size: partial(measure, size) for size in POOL_SIZES}
    for size, (rate, lat, in_model) in in_rounds(measures, counts.rounds, lambda r: r[0]).items():
        model_ms, mean_ms = ms(statistics.fmean(in_model)), ms(statistics.fmean(lat))
        p50, p99 = pct(lat, 50), pct(lat, 99)
        little = ms(POOL_CLIENTS / rate)  # Little's law: in flight / throughput
        rows.append([size, round(rate, 1), p50, p99, mean_ms, little, model_ms])
        figures[str(size)] = {"images_per_s": round(rate, 1), "p50_ms": p50, "p99_ms": p99}
        figures[str(size)]["in_model_ms"] = model_ms
    table(
        f"3. Thread pool size: {POOL_CLIENTS} requests in flight, {PROXY_MODEL}, intra_op 1",
        [
            "pool",
            "images/s",
            "p50 ms",
            "p99 ms",
            "mean ms",
            f"{POOL_CLIENTS}/rate ms",
            "in model ms",
        ],
        rows,
    )
    return figures


def machine() -> str:
    return report.machine(f"onnxruntime {ort.__version__}", f"numpy {np.__version__}")


def load() -> float:
    """The 1-minute load average: other programs' work on this shared machine shows here."""
    return round(os.getloadavg()[0], 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts: checks it runs")
    args = parser.parse_args()
    counts = QUICK if args.quick else FULL
    limit_blas()
    start_load = load()
    started = time.perf_counter()
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"bench_threads {'--quick ' if args.quick else ''}{when}, {machine()}")
    print(f"load average at the start: {load()}; each figure: the median of {counts.rounds} rounds")
    result = {
        "quick": args.quick,
        "when": when,
        "machine": machine(),
        "gil": gil(counts),
        "intra_vs_processes": intra_vs_processes(counts),
        "pool_size": pool_size(counts),
    }
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["load_average_start_end"] = [start_load, load()]
    print(f"\ntook {result['seconds']} s")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
