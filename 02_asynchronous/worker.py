"""The background side: take jobs from Redis, predict them in batches over gRPC, store results.

    python worker.py            # NUM_WORKERS processes, each running the loop below

One loop per process: block on the queue (BLMOVE, no polling), take up to BATCH_SIZE jobs,
send them to TensorFlow Serving as one Predict call, store every result, repeat. A reaper task
beside the loop hands jobs of dead workers back to the queue.

Metrics (Prometheus text) on METRICS_PORT: served by the one process, or with NUM_WORKERS > 1
by the supervisor, which adds up its processes' files (prometheus-client's multiprocess mode).
"""

import asyncio
import contextlib
import ctypes
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from multiprocessing.context import SpawnProcess
from pathlib import Path
from types import FrameType
from wsgiref.simple_server import WSGIServer

import numpy as np
import uvloop
from config import Settings, setup_logging
from jobs import Finished, JobStatus, JobStore, validate_rows
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from tfserving import InferenceError, TFServingClient, Unreachable

log = logging.getLogger("worker")

BLOCK_SECONDS = 1.0  # how long one BLMOVE waits; bounds how late a SIGTERM is noticed
MAX_BACKOFF = 5.0  # cap of the reconnect delays (Redis, TensorFlow Serving)
RESTART_DELAY = 1.0  # least time between two starts of a supervised worker in one slot
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# Submit to completed: milliseconds when idle, minutes behind a backlog or a reaped claim.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
ATTEMPT_BUCKETS = (1, 2, 3, 4, 5, 10)  # claims per job: 1 unless a worker died or hung
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096, 32768)  # rows per Predict call


class WorkerMetrics:
    """One worker process's metrics. Under the supervisor (multiprocess mode: it sets
    PROMETHEUS_MULTIPROC_DIR before it starts the process) each value lives in this process's
    files, which outlive a SIGKILL, and `registry` is None."""

    def __init__(self, registry: CollectorRegistry | None):
        self.finished = Counter(
            "jobs_finished_total", "Jobs given their final status", ["status"], registry=registry
        )
        for status in (JobStatus.COMPLETED, JobStatus.FAILED):
            self.finished.labels(status)  # present at 0 from the start, so rate() sees the first
        self.latency = Histogram(
            "job_latency_seconds",
            "Submit to completed, both by Redis's clock",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.attempts = Histogram(
            "job_attempts",
            "Claims a job took until its final status",
            buckets=ATTEMPT_BUCKETS,
            registry=registry,
        )
        self.reaped = Counter(
            "jobs_reaped_total",
            "Claims past VISIBILITY_TIMEOUT given back to the queue (worker died or hung)",
            registry=registry,
        )
        self.predict = Histogram(
            "tf_serving_predict_duration_seconds",
            "One Predict call to TensorFlow Serving, answered or not",
            registry=registry,
        )
        self.batch = Histogram(
            "tf_serving_predict_batch_size",
            "Rows sent in one Predict call",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )

    def count(self, finished: list[Finished]) -> None:
        """Jobs this process stored: FINISH returns only those it still held, so a job is
        counted by one worker only, even when a reaped job's first worker answers late."""
        for job in finished:
            self.finished.labels(job.status).inc()
            self.attempts.observe(job.claims)
            if job.status == JobStatus.COMPLETED and job.latency is not None:
                self.latency.observe(job.latency)


class SupervisorMetrics:
    """What only the supervisor knows, added at each scrape. A collector, not a Counter: with
    PROMETHEUS_MULTIPROC_DIR already set at import, a Counter here would also be in the files."""

    restarts = 0

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "worker_restarts_total", "Worker processes found dead and replaced", self.restarts
        )


class Interrupted(Exception):
    """SIGTERM arrived while a batch was waiting to be retried."""


def split_rows(probabilities: np.ndarray, inputs: list[list[list[float]]]) -> list[np.ndarray]:
    """The model's answer for the whole batch, cut back into one array per job."""
    sizes = [len(rows) for rows in inputs]
    if probabilities.ndim != 2 or len(probabilities) != sum(sizes):
        # Never store a shifted answer: with rows missing, every later job would get another's.
        raise InferenceError(
            f"the model answered shape {list(probabilities.shape)} for {sum(sizes)} rows"
        )
    return np.split(probabilities, np.cumsum(sizes)[:-1])


class Backoff:
    """Exponential delays: first, 2*first, ... up to MAX_BACKOFF; reset after a success."""

    def __init__(self, first: float):
        self.first = first
        self.delay = first

    def next(self) -> float:
        delay, self.delay = self.delay, min(self.delay * 2, MAX_BACKOFF)
        return delay

    def reset(self) -> None:
        self.delay = self.first


async def pause(stop: asyncio.Event, seconds: float) -> None:
    """Sleep, but wake at once on SIGTERM."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


class Worker:
    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        model: TFServingClient,
        labels: list[str],
        metrics: WorkerMetrics,
    ):
        self.settings = settings
        self.store = store
        self.model = model
        self.labels = labels
        self.metrics = metrics

    async def run(self, stop: asyncio.Event) -> None:
        reaper = asyncio.create_task(self.reap_forever(stop))
        redis_backoff = Backoff(0.1)
        tf_backoff = Backoff(0.2)
        while not stop.is_set():
            try:
                batch = await self.store.claim(self.settings.batch_size, BLOCK_SECONDS)
                redis_backoff.reset()
                if batch.given_up:  # failed by the CLAIM script (data expired, MAX_CLAIMS)
                    self.metrics.finished.labels(JobStatus.FAILED).inc(batch.given_up)
                if batch and not await self.process(batch, stop):
                    await pause(stop, tf_backoff.next())  # TF Serving is down: let it come back
                elif batch:
                    tf_backoff.reset()
            except RedisError as e:
                delay = redis_backoff.next()
                log.warning("redis unavailable, retrying", extra={"error": str(e), "in_s": delay})
                await pause(stop, delay)
            except Exception:  # never die for one batch: its jobs are reaped, their attempts count
                log.exception("unexpected error, going on")
                await pause(stop, redis_backoff.next())
        reaper.cancel()
        log.info("worker stopped")

    async def process(self, batch: list[tuple[str, str]], stop: asyncio.Event) -> bool:
        """Predict and store one batch. False if the jobs went back to the queue instead."""
        started = time.perf_counter()
        outcomes = []
        ids, inputs = [], []
        for job_id, data in batch:
            try:  # the worker does not trust the queue: anyone can LPUSH to Redis
                inputs.append(validate_rows(json.loads(data)))
                ids.append(job_id)
            except (ValueError, RecursionError) as e:  # bad JSON, nested too deep, InvalidInput
                reason = str(e) if isinstance(e, ValueError) else "nested too deeply"
                outcomes.append((job_id, JobStatus.FAILED, f"invalid job data: {reason}"))
        if ids:
            try:
                outcomes += await self.outcomes(ids, inputs, stop)
            except (Unreachable, Interrupted) as e:
                returned = await self.store.requeue(ids)
                log.warning("jobs returned to the queue", extra={"jobs": returned, "why": str(e)})
                self.metrics.count(await self.store.finish(outcomes))
                return False
        stored = await self.store.finish(outcomes)
        self.metrics.count(stored)
        log.info(
            "batch done",
            extra={
                "jobs": len(batch),
                "stored": len(stored),
                "failed": sum(status == JobStatus.FAILED for _, status, _ in outcomes),
                "ms": round((time.perf_counter() - started) * 1000, 1),
            },
        )
        return True

    async def outcomes(
        self, ids: list[str], inputs: list[list[list[float]]], stop: asyncio.Event
    ) -> list[tuple[str, JobStatus, str]]:
        """(id, status, result or error) for each job of the batch."""
        try:
            probabilities = split_rows(await self.predict(inputs, stop), inputs)
            return [
                (job_id, JobStatus.COMPLETED, self.describe(probs))
                for job_id, probs in zip(ids, probabilities, strict=True)
            ]
        except InferenceError as e:
            return [(job_id, JobStatus.FAILED, str(e)) for job_id in ids]
        except (Unreachable, Interrupted):
            raise
        except Exception as e:  # a bug, or an answer we cannot read: find the job it belongs to
            if len(ids) == 1:
                log.exception("job failed in the worker", extra={"job_id": ids[0]})
                return [(ids[0], JobStatus.FAILED, f"worker error ({type(e).__name__})")]
            log.warning("batch failed, retrying its jobs one by one", extra={"jobs": len(ids)})
            outcomes = []
            for job_id, rows in zip(ids, inputs, strict=True):
                outcomes += await self.outcomes([job_id], [rows], stop)
            return outcomes

    async def predict(self, inputs: list[list[list[float]]], stop: asyncio.Event) -> np.ndarray:
        """One Predict call for the whole batch; inference errors are retried with backoff."""
        rows = np.array([row for job in inputs for row in job], dtype=np.float32)
        backoff = Backoff(self.settings.retry_backoff)
        for attempt in range(1, self.settings.max_attempts + 1):
            try:
                self.metrics.batch.observe(len(rows))
                with self.metrics.predict.time():
                    return await self.model.predict(rows)
            except InferenceError as e:
                if attempt == self.settings.max_attempts:
                    raise InferenceError(f"{e} (after {attempt} attempts)") from e
                delay = backoff.next()
                log.warning("predict failed, retrying", extra={"attempt": attempt, "error": str(e)})
                await pause(stop, delay)
                if stop.is_set():
                    raise Interrupted("worker stopping") from e
        raise AssertionError("unreachable")

    def describe(self, probabilities: np.ndarray) -> str:
        """The stored result: one {prediction, class_name, probabilities} per row, as JSON."""
        result = []
        for row in probabilities:
            index = int(np.argmax(row))
            result.append(
                {
                    "prediction": index,
                    "class_name": self.labels[index],
                    "probabilities": [round(float(p), 6) for p in row],
                }
            )
        return json.dumps(result)

    async def reap_forever(self, stop: asyncio.Event) -> None:
        every = max(self.settings.visibility_timeout / 4, 0.5)
        while not stop.is_set():
            await pause(stop, every)
            try:
                if n := await self.store.reap(self.settings.visibility_timeout):
                    # REAP moves each job at most once, however many reapers run: counted once.
                    self.metrics.reaped.inc(n)
                    log.warning("requeued jobs past the visibility timeout", extra={"jobs": n})
            except RedisError:
                pass  # the main loop reports Redis trouble and backs off


async def serve(settings: Settings, metrics: WorkerMetrics) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    labels_by_index = json.loads(Path(settings.labels_path).read_text())
    labels = [labels_by_index[str(i)] for i in range(len(labels_by_index))]
    # No client-side retries: the loop above backs off and says so in the log.
    redis = Redis.from_url(
        settings.redis_url,
        password=settings.redis_password,
        decode_responses=True,
        socket_connect_timeout=2,
        socket_timeout=BLOCK_SECONDS + 5,
        retry=Retry(NoBackoff(), 0),
    )
    model = TFServingClient(
        f"{settings.tf_serving_host}:{settings.tf_serving_grpc_port}",
        settings.model_name,
        settings.predict_timeout,
    )
    store = JobStore(redis, settings.queue, settings.job_ttl, max_claims=settings.max_claims)
    log.info("worker started", extra={"pid": os.getpid(), "batch_size": settings.batch_size})
    try:
        await Worker(settings, store, model, labels, metrics).run(stop)
    finally:
        await model.close()
        await redis.aclose()


def run_one(settings: Settings) -> None:
    """NUM_WORKERS=1: this process is the worker and serves its own metrics."""
    setup_logging(settings.log_level)
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    server, _ = start_http_server(settings.metrics_port, settings.host, registry=registry)
    try:
        uvloop.run(serve(settings, metrics))
    finally:
        server.shutdown()


def run_supervised(settings: Settings, supervisor: int) -> None:
    """A worker process under supervise(): it gets SIGTERM when the supervisor dies, even by
    SIGKILL, so no worker outlives it (Linux's PR_SET_PDEATHSIG; elsewhere, not enforced)."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != supervisor:  # it died before prctl took effect
        return
    setup_logging(settings.log_level)
    uvloop.run(serve(settings, WorkerMetrics(registry=None)))  # counted in files, served above


def serve_metrics(settings: Settings, directory: Path) -> tuple[SupervisorMetrics, WSGIServer]:
    """One scrape target for all NUM_WORKERS processes: their files added up, plus restarts."""
    # Files of an earlier run (a restarted container keeps its directory) would add old counts.
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    # Read by prometheus-client in every process started from now on (spawn: a fresh import).
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    own = SupervisorMetrics()
    registry.register(own)
    server, _ = start_http_server(settings.metrics_port, settings.host, registry=registry)
    return own, server


def supervise(settings: Settings) -> None:
    """Keep NUM_WORKERS worker processes running until SIGTERM; forward it; exit with theirs."""
    # Several processes, not threads: each has its own event loop and its own core.
    setup_logging(settings.log_level)
    ctx = multiprocessing.get_context("spawn")
    stopping = False
    directory = settings.metrics_dir or Path(tempfile.mkdtemp(prefix="02-worker-metrics-"))
    own, server = serve_metrics(settings, directory)

    def start() -> SpawnProcess:
        proc = ctx.Process(target=run_supervised, args=(settings, os.getpid()))
        proc.start()
        return proc

    def forward(signum: int) -> None:
        for proc in procs:
            # exitcode is None: not reaped yet, so the pid is still this child's and not some
            # other process's that reused it. (A zombie takes the signal harmlessly.)
            if proc.exitcode is None and proc.pid is not None:  # a pid: started
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signum)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        forward(signum)

    procs = [start() for _ in range(settings.num_workers)]
    started = [time.monotonic()] * len(procs)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the children directly
    while not stopping:
        multiprocessing.connection.wait([proc.sentinel for proc in procs])
        for slot, proc in enumerate(procs):
            if proc.exitcode is None or stopping:
                continue
            log.warning(
                "worker exited, starting another",
                extra={"pid": proc.pid, "exitcode": proc.exitcode},
            )
            # Removes only live-gauge files (there are none): its counts stay in the sum.
            mark_process_dead(proc.pid, str(directory))
            own.restarts += 1
            # A worker that dies at start-up is restarted once per RESTART_DELAY, not in a spin.
            time.sleep(max(0.0, started[slot] + RESTART_DELAY - time.monotonic()))
            if not stopping:
                procs[slot], started[slot] = start(), time.monotonic()
    forward(signal.SIGTERM)  # again: for a child started while the signal was being handled
    for proc in procs:
        proc.join()
    server.shutdown()
    if settings.metrics_dir is None:
        shutil.rmtree(directory, ignore_errors=True)
    # A worker that got the SIGTERM before it had set its handler (still starting) stopped as
    # asked, too.
    exits = [proc.exitcode for proc in procs]  # none is None: all joined
    codes = [abs(code) for code in exits if code is not None and code != -signal.SIGTERM]
    sys.exit(max(codes, default=0))


def main() -> None:
    settings = Settings.from_env()
    if settings.num_workers <= 1:
        run_one(settings)
    else:
        supervise(settings)


if __name__ == "__main__":
    main()
