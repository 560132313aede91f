"""Benchmark: REST and gRPC Predict against the local server, at concurrency 1 and 50.

Starts local_serving.py on free ports (with --enable_batching, as `make run` does), sends one
Iris row per request from this process (aiohttp for REST, grpc.aio for gRPC), and prints a
table, then one JSON line with the headline figures. Bounded: each run stops at its request
count or its time limit, whichever comes first.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads (make_tensor_proto)

import aiohttp  # noqa: E402
import grpc  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests"))
from conftest import start_local_server, stop  # noqa: E402
from grpc_client import predict_request  # noqa: E402

ROW = [[5.1, 3.5, 1.4, 0.2]]
RUNS = [  # (protocol, concurrency, requests, seconds)
    ("rest", 1, 1500, 15),
    ("rest", 50, 15000, 20),
    ("grpc", 1, 1500, 15),
    ("grpc", 50, 15000, 20),
]
WARMUP = 300
BATCHING_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "batching.config")
MONITORING_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "monitoring.config")


@dataclass
class Result:
    protocol: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


Measured = tuple[list[float], int, float]  # latencies (ms), errors, seconds taken


async def drive(
    send: Callable[[], Awaitable[None]], concurrency: int, requests: int, seconds: float
) -> Measured:
    """`concurrency` workers call send() back to back until the count or the time is used up."""
    latencies: list[float] = []
    errors = 0
    remaining = requests
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal remaining, errors
        while remaining > 0 and time.perf_counter() < deadline:
            remaining -= 1
            start = time.perf_counter()
            try:
                await send()
            except (aiohttp.ClientError, grpc.RpcError, AssertionError):
                errors += 1
                continue
            latencies.append((time.perf_counter() - start) * 1000)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - began


async def bench_rest(
    host: str, port: int, concurrency: int, requests: int, seconds: float
) -> Measured:
    url = f"http://{host}:{port}/v1/models/iris:predict"
    body = json.dumps({"instances": ROW}).encode()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def send() -> None:
            async with session.post(url, data=body) as response:
                await response.read()
                assert response.status == 200

        await drive(send, concurrency, WARMUP, 30)
        return await drive(send, concurrency, requests, seconds)


async def bench_grpc(
    host: str, port: int, concurrency: int, requests: int, seconds: float
) -> Measured:
    request = predict_request("iris", ROW)
    async with grpc.aio.insecure_channel(f"{host}:{port}") as channel:
        predict = channel.unary_unary(
            "/tensorflow.serving.PredictionService/Predict",
            request_serializer=type(request).SerializeToString,
            response_deserializer=lambda b: b,
        )

        async def send() -> None:
            await predict(request, timeout=30)

        await drive(send, concurrency, WARMUP, 30)
        return await drive(send, concurrency, requests, seconds)


def main() -> int:
    gc.freeze()  # TensorFlow is loaded here too: keep full collections out of the latencies
    # `bench.py --no-metrics rest`: without the monitoring page and its HTTP middleware (the
    # overhead's baseline; TensorFlow Serving's own counts are kept either way), REST runs only.
    metrics = [] if "--no-metrics" in sys.argv else [f"--monitoring_config_file={MONITORING_FILE}"]
    only = [arg for arg in sys.argv[1:] if arg in ("rest", "grpc")] or ["rest", "grpc"]
    process, server = start_local_server(
        "--enable_batching", f"--batching_parameters_file={BATCHING_FILE}", *metrics
    )
    results = []
    try:
        for protocol, concurrency, requests, seconds in [r for r in RUNS if r[0] in only]:
            bench = bench_rest if protocol == "rest" else bench_grpc
            port = server.rest_port if protocol == "rest" else server.grpc_port
            latencies, errors, elapsed = asyncio.run(
                bench(server.host, port, concurrency, requests, seconds)
            )
            result = Result(protocol, concurrency, len(latencies), errors, elapsed, latencies)
            print(f"{protocol} c={concurrency}: {result.rps:.0f} req/s", file=sys.stderr)
            results.append(result)
    finally:
        stop(process)

    load = os.getloadavg()[0]
    page = "monitoring page on" if metrics else "no monitoring page"
    print(f"local_serving.py with batching, {page}; {os.cpu_count()} cores, load {load:.1f}")
    print(f"{'protocol':<9}{'conc.':>6}{'requests':>10}{'errors':>8}{'req/s':>9}"
          f"{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}")  # fmt: skip
    for r in results:
        print(f"{r.protocol:<9}{r.concurrency:>6}{r.requests:>10}{r.errors:>8}{r.rps:>9.0f}"
              f"{r.percentile(50):>9.2f}{r.percentile(99):>9.2f}"
              f"{statistics.fmean(r.latencies_ms):>9.2f}")  # fmt: skip
    by = {(r.protocol, r.concurrency): r for r in results}
    headline: dict[str, object] = {
        f"{r.protocol}_c{r.concurrency}": {
            "rps": round(r.rps),
            "p50_ms": round(r.percentile(50), 2),
            "p99_ms": round(r.percentile(99), 2),
            "errors": r.errors,
        }
        for r in results
    }
    if ("rest", 50) in by and ("grpc", 1) in by:
        rest50, grpc1 = by[("rest", 50)], by[("grpc", 1)]
        headline["goals"] = {
            "rest_c50_rps_ge_1500": rest50.rps >= 1500,
            "rest_c50_p99_lt_40ms": rest50.percentile(99) < 40,
            "grpc_c1_p50_lt_3ms": grpc1.percentile(50) < 3,
        }
    headline["load_average_1min"] = round(load, 2)
    print(json.dumps(headline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
