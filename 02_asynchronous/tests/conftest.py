"""Real Redis (database 2, flushed before each test), real processes on free ports."""

import csv
import socket
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from launch import (
    LOCAL_SERVING,
    MODELS,
    Process,
    free_port,
    http,
    redis_url,
    start_proxy,
    start_redis,
    start_tf_serving,
    start_worker,
)
from prometheus_client.parser import text_string_to_metric_families

REDIS_URL = redis_url(db=2)
# What the session fixtures yield: TensorFlow Serving and its (gRPC, REST) ports; Iris rows and
# their classes.
TfServing = tuple[Process, tuple[int, int]]
Iris = tuple[list[list[float]], list[int]]
FINAL = ("completed", "failed", "cancelled")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        client.ping()
    except redis.ConnectionError as e:
        pytest.exit(
            f"no Redis at {REDIS_URL} ({e}). Start one: `docker compose up -d redis`, or install "
            "redis-server (Debian) / redis (Homebrew), or set REDIS_URL.",
            returncode=1,
        )
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def db(redis_server: redis.Redis) -> redis.Redis:
    """Database 2 of the shared Redis, empty: the only data the tests touch."""
    redis_server.flushdb()
    return redis_server


@pytest.fixture(scope="session")
def tf_serving() -> Iterator[TfServing]:
    if not LOCAL_SERVING.exists():
        pytest.skip(f"{LOCAL_SERVING} (chapter 01) is missing")
    ports = free_port(), free_port()
    proc = start_tf_serving(*ports)
    yield proc, ports
    proc.close()


class Processes:
    """Starts this chapter's processes; the fixture stops every one of them, pass or fail."""

    def __init__(self) -> None:
        self.started: list[Process] = []

    def _keep(self, proc: Process) -> Process:
        self.started.append(proc)
        return proc

    def proxy(self, env: dict) -> Process:
        return self._keep(start_proxy(env))

    def worker(self, env: dict) -> Process:
        return self._keep(start_worker(env))

    def tf_serving(self, grpc_port: int, rest_port: int) -> Process:
        return self._keep(start_tf_serving(grpc_port, rest_port))

    def redis(self, port: int, password: str = "") -> Process:
        return self._keep(start_redis(port, password))

    def close(self) -> None:
        for proc in reversed(self.started):
            proc.close()


@pytest.fixture
def procs() -> Iterator[Processes]:
    processes = Processes()
    yield processes
    processes.close()


def make_env(grpc_port: int = 1, rest_port: int = 1, **overrides: object) -> dict:
    """Environment for proxy and workers; port 1 stands for 'no TensorFlow Serving'."""
    env = {
        "REDIS_URL": REDIS_URL,
        "TF_SERVING_GRPC_PORT": str(grpc_port),
        "TF_SERVING_REST_PORT": str(rest_port),
        "PORT": str(free_port()),
        "VISIBILITY_TIMEOUT": "30",
        "RETRY_BACKOFF": "0.05",
        "BATCH_SIZE": "16",
        "NUM_WORKERS": "1",
    }
    return env | {k: str(v) for k, v in overrides.items()}


@pytest.fixture
def env(db: redis.Redis, tf_serving: TfServing) -> dict:
    """Settings of a proxy and workers talking to the session's TensorFlow Serving."""
    _, (grpc_port, rest_port) = tf_serving
    return make_env(grpc_port, rest_port)


def base_url(env: dict) -> str:
    return f"http://127.0.0.1:{env['PORT']}"


def submit_many(env: dict, bodies: list[dict], threads: int = 25) -> list[str]:
    def submit(body: dict) -> str:
        status, answer = http("POST", f"{base_url(env)}/predict", body)
        assert status == 202, answer
        return str(answer["job_id"])

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(submit, bodies))


def wait_jobs(db: redis.Redis, env: dict, ids: list[str], timeout: float = 90) -> list[dict]:
    """Wait until every job is final (checked in Redis), then read each one over HTTP."""
    deadline = time.monotonic() + timeout
    while True:
        statuses = db.mget([f"job:{i}:status" for i in ids])
        if all(s in FINAL for s in statuses):
            break
        if time.monotonic() > deadline:
            waiting = {i: s for i, s in zip(ids, statuses, strict=True) if s not in FINAL}
            raise TimeoutError(f"{len(waiting)} jobs not final: {list(waiting.items())[:5]}")
        time.sleep(0.1)
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda i: http("GET", f"{base_url(env)}/job/{i}"), ids))
    assert all(status == 200 for status, _ in answers)
    return [job for _, job in answers]


@pytest.fixture(scope="session")
def iris() -> Iris:
    with open(MODELS / "iris.csv") as f:
        rows = list(csv.DictReader(f))
    features = [[float(r[k]) for k in list(r)[:4]] for r in rows]
    return features, [int(r["target"]) for r in rows]


class Relay:
    """A TCP relay in front of the real Redis, for the faults a stopped server cannot show.

    `drop_next_reply`: the next answer from Redis is swallowed, and the rest on that connection
    (the command ran, the client never hears so). `hang`: connections are still accepted and
    commands still reach Redis, but nothing comes back: a Redis that hangs.
    """

    def __init__(self, target: str = REDIS_URL) -> None:
        parts = urllib.parse.urlsplit(target)
        self.target = (parts.hostname, parts.port or 6379)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = parts._replace(netloc=f"127.0.0.1:{self.port}").geturl()
        self.drop_next_reply = threading.Event()
        self.hang = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(self.target)
            for src, dst, replies in ((client, server, False), (server, client, True)):
                threading.Thread(target=self._pump, args=(src, dst, replies), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, replies: bool) -> None:
        swallowing = False
        try:
            while data := src.recv(65536):
                if replies and self.drop_next_reply.is_set():
                    self.drop_next_reply.clear()
                    swallowing = True
                if not (replies and (swallowing or self.hang.is_set())):
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            src.close()
            dst.close()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def relay(db: redis.Redis) -> Iterator[Relay]:
    proxy = Relay()
    yield proxy
    proxy.close()


def scrape(url: str, headers: dict | None = None) -> dict[tuple, float]:
    """A Prometheus page as {(sample name, sorted label pairs): value}."""
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metrics_url(env: dict) -> str:
    """The worker's Prometheus page (env must name its METRICS_PORT)."""
    return f"http://127.0.0.1:{env['METRICS_PORT']}/metrics"
