"""Real Redis (DB 5 only), real models, real processes on free ports; everything is killed."""

import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

import jobs
from config import Settings

CHAPTER = Path(__file__).resolve().parents[1]
# Our own database index on whatever server REDIS_URL names: the only data these tests flush.
_url = urlsplit(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"))
REDIS_URL = urlunsplit(_url._replace(path="/5"))
# A password, if the tests' Redis needs one, comes in the URL or here, as for the chapter's apps.
REDIS_PASSWORD = os.environ.get("REDIS_PASSWORD") or None
SAMPLE = (CHAPTER / "samples" / "chelsea.jpg").read_bytes()
SAMPLE_B64 = base64.b64encode(SAMPLE).decode()
T = TypeVar("T")
FAILED = pytest.StashKey[bool]()  # set on a test whose call failed: its logs are printed
CAT_CLASSES = {"tiger cat", "Egyptian cat", "tabby", "Persian cat", "Siamese cat", "lynx"}


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("markexpr") == "containers":
        return  # `make containers`: the stack has its own Redis and mounts the models itself
    settings = Settings.from_env()
    missing = [
        str(p)
        for p in (settings.sync_model_path, settings.async_model_path, settings.labels_path)
        if not p.exists()
    ]
    if missing:
        pytest.exit(f"models missing: {', '.join(missing)}; build them with `make -C .. models`")
    try:
        connect(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        where = f"{_url.hostname}:{_url.port or 6379}"  # never the URL: it may hold a password
        pytest.exit(
            f"no Redis at {where} ({exc}). Start one: the Debian package `redis-server` "
            "(Homebrew: `redis`), or set REDIS_URL (and REDIS_PASSWORD)."
        )


def connect(
    url: str = REDIS_URL, password: str | None = REDIS_PASSWORD, **options: Any
) -> redis.Redis:
    return redis.Redis.from_url(url, password=password, **options)


@pytest.fixture
def db() -> Iterator[redis.Redis]:
    """A client on the tests' database, emptied before each test."""
    client = connect()
    client.flushdb()
    yield client
    client.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]  # (host, port) for AF_INET
        return port


class Process:
    """A chapter program in its own process group, its JSON log kept for failure messages."""

    metrics_url: str  # a worker's: set by start_worker

    def __init__(self, script: str, env: dict[str, str], log_path: Path):
        self.log_path = log_path
        self.log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            [sys.executable, script],
            cwd=CHAPTER,
            env={**os.environ, "REDIS_URL": REDIS_URL, "PYTHONUNBUFFERED": "1", **env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM the whole group, wait for all of it, then SIGKILL whatever is left of it.

        Waiting for the group, not only its leader, lets each process exit normally, saving its
        coverage data under `make test`: multiprocessing's resource tracker, for one, exits
        only once the supervisor and every worker process have."""
        deadline = time.monotonic() + 15
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=15)
        while live_members(self.popen.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()
        self.log.close()

    def children(self) -> list[int]:
        path = Path(f"/proc/{self.popen.pid}/task/{self.popen.pid}/children")
        return [int(pid) for pid in path.read_text().split()]


def live_members(group: int) -> list[int]:
    """The processes of a process group that have not exited (zombies excluded), from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):  # gone meanwhile
            state, _, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
            if int(pgrp) == group and state != "Z":
                members.append(int(stat.parent.name))
    return members


class Started:
    """Starts chapter programs and stops all of them, printing their logs if the test failed."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.processes: list[Process] = []

    def __call__(self, script: str, **env: object) -> Process:
        name = f"{Path(script).stem}-{len(self.processes)}.log"
        process = Process(script, {k: str(v) for k, v in env.items()}, self.log_dir / name)
        self.processes.append(process)
        return process

    def stop_all(self, failed: bool) -> None:
        for process in self.processes:
            process.stop()
            if failed:
                print(f"--- {process.log_path.name} ---\n{process.output()[-4000:]}")


@pytest.fixture
def start(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Started]:
    """start("proxy.py" | "worker.py", **env) -> Process, stopped after the test."""
    started = Started(tmp_path)
    yield started
    started.stop_all(request.node.stash.get(FAILED, False))


@pytest.fixture(scope="session")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One proxy for the whole session (limits made small so the 400 tests stay cheap)."""
    started = Started(tmp_path_factory.mktemp("proxy"))
    _, base = start_proxy(started, MAX_IMAGE_BYTES=1_000_000, MAX_IMAGE_PIXELS=1_000_000)
    yield base
    started.stop_all(failed=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call" and report.failed:
        item.stash[FAILED] = True
    return report


def http(
    method: str,
    url: str,
    body: bytes | None = None,
    timeout: float = 60,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """(status, JSON body) of one request."""
    headers = {"Content-Type": "application/json", **(headers or {})}
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_until(
    condition: Callable[[], T | None], timeout: float, what: str, process: Process | None = None
) -> T:
    """condition()'s first truthy value, polled until `timeout` s have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    detail = f"\n--- log ---\n{process.output()[-4000:]}" if process else ""
    raise AssertionError(f"timed out after {timeout} s waiting for {what}{detail}")


def start_proxy(start: Started, **env: object) -> tuple[Process, str]:
    port = free_port()
    process = start("proxy.py", PORT=port, **env)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return http("GET", f"{base}/openapi.json")[0] == 200  # open, needs no Redis
        except OSError:
            return False

    wait_until(up, 60, "the proxy to start", process)
    return process, base


def start_worker(start: Started, redis_url: str = REDIS_URL, **env: object) -> Process:
    """A supervisor with its processes, returned once every one waits on the queue; its metrics
    are at `process.metrics_url`."""
    env = {"NUM_WORKERS": 2, "VISIBILITY_TIMEOUT": 2, "METRICS_PORT": free_port(), **env}
    process = start("worker.py", REDIS_URL=redis_url, **env)
    process.metrics_url = f"http://127.0.0.1:{env['METRICS_PORT']}/metrics"
    password = env.get("REDIS_PASSWORD", REDIS_PASSWORD)
    client = connect(redis_url, str(password) if password else None)

    def waiting() -> bool:
        names = [c["name"] for c in client.client_list() if c["cmd"] == "blmove"]
        return len([n for n in names if n.startswith("worker-")]) == int(str(env["NUM_WORKERS"]))

    wait_until(waiting, 90, "the worker processes to wait on the queue", process)
    client.close()
    return process


def worker_processes(db: redis.Redis, worker: Process) -> list[int]:
    """The supervisor's children that hold a worker connection (not multiprocessing helpers)."""
    names = {c["name"] for c in db.client_list()}
    return [pid for pid in worker.children() if f"worker-{pid}" in names]


def scrape(url: str, headers: dict[str, str] | None = None) -> dict[tuple, float]:
    """A /metrics page, parsed by prometheus-client: {(sample, ((label, value), ...)): value}."""
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def submit(
    image: bytes,
    queue: str = "queue:jobs",
    redis_url: str = REDIS_URL,
    password: str | None = REDIS_PASSWORD,
) -> str:
    """Queue a job the way the proxy does, without a proxy."""

    async def _submit() -> str:
        client = aioredis.Redis.from_url(redis_url, password=password)
        try:
            return await jobs.submit(client, jobs.Keys(queue), image, 3600, 1000)
        finally:
            await client.aclose()

    return asyncio.run(_submit())


def result(client: redis.Redis, job_id: str) -> jobs.Result | None:
    raw = client.get(jobs.Keys.result(job_id))
    stored: jobs.Result | None = json.loads(raw) if raw else None
    return stored


class TcpServer:
    """A loopback TCP server; handle(connection) runs in a thread for each client."""

    def __init__(self, handle: Callable[[socket.socket], None]):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.handle = handle
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):  # the listener was closed
            while True:
                connection, _ = self.listener.accept()
                self.sockets.append(connection)
                threading.Thread(target=self.handle, args=(connection,), daemon=True).start()

    def close(self) -> None:
        for sock in [self.listener, *self.sockets]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


@pytest.fixture
def hung_redis() -> Iterator[int]:
    """The port of a "Redis" that accepts connections, reads requests and never answers."""

    def never_answer(connection: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while connection.recv(65536):
                pass

    server = TcpServer(never_answer)
    yield server.port
    server.close()


@pytest.fixture
def lossy_redis() -> Iterator[int]:
    """The port of a relay to the tests' Redis that loses the reply to the first EVALSHA (and
    hangs up): the command ran, but the client cannot know it did."""
    upstream_port = urlsplit(REDIS_URL).port or 6379
    state = {"dropped": False}

    def relay(client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", upstream_port))
        server.sockets.append(upstream)
        lose = threading.Event()

        def replies() -> None:
            for data in iter(lambda: upstream.recv(65536), b""):
                if lose.is_set():  # the EVALSHA's reply: drop it, close both sides
                    client.shutdown(socket.SHUT_RDWR)
                    upstream.close()
                    return
                client.sendall(data)

        threading.Thread(target=replies, daemon=True).start()
        with contextlib.suppress(OSError):
            for data in iter(lambda: client.recv(65536), b""):
                if b"EVALSHA" in data and not state["dropped"]:
                    state["dropped"] = True
                    lose.set()
                upstream.sendall(data)

    server = TcpServer(relay)
    yield server.port
    server.close()
