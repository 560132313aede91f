"""The background side: take jobs from Redis, predict them in batches over gRPC, store results.

    python worker.py            # NUM_WORKERS processes, each running the loop below

One loop per process: block on the queue (BLMOVE, no polling), take up to BATCH_SIZE jobs,
send them to TensorFlow Serving as one Predict call, store every result, repeat. A reaper task
beside the loop hands jobs of dead workers back to the queue.
"""

import asyncio
import contextlib
import ctypes
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import uvloop
from config import Settings, setup_logging
from jobs import JobStatus, JobStore, validate_rows
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
        self, settings: Settings, store: JobStore, model: TFServingClient, labels: list[str]
    ):
        self.settings = settings
        self.store = store
        self.model = model
        self.labels = labels

    async def run(self, stop: asyncio.Event) -> None:
        reaper = asyncio.create_task(self.reap_forever(stop))
        redis_backoff = Backoff(0.1)
        tf_backoff = Backoff(0.2)
        while not stop.is_set():
            try:
                batch = await self.store.claim(self.settings.batch_size, BLOCK_SECONDS)
                redis_backoff.reset()
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
                await self.store.finish(outcomes)
                return False
        stored = await self.store.finish(outcomes)
        log.info(
            "batch done",
            extra={
                "jobs": len(batch),
                "stored": stored,
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
                    log.warning("requeued jobs past the visibility timeout", extra={"jobs": n})
            except RedisError:
                pass  # the main loop reports Redis trouble and backs off


async def serve(settings: Settings) -> None:
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
        await Worker(settings, store, model, labels).run(stop)
    finally:
        await model.close()
        await redis.aclose()


def run_one(settings: Settings) -> None:
    setup_logging(settings.log_level)
    uvloop.run(serve(settings))


def run_supervised(settings: Settings, supervisor: int) -> None:
    """A worker process under supervise(): it gets SIGTERM when the supervisor dies, even by
    SIGKILL, so no worker outlives it (Linux's PR_SET_PDEATHSIG; elsewhere, not enforced)."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != supervisor:  # it died before prctl took effect
        return
    run_one(settings)


def supervise(settings: Settings) -> None:
    """Keep NUM_WORKERS worker processes running until SIGTERM; forward it; exit with theirs."""
    # Several processes, not threads: each has its own event loop and its own core.
    setup_logging(settings.log_level)
    ctx = multiprocessing.get_context("spawn")
    stopping = False

    def start() -> multiprocessing.Process:
        proc = ctx.Process(target=run_supervised, args=(settings, os.getpid()))
        proc.start()
        return proc

    def forward(signum: int) -> None:
        for proc in procs:
            # exitcode is None: not reaped yet, so the pid is still this child's and not some
            # other process's that reused it. (A zombie takes the signal harmlessly.)
            if proc.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signum)

    def on_signal(signum, _frame) -> None:
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
            # A worker that dies at start-up is restarted once per RESTART_DELAY, not in a spin.
            time.sleep(max(0.0, started[slot] + RESTART_DELAY - time.monotonic()))
            if not stopping:
                procs[slot], started[slot] = start(), time.monotonic()
    forward(signal.SIGTERM)  # again: for a child started while the signal was being handled
    for proc in procs:
        proc.join()
    # A worker that got the SIGTERM before it had set its handler (still starting) stopped as
    # asked, too.
    codes = [abs(proc.exitcode) for proc in procs if proc.exitcode != -signal.SIGTERM]
    sys.exit(max(codes, default=0))


def main() -> None:
    settings = Settings.from_env()
    if settings.num_workers <= 1:
        run_one(settings)
    else:
        supervise(settings)


if __name__ == "__main__":
    main()
