"""The worker: NUM_WORKERS processes run the accurate model on queued jobs; a supervisor keeps
them alive and requeues the jobs of any that died.

    supervisor (main process)       every second: replace dead processes, requeue expired claims
      +- work() x NUM_WORKERS       BLMOVE queue -> processing, ResNet50, result, release
"""

import logging
import logging.config
import multiprocessing as mp
import os
import random
import signal
import threading
import time

import redis

import jobs
from classifier import Classifier, InvalidImage, decode_image, load_labels, resnet50_input
from config import Settings
from logs import log_config

log = logging.getLogger("worker")
BLOCK_SECONDS = 1  # how long BLMOVE waits; also how quickly a process notices it must stop
SUPERVISE_EVERY = 1.0


class Backoff:
    """Exponential backoff with jitter for Redis outages: 0.1 s, 0.2 s, ... up to 5 s."""

    def __init__(self, first: float = 0.1, cap: float = 5.0):
        self.first, self.cap, self.delay = first, cap, first

    def wait(self, stop: threading.Event, exc: Exception) -> None:
        fields = {"error": repr(exc), "retry_in": round(self.delay, 2)}
        log.warning("redis unavailable", extra={"fields": fields})
        stop.wait(self.delay * random.uniform(0.5, 1.0))
        self.delay = min(self.delay * 2, self.cap)

    def reset(self) -> None:
        self.delay = self.first


def connect(settings: Settings, name: str) -> redis.Redis:
    # The socket timeout must outlast BLMOVE's own wait, or every idle wait would be an error.
    return redis.Redis.from_url(
        settings.redis_url,
        password=settings.redis_password,
        client_name=name,
        socket_connect_timeout=2,
        socket_timeout=BLOCK_SECONDS + 5,
    )


def stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def failed(message: str) -> dict:
    return {"status": jobs.JobStatus.FAILED, "prediction": "", "error": message}


def run_job(model: Classifier, settings: Settings, image: bytes | None, attempts: int) -> dict:
    """The result to store for one job; a job that cannot succeed gets a "failed" result."""
    if image is None:
        return failed("image expired")
    if attempts > settings.max_attempts:
        return failed(f"gave up after {settings.max_attempts} attempts")
    try:
        top5 = model.top_k(decode_image(image, settings.max_image_pixels))
    except InvalidImage as exc:  # the proxy checked it already; only a changed limit gets here
        return failed(str(exc))
    return {
        "status": jobs.JobStatus.COMPLETE,
        "prediction": top5[0]["label"],
        "top5": top5,
        "model": model.name,
    }


def work(settings: Settings) -> None:
    """One worker process: claim a job, run the accurate model, store the result, repeat."""
    logging.config.dictConfig(log_config(settings.log_level))
    stop = stop_on_signals()
    # Background work yields the CPU to the proxy's requests, whose latency a user is waiting on.
    os.nice(settings.worker_nice)
    model = Classifier(settings.async_model_path, load_labels(settings.labels_path), resnet50_input)
    keys, client, backoff = jobs.Keys(settings.queue_name), None, Backoff()
    log.info("worker ready", extra={"fields": {"pid": os.getpid(), "model": model.name}})
    supervisor = os.getppid()
    while not stop.is_set() and os.getppid() == supervisor:  # never outlive the supervisor
        try:
            client = client or connect(settings, f"worker-{os.getpid()}")
            job_id = jobs.claim(client, keys, BLOCK_SECONDS)
            backoff.reset()
            if job_id is None:
                continue
            started = time.perf_counter()
            image, attempts = jobs.start(client, keys, job_id)
            result = run_job(model, settings, image, attempts)
            written = jobs.finish(client, keys, job_id, result, settings.result_ttl)
            fields = {
                "job_id": job_id,
                "status": result["status"] if written else "answered already",
                "prediction": result["prediction"],
                "ms": round(1000 * (time.perf_counter() - started), 1),
            }
            log.info("async prediction", extra={"fields": fields})
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            # A job claimed before the outage stays in `processing`; the reaper requeues it.
            client = None
            backoff.wait(stop, exc)
    log.info("worker stopped", extra={"fields": {"pid": os.getpid()}})


def supervise(settings: Settings) -> None:
    """Keep NUM_WORKERS processes running and requeue the jobs of dead ones, until a signal."""
    stop = stop_on_signals()
    # "spawn": each process starts clean and loads its own onnxruntime session.
    context = mp.get_context("spawn")
    keys, client, backoff = jobs.Keys(settings.queue_name), None, Backoff()
    processes: list[mp.Process] = [None] * settings.num_workers
    log.info("supervisor ready", extra={"fields": {"num_workers": settings.num_workers}})
    while not stop.is_set():
        for slot, process in enumerate(processes):
            if process is not None and process.is_alive():
                continue
            if process is not None:
                log.warning(
                    "worker died, starting another",
                    extra={"fields": {"pid": process.pid, "exitcode": process.exitcode}},
                )
            processes[slot] = context.Process(target=work, args=(settings,), daemon=True)
            processes[slot].start()
        try:
            client = client or connect(settings, "worker-supervisor")
            for job_id in jobs.reap(client, keys, time.time(), settings.visibility_timeout):
                log.warning("claim expired, job requeued", extra={"fields": {"job_id": job_id}})
            backoff.reset()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            client = None
            backoff.wait(stop, exc)
        stop.wait(SUPERVISE_EVERY)
    for process in processes:  # each finishes its current job, then exits
        process.terminate()
    for process in processes:
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
    log.info("supervisor stopped")


def main() -> None:
    settings = Settings.from_env()
    logging.config.dictConfig(log_config(settings.log_level))
    # Fail once, clearly, rather than have the supervisor restart doomed processes forever.
    for path in (settings.async_model_path, settings.labels_path):
        if not path.exists():
            raise SystemExit(f"worker: {path} is missing; build it with `make -C .. models`")
    supervise(settings)


if __name__ == "__main__":
    main()
