"""The worker: NUM_WORKERS processes run the accurate model on queued jobs; a supervisor keeps
them alive and requeues the jobs of any that died.

    supervisor (main process)       every second: replace dead processes, requeue expired claims;
      |                             serves every process's metrics on METRICS_PORT
      +- work() x NUM_WORKERS       BLMOVE queue -> processing, ResNet50, result, release
"""

import logging
import logging.config
import multiprocessing as mp
import os
import random
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from multiprocessing.context import SpawnProcess
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector
from redis.backoff import NoBackoff
from redis.retry import Retry

import jobs
from classifier import Classifier, InvalidImage, decode_image, load_labels, resnet50_input
from config import Settings
from logs import log_config

log = logging.getLogger("worker")
BLOCK_SECONDS = 1  # how long BLMOVE waits; also how quickly a process notices it must stop
SUPERVISE_EVERY = 1.0
# Submit to result: tens of milliseconds idle, up to minutes behind a backlog or a reaped claim.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
ATTEMPT_BUCKETS = (1, 2, 3, 4, 5, 10)  # claims per job: 1 unless a process died holding it


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


class JobMetrics:
    """One worker process's metrics. They are in no registry: in multiprocess mode (the
    supervisor sets PROMETHEUS_MULTIPROC_DIR before it starts the process) each value lives in a
    file of that directory, one per process, and the supervisor adds them up at each scrape. A
    process killed with SIGKILL loses nothing it counted: its files stay."""

    def __init__(self, model: str):
        self.finished = Counter(
            "jobs_finished_total", "Jobs given their final result", ["status"], registry=None
        )
        for status in (jobs.JobStatus.COMPLETE, jobs.JobStatus.FAILED):
            self.finished.labels(status)  # present at 0 from the start, so rate() sees the first
        self.latency = Histogram(
            "job_latency_seconds",
            "From submit to the accurate result, for completed jobs",
            buckets=LATENCY_BUCKETS,
            registry=None,
        )
        self.attempts = Histogram(
            "job_attempts",
            "Claims a job took until its result",
            buckets=ATTEMPT_BUCKETS,
            registry=None,
        )
        self.inference = Histogram(
            "model_inference_duration_seconds",
            "Preprocessing and inference of one image (decoding excluded)",
            ["model"],
            registry=None,
        ).labels(model)

    def count(self, claimed: jobs.Claimed, result: jobs.Result, finished_at: float) -> None:
        """One job answered by this process (its result written: a duplicate run is not counted)."""
        self.finished.labels(result["status"]).inc()
        self.attempts.observe(claimed.attempts)
        if result["status"] == jobs.JobStatus.COMPLETE and claimed.submitted_at is not None:
            self.latency.observe(finished_at - claimed.submitted_at)


class SupervisorMetrics(Collector):
    """What the supervisor adds to its processes' metrics at each scrape: the queue's length, read
    from Redis then (a gauge kept in memory would be stale the moment another host moved a job),
    and the counts only the supervisor sees."""

    def __init__(self, settings: Settings, keys: jobs.Keys):
        self.keys, self.reaped, self.restarts = keys, 0, 0
        # A scrape waits at most REDIS_TIMEOUT for Redis: half to connect, half for the answer,
        # no retry. Not named `worker-...`: the healthcheck counts those.
        half = settings.redis_timeout / 2
        self.redis = redis.Redis.from_url(
            settings.redis_url,
            password=settings.redis_password,
            client_name="queue-metrics",
            socket_connect_timeout=half,
            socket_timeout=half,
            retry=Retry(NoBackoff(), 0),
        )

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "jobs_reaped_total",
            "Claims past VISIBILITY_TIMEOUT requeued (their process died or stalled)",
            value=self.reaped,
        )
        yield CounterMetricFamily(
            "worker_restarts_total", "Worker processes found dead and replaced", value=self.restarts
        )
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.llen(self.keys.queue)
                pipe.llen(self.keys.processing)
                waiting, claimed = pipe.execute()
        except redis.RedisError as exc:  # no value rather than a stale one; `absent()` sees it
            log.warning("queue length unavailable", extra={"fields": {"error": repr(exc)}})
            return
        length = GaugeMetricFamily(
            "job_queue_length",
            "Jobs waiting in the queue or claimed by a process",
            labels=["state"],
        )
        length.add_metric(["waiting"], waiting)
        length.add_metric(["claimed"], claimed)
        yield length


def stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def failed(message: str) -> jobs.Result:
    return {"status": jobs.JobStatus.FAILED, "prediction": "", "error": message}


def run_job(
    model: Classifier, settings: Settings, job: jobs.Claimed, timer: Histogram
) -> jobs.Result:
    """The result to store for one job; a job that cannot succeed gets a "failed" result."""
    if job.image is None:
        return failed("image expired")
    if job.attempts > settings.max_attempts:
        return failed(f"gave up after {settings.max_attempts} attempts")
    try:
        image = decode_image(job.image, settings.max_image_pixels)
    except InvalidImage as exc:  # the proxy checked it already; only a changed limit gets here
        return failed(str(exc))
    with timer.time():
        top5 = model.top_k(image)
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
    keys, backoff = jobs.Keys(settings.queue_name), Backoff()
    client: redis.Redis | None = None
    metrics = JobMetrics(model.name)
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
            claimed = jobs.start(client, keys, job_id)
            result = run_job(model, settings, claimed, metrics.inference)
            finished_at = jobs.finish(client, keys, job_id, result, settings.result_ttl)
            if finished_at is not None:
                metrics.count(claimed, result, finished_at)
            fields = {
                "job_id": job_id,
                "status": result["status"] if finished_at is not None else "answered already",
                "prediction": result["prediction"],
                "ms": round(1000 * (time.perf_counter() - started), 1),
            }
            log.info("async prediction", extra={"fields": fields})
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            # A job claimed before the outage stays in `processing`; the reaper requeues it.
            client = None
            backoff.wait(stop, exc)
    log.info("worker stopped", extra={"fields": {"pid": os.getpid()}})


def serve_metrics(
    settings: Settings, directory: Path, keys: jobs.Keys
) -> tuple[SupervisorMetrics, WSGIServer]:
    """One scrape target for the whole worker: every process's files plus the supervisor's own."""
    # Files of an earlier run (a restarted container keeps its /tmp) would add old counts in.
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    # Read by prometheus-client in every process started from now on (spawn: a fresh import).
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    own = SupervisorMetrics(settings, keys)
    registry.register(own)
    server, _ = start_http_server(settings.metrics_port, settings.host, registry=registry)
    return own, server


def supervise(settings: Settings) -> None:
    """Keep NUM_WORKERS processes running and requeue the jobs of dead ones, until a signal."""
    stop = stop_on_signals()
    # "spawn": each process starts clean and loads its own onnxruntime session.
    context = mp.get_context("spawn")
    keys, backoff = jobs.Keys(settings.queue_name), Backoff()
    client: redis.Redis | None = None
    directory = settings.metrics_dir or Path(tempfile.mkdtemp(prefix="worker-metrics-"))
    metrics, server = serve_metrics(settings, directory, keys)
    processes: list[SpawnProcess | None] = [None] * settings.num_workers
    fields = {"num_workers": settings.num_workers, "metrics_port": settings.metrics_port}
    log.info("supervisor ready", extra={"fields": fields})
    while not stop.is_set():
        for slot, process in enumerate(processes):
            if process is not None and process.is_alive():
                continue
            if process is not None:
                log.warning(
                    "worker died, starting another",
                    extra={"fields": {"pid": process.pid, "exitcode": process.exitcode}},
                )
                # Removes only a dead process's live-gauge files (this worker has none): its
                # counters and histograms must stay, or the totals would go down.
                mark_process_dead(process.pid, str(directory))
                metrics.restarts += 1
            process = context.Process(target=work, args=(settings,), daemon=True)
            process.start()
            processes[slot] = process
        try:
            client = client or connect(settings, "worker-supervisor")
            for job_id in jobs.reap(client, keys, time.time(), settings.visibility_timeout):
                log.warning("claim expired, job requeued", extra={"fields": {"job_id": job_id}})
                metrics.reaped += 1
            backoff.reset()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            client = None
            backoff.wait(stop, exc)
        stop.wait(SUPERVISE_EVERY)
    # None: a signal came before the first round started a process in that slot.
    started = [process for process in processes if process is not None]
    for process in started:  # each finishes its current job, then exits
        process.terminate()
    for process in started:
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
    server.shutdown()
    server.server_close()
    if settings.metrics_dir is None:
        shutil.rmtree(directory, ignore_errors=True)
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
