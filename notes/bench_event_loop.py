"""Where inference runs in an async server: inline on the event loop, in a thread pool, or in a
process pool, and what each does to a cheap endpoint answered by the same server.

For each placement it starts a real server (Starlette + uvicorn, one process, in a subprocess on
a free port) and measures with an aiohttp client:
  - GET /iris: the microsecond Iris model 04 serves, one request at a time, nothing else running;
  - GET /health at concurrency 1 (one every 10 ms), first idle, then while one client keeps a
    slow GET /infer (an ImageNet model from chapter 05, on a fixed random image) always running.
Before the servers, it times the hop alone: the Iris model called directly, through a thread
pool (an executor; Starlette's run_in_threadpool) and through a process pool, no HTTP.

    ../.venv/bin/python bench_event_loop.py           # the full run, about 2 minutes
    ../.venv/bin/python bench_event_loop.py --quick   # the same code paths, tiny counts (CI)
    ../.venv/bin/python bench_event_loop.py serve --mode thread --model efficientnet_lite0
                                                      # one server alone (prints its port)

Prints a table per section and, as its last line, one JSON object of headline figures.
"""

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import aiohttp
import numpy as np
import onnxruntime as ort
import report
import uvicorn
from numpy.typing import NDArray
from report import table
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

HERE = Path(__file__).resolve().parent
MODELS = HERE.parent / "models"
IRIS = MODELS / "iris_svc.onnx"
IRIS_ROW = [[5.1, 3.5, 1.4, 0.2]]  # one setosa flower, as 04's /predict/test
MODES = ("inline", "thread", "process")
POOL_SIZE = 2  # 05's DECODE_THREADS and NUM_WORKERS default: one per core
PROBE_EVERY_S = 0.010  # /health is asked at most this often, each request after the last answer
SLOW_CLIENTS = 1  # /infer requests always in flight: one core busy, one left for the loop


@dataclass(frozen=True)
class Counts:
    """How much each measurement does; --quick keeps the code paths and shrinks these."""

    hop_calls: int
    iris_requests: int
    idle_s: float
    loaded_s: float
    models: tuple[str, ...]


FULL = Counts(5_000, 2_000, 3.0, 12.0, ("efficientnet_lite0", "resnet50"))
QUICK = Counts(500, 50, 0.3, 1.0, ("efficientnet_lite0",))


# --- the models, the same in the server, its worker processes and the hop timing ---


def open_session(path: Path) -> ort.InferenceSession:
    """05's classifier.py options: one intra-op thread, no spinning."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def random_image(session: ort.InferenceSession) -> NDArray[np.float32]:
    """A fixed random input of the model's shape (NCHW or NHWC, batch of 1): the cost of a
    convolution does not depend on the pixels."""
    shape = [d if isinstance(d, int) else 1 for d in session.get_inputs()[0].shape]
    return np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)


def classify(session: ort.InferenceSession, x: NDArray[np.float32]) -> int:
    (probabilities,) = session.run(["probabilities"], {"input": x})
    return int(np.argmax(probabilities[0]))


def iris_predict(session: ort.InferenceSession, rows: list[list[float]]) -> list[float]:
    (probabilities,) = session.run(["probabilities"], {"input": np.asarray(rows, np.float32)})
    row: list[float] = np.round(probabilities[0].astype(np.float64), 6).tolist()
    return row


# A process pool's workers cannot share the parent's sessions: each loads its own, once.
worker_sessions: dict[str, ort.InferenceSession] = {}


def load_in_worker(paths: dict[str, Path]) -> None:
    for name, path in paths.items():
        worker_sessions[name] = open_session(path)


def classify_in_worker(x: NDArray[np.float32]) -> int:
    return classify(worker_sessions["image"], x)


def iris_in_worker(rows: list[list[float]]) -> list[float]:
    return iris_predict(worker_sessions["iris"], rows)


def process_pool(paths: dict[str, Path]) -> ProcessPoolExecutor:
    # spawn, not fork: forking a process that already runs threads (onnxruntime's, the loop's)
    # can copy a lock held by a thread that does not exist in the child.
    return ProcessPoolExecutor(
        POOL_SIZE, mp.get_context("spawn"), initializer=load_in_worker, initargs=(paths,)
    )


# --- the server ---


def create_app(mode: str, model: str) -> Starlette:
    """GET /health, /iris and /infer; both models run `mode`: inline, thread or process."""
    image_path = MODELS / "imagenet" / f"{model}.onnx"

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        iris, image = open_session(IRIS), open_session(image_path)
        x = random_image(image)
        pool: Executor | None = None
        jobs: dict[str, Callable[[], object]]
        if mode == "process":
            pool = process_pool({"iris": IRIS, "image": image_path})
            # The input travels to the worker with every call (pickled), as an upload would.
            jobs = {
                "iris": partial(iris_in_worker, IRIS_ROW),
                "infer": partial(classify_in_worker, x),
            }
            # Start every worker (each loads both models) before the first measured request.
            loop = asyncio.get_running_loop()
            await asyncio.gather(
                *(loop.run_in_executor(pool, jobs["infer"]) for _ in range(POOL_SIZE))
            )
        else:
            if mode == "thread":
                pool = ThreadPoolExecutor(POOL_SIZE, thread_name_prefix="infer")
            jobs = {
                "iris": partial(iris_predict, iris, IRIS_ROW),
                "infer": partial(classify, image, x),
            }
        app.state.pool, app.state.jobs = pool, jobs
        try:
            yield
        finally:
            if pool is not None:
                pool.shutdown()

    async def run(request: Request, name: str) -> object:
        job: Callable[[], object] = request.app.state.jobs[name]
        pool: Executor | None = request.app.state.pool
        if pool is None:
            return job()  # inline: nothing else on this event loop runs until the model is done
        return await asyncio.get_running_loop().run_in_executor(pool, job)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def iris(request: Request) -> JSONResponse:
        return JSONResponse({"prediction": await run(request, "iris")})

    async def infer(request: Request) -> JSONResponse:
        return JSONResponse({"class": await run(request, "infer")})

    routes = [Route("/health", health), Route("/iris", iris), Route("/infer", infer)]
    return Starlette(routes=routes, lifespan=lifespan)


def serve(mode: str, model: str) -> None:
    """Bind a free port, print it, then serve on that very socket: no race for the port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    print(sock.getsockname()[1], flush=True)
    app = create_app(mode, model)
    # uvloop and httptools, as 04's services run; no access log, it would cost per request.
    config = uvicorn.Config(
        app, loop="uvloop", http="httptools", log_level="warning", access_log=False
    )
    uvicorn.Server(config).run(sockets=[sock])


# --- the client ---


def start_server(mode: str, model: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "serve", "--mode", mode, "--model", model],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: stopped with its pool's workers
    )


def stop_server(process: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.asynccontextmanager
async def running_server(mode: str, model: str, http: aiohttp.ClientSession) -> AsyncIterator[str]:
    """The server's base URL, once /health answers; the server is stopped on the way out."""
    process = start_server(mode, model)
    try:
        assert process.stdout is not None
        line = await asyncio.to_thread(process.stdout.readline)
        if not line.strip().isdigit():
            raise RuntimeError(f"server {mode}/{model} did not start (exit {process.poll()})")
        url = f"http://127.0.0.1:{int(line)}"
        deadline = time.monotonic() + 120
        while True:
            try:
                await get(http, url + "/health")
                break
            except aiohttp.ClientConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server {mode}/{model} never answered") from None
                await asyncio.sleep(0.1)
        yield url
    finally:
        stop_server(process)


async def get(http: aiohttp.ClientSession, url: str) -> float:
    """One GET, its body read; the seconds it took. Anything but 200 fails the run."""
    start = time.perf_counter()
    async with http.get(url) as response:
        await response.read()
        if response.status != 200:
            raise RuntimeError(f"GET {url}: HTTP {response.status}")
    return time.perf_counter() - start


async def one_at_a_time(http: aiohttp.ClientSession, url: str, n: int) -> list[float]:
    return [await get(http, url) for _ in range(n)]


async def probe(http: aiohttp.ClientSession, url: str, seconds: float) -> list[float]:
    """Concurrency 1: the next request PROBE_EVERY_S after the last one was sent, or at once
    if its answer came later than that."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    next_at = time.perf_counter()
    while next_at < deadline:
        latencies.append(await get(http, url))
        next_at = max(next_at + PROBE_EVERY_S, time.perf_counter())
        await asyncio.sleep(next_at - time.perf_counter())
    return latencies


async def keep_busy(http: aiohttp.ClientSession, url: str, stop: asyncio.Event) -> list[float]:
    """A client that sends the next slow request as soon as the last one is answered."""
    latencies: list[float] = []
    while not stop.is_set():
        latencies.append(await get(http, url))
    return latencies


@dataclass(frozen=True)
class Loaded:
    health: list[float]
    infer: list[float]
    infer_per_s: float


async def under_load(http: aiohttp.ClientSession, url: str, seconds: float) -> Loaded:
    stop = asyncio.Event()
    started = time.perf_counter()
    slow = [asyncio.create_task(keep_busy(http, url + "/infer", stop)) for _ in range(SLOW_CLIENTS)]
    await asyncio.sleep(0.5)  # the slow requests are under way before the first probe
    health = await probe(http, url + "/health", seconds)
    stop.set()
    infer = [x for latencies in await asyncio.gather(*slow) for x in latencies]
    return Loaded(health, infer, len(infer) / (time.perf_counter() - started))


# --- the hop alone, no HTTP ---


def timed_calls(call: Callable[[], object], n: int) -> list[float]:
    latencies = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - start)
    return latencies


async def timed_awaits(call: Callable[[], Awaitable[object]], n: int) -> list[float]:
    latencies = []
    for _ in range(n):
        start = time.perf_counter()
        await call()
        latencies.append(time.perf_counter() - start)
    return latencies


async def hop(n: int) -> dict[str, list[float]]:
    """The Iris model per call: called directly (what 04 does), then through a thread pool
    (an executor, as 05's proxy uses, and Starlette's run_in_threadpool), then a process pool."""
    session = open_session(IRIS)
    loop = asyncio.get_running_loop()
    direct = partial(iris_predict, session, IRIS_ROW)
    timed_calls(direct, 100)  # warm-up
    result = {"inline": timed_calls(direct, n)}
    with ThreadPoolExecutor(POOL_SIZE) as threads:
        await timed_awaits(lambda: loop.run_in_executor(threads, direct), 100)
        result["thread"] = await timed_awaits(lambda: loop.run_in_executor(threads, direct), n)
    # What a plain `def` endpoint gets from Starlette: anyio's worker threads (40 at most).
    await timed_awaits(lambda: run_in_threadpool(direct), 100)
    result["run_in_threadpool"] = await timed_awaits(lambda: run_in_threadpool(direct), n)
    with process_pool({"iris": IRIS}) as processes:
        remote = partial(iris_in_worker, IRIS_ROW)
        await timed_awaits(lambda: loop.run_in_executor(processes, remote), 100)
        result["process"] = await timed_awaits(lambda: loop.run_in_executor(processes, remote), n)
    return result


# --- tables ---


def pct(samples: list[float], q: int, scale: float = 1000) -> float:
    """The q-th percentile, in ms by default (with one sample, that sample)."""
    if len(samples) < 2:
        return round(scale * samples[0], 2)
    return round(scale * statistics.quantiles(samples, n=100, method="inclusive")[q - 1], 2)


def machine() -> str:
    return report.machine(f"onnxruntime {ort.__version__}", f"uvicorn {uvicorn.__version__}")


async def bench(counts: Counts) -> dict[str, object]:
    hops = await hop(counts.hop_calls)
    rows = [[mode, pct(x, 50, 1e6), pct(x, 99, 1e6), round(1e6 * statistics.fmean(x), 1)]
            for mode, x in hops.items()]  # fmt: skip
    table(
        f"1. The Iris model, {counts.hop_calls} calls one at a time, no HTTP (microseconds)",
        ["called", "p50 us", "p99 us", "mean us"],
        rows,
    )
    result: dict[str, object] = {
        "hop_us_p50": {mode: row[1] for mode, row in zip(hops, rows, strict=True)}
    }

    timeout = aiohttp.ClientTimeout(total=120)
    iris: dict[str, dict[str, float]] = {}
    health: dict[str, dict[str, dict[str, float]]] = {}
    async with aiohttp.ClientSession(timeout=timeout) as http:
        for model in counts.models:
            health[model] = {}
            for mode in MODES:
                async with running_server(mode, model, http) as url:
                    if model == counts.models[0]:
                        await one_at_a_time(http, url + "/iris", 50)  # warm-up
                        x = await one_at_a_time(http, url + "/iris", counts.iris_requests)
                        iris[mode] = {"p50_ms": pct(x, 50), "p99_ms": pct(x, 99)}
                    idle = await probe(http, url + "/health", counts.idle_s)
                    loaded = await under_load(http, url, counts.loaded_s)
                health[model][mode] = {
                    "idle_p50_ms": pct(idle, 50),
                    "idle_p99_ms": pct(idle, 99),
                    "loaded_p50_ms": pct(loaded.health, 50),
                    "loaded_p99_ms": pct(loaded.health, 99),
                    "loaded_max_ms": round(1000 * max(loaded.health), 2),
                    "infer_p50_ms": pct(loaded.infer, 50),
                    "infer_per_s": round(loaded.infer_per_s, 1),
                }
    table(
        f"2. GET /iris, {counts.iris_requests} requests one at a time, nothing else running",
        ["model runs", "p50 ms", "p99 ms"],
        [[mode, v["p50_ms"], v["p99_ms"]] for mode, v in iris.items()],
    )
    for model, by_mode in health.items():
        table(
            f"3. GET /health at concurrency 1 (every {1000 * PROBE_EVERY_S:.0f} ms), idle, then"
            f" while {SLOW_CLIENTS} client keeps GET /infer ({model}) running",
            [
                "model runs",
                "idle p50",
                "idle p99",
                "p50 ms",
                "p99 ms",
                "max ms",
                "/infer p50",
                "/infer/s",
            ],
            [[mode, *v.values()] for mode, v in by_mode.items()],
        )
    result["iris_http"] = iris
    result["health"] = health
    return result


def load() -> float:
    """The 1-minute load average: other programs' work on this shared machine shows here."""
    return round(os.getloadavg()[0], 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts: checks it runs")
    commands = parser.add_subparsers(dest="command")
    one = commands.add_parser("serve", help="run one server (the benchmark starts these itself)")
    one.add_argument("--mode", choices=MODES, default="inline")
    one.add_argument(
        "--model", choices=("efficientnet_lite0", "resnet50"), default="efficientnet_lite0"
    )
    args = parser.parse_args()
    if args.command == "serve":
        serve(args.mode, args.model)
        return 0
    counts = QUICK if args.quick else FULL
    start_load = load()
    started = time.perf_counter()
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"bench_event_loop {'--quick ' if args.quick else ''}{when}, {machine()}")
    print(f"load average at the start: {start_load}")
    result: dict[str, object] = {"quick": args.quick, "when": when, "machine": machine()}
    result.update(asyncio.run(bench(counts)))
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["load_average_start_end"] = [start_load, load()]
    print(f"\ntook {result['seconds']} s")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
