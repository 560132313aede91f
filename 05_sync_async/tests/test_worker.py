"""The background side: the accurate answer arrives, and survives dying workers and Redis."""

import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from conftest import (
    CHAPTER,
    REDIS_URL,
    SAMPLE,
    SAMPLE_B64,
    Started,
    free_port,
    http,
    result,
    scrape,
    start_proxy,
    start_worker,
    submit,
    wait_until,
    worker_processes,
)


def test_job_completes_with_the_accurate_label(start: Started, db: redis.Redis) -> None:
    worker = start_worker(start)
    job_id = submit(SAMPLE)
    done = wait_until(lambda: result(db, job_id), 60, "the job's result", worker)
    assert done["status"] == "complete"
    assert done["prediction"] == "Egyptian cat"
    assert done["top5"][0]["probability"] > 0.5
    assert 3500 < db.ttl(f"result:{job_id}") <= 3600
    # Released: the image is gone and nothing is left claimed.
    assert db.exists(f"image:{job_id}", "queue:jobs:processing", "queue:jobs:claims") == 0


def test_the_proxy_gives_the_accurate_answer_once_the_worker_has_it(
    proxy: str, start: Started, db: redis.Redis
) -> None:
    status, body = http("POST", f"{proxy}/predict", json.dumps({"image_data": SAMPLE_B64}).encode())
    assert status == 200, body
    job_id = body["job_id"]
    assert http("GET", f"{proxy}/job/{job_id}") == (
        200,
        {job_id: {"status": "queued", "prediction": ""}},
    )
    worker = start_worker(start)

    def complete() -> dict | None:
        status, body = http("GET", f"{proxy}/job/{job_id}")
        assert status == 200, body
        return body[job_id] if body[job_id]["status"] == "complete" else None

    done = wait_until(complete, 60, "the accurate answer from the proxy", worker)
    assert done["prediction"] == "Egyptian cat" == done["top5"][0]["label"]
    assert len(done["top5"]) == 5
    assert done["model"] == "resnet50"


def test_jobs_that_cannot_succeed_fail_instead_of_looping(start: Started, db: redis.Redis) -> None:
    # MAX_IMAGE_PIXELS lowered since the proxy accepted the image: the worker refuses it too.
    worker = start_worker(start, MAX_ATTEMPTS=3, MAX_IMAGE_PIXELS=1000)
    db.hset("queue:jobs:attempts", "abcdef", 3)  # as if three workers had died on it
    db.set("image:abcdef", SAMPLE)
    db.lpush("queue:jobs", "abcdef")
    too_large = submit(SAMPLE)
    done = wait_until(lambda: result(db, "abcdef"), 60, "the failed result", worker)
    assert done == {"status": "failed", "prediction": "", "error": "gave up after 3 attempts"}
    done = wait_until(lambda: result(db, too_large), 60, "the refused image's result", worker)
    assert done["status"] == "failed" and done["prediction"] == ""
    assert done.get("error", "").endswith("pixels, over the 1000 limit"), done
    assert db.exists(f"image:{too_large}", "queue:jobs:processing", "queue:jobs:attempts") == 0


def test_a_missing_model_stops_the_worker_at_start_up(tmp_path: Path) -> None:
    missing = tmp_path / "resnet50.onnx"
    done = subprocess.run(
        [sys.executable, "worker.py"],
        cwd=CHAPTER,
        env={**os.environ, "REDIS_URL": REDIS_URL, "ASYNC_MODEL_PATH": str(missing)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert f"worker: {missing} is missing" in done.stderr


def test_a_job_run_twice_keeps_its_first_answer(start: Started, db: redis.Redis) -> None:
    # A claim that expired while its worker was only slow: the job comes back, already answered.
    first = {"status": "complete", "prediction": "Egyptian cat"}
    db.set("result:abcdef", json.dumps(first))
    db.lpush("queue:jobs", "abcdef")
    worker = start_worker(start)
    wait_until(lambda: db.llen("queue:jobs") == 0, 60, "the job to be claimed", worker)
    wait_until(lambda: not db.exists("queue:jobs:processing"), 60, "its release", worker)
    assert result(db, "abcdef") == first


def test_sigkill_mid_job_loses_nothing(start: Started, db: redis.Redis) -> None:
    # Private queue, one process: we know exactly which process holds the job.
    queue = "test:kill"
    worker = start_worker(start, QUEUE_NAME=queue, NUM_WORKERS=1, VISIBILITY_TIMEOUT=2)
    (victim,) = worker_processes(db, worker)
    # Stopped while blocked in BLMOVE: Redis still hands it the job, which it will never finish.
    wait_until(lambda: stop_while_blocked(db, victim), 10, "the process to block", worker)
    job_id = submit(SAMPLE, queue=queue)
    wait_until(
        lambda: db.lrange(f"{queue}:processing", 0, -1) == [job_id.encode()],
        10,
        "the stopped process to hold the job",
        worker,
    )
    os.kill(victim, signal.SIGKILL)
    done = wait_until(lambda: result(db, job_id), 90, "the requeued job's result", worker)
    assert done["prediction"] == "Egyptian cat"
    (replacement,) = worker_processes(db, worker)  # started by the supervisor
    assert replacement != victim
    assert '"claim expired, job requeued"' in worker.output()
    # Counted once each, across the dead process and its replacement (multiprocess files): one
    # restart, one reaped claim, one job finished, no failure. One attempt: the victim died
    # inside BLMOVE, before it started the job (attempts count the runs that began).
    metrics = scrape(worker.metrics_url)
    assert metrics[("worker_restarts_total", ())] == 1
    assert metrics[("jobs_reaped_total", ())] == 1
    assert metrics[("jobs_finished_total", (("status", "complete"),))] == 1
    assert metrics[("jobs_finished_total", (("status", "failed"),))] == 0
    assert metrics[("job_attempts_count", ())] == 1
    assert metrics[("job_attempts_bucket", (("le", "1.0"),))] == 1
    assert metrics[("job_latency_seconds_count", ())] == 1
    assert metrics[("job_latency_seconds_sum", ())] >= 2  # it waited out VISIBILITY_TIMEOUT
    assert metrics[("job_queue_length", (("state", "waiting"),))] == 0
    assert metrics[("job_queue_length", (("state", "claimed"),))] == 0


def stop_while_blocked(db: redis.Redis, pid: int) -> bool:
    """SIGSTOP the process if its connection is blocked in BLMOVE, else let it run on."""
    os.kill(pid, signal.SIGSTOP)
    clients = {c["name"]: c for c in db.client_list()}
    if "b" in clients.get(f"worker-{pid}", {}).get("flags", ""):
        return True
    os.kill(pid, signal.SIGCONT)
    return False


# The port, a function that starts it (again), the servers started so far.
PrivateRedis = tuple[int, Callable[[], None], list[subprocess.Popen[bytes]]]


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    """A Redis of our own, which this test may stop and start again."""
    port = free_port()
    command = ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"]
    servers: list[subprocess.Popen[bytes]] = []

    def start_server() -> None:
        servers.append(subprocess.Popen(command, stdout=subprocess.DEVNULL))
        client = redis.Redis(port=port)
        wait_until(lambda: _pings(client), 10, f"redis-server on port {port}")

    start_server()
    yield port, start_server, servers
    for server in servers:
        server.kill()
        server.wait()


def _pings(client: redis.Redis) -> bool:
    try:
        return client.ping() is True
    except redis.ConnectionError:
        return False


def test_worker_reconnects_after_redis_restarts(
    start: Started, private_redis: PrivateRedis
) -> None:
    port, start_server, servers = private_redis
    url = f"redis://127.0.0.1:{port}/0"
    worker = start_worker(start, redis_url=url)
    servers[-1].kill()
    servers[-1].wait()
    wait_until(lambda: '"redis unavailable"' in worker.output(), 30, "the outage", worker)
    # The metrics still answer, without a queue length they cannot know (no stale value).
    metrics = scrape(worker.metrics_url)
    assert ("jobs_reaped_total", ()) in metrics
    assert not [key for key in metrics if key[0] == "job_queue_length"]
    start_server()
    job_id = submit(SAMPLE, redis_url=url)
    client = redis.Redis.from_url(url)
    done = wait_until(lambda: result(client, job_id), 60, "the job after the restart", worker)
    assert done["prediction"] == "Egyptian cat"


@pytest.fixture
def redis_with_password() -> Iterator[tuple[int, str]]:
    """A Redis of our own that requires a password, given on stdin (argv is public: `ps`)."""
    port, password = free_port(), secrets.token_hex(16)
    server = subprocess.Popen(
        ["redis-server", "-"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL
    )
    assert server.stdin is not None  # stdin=PIPE
    server.stdin.write(f'port {port}\nsave ""\nappendonly no\nrequirepass {password}\n'.encode())
    server.stdin.close()
    client = redis.Redis(port=port, password=password)
    wait_until(lambda: _pings(client), 10, f"redis-server on port {port}")
    yield port, password
    server.kill()
    server.wait()


def test_the_redis_password_comes_from_the_environment_and_is_never_shown(
    start: Started, redis_with_password: tuple[int, str]
) -> None:
    port, password = redis_with_password
    url = f"redis://127.0.0.1:{port}/0"
    worker = start_worker(start, redis_url=url, REDIS_PASSWORD=password)
    proxy, base = start_proxy(start, REDIS_URL=url, REDIS_PASSWORD=password)
    assert http("GET", f"{base}/health") == (200, {"health": "ok"})
    status, body = http("POST", f"{base}/predict", json.dumps({"image_data": SAMPLE_B64}).encode())
    assert status == 200, body
    client = redis.Redis(port=port, password=password)
    done = wait_until(lambda: result(client, body["job_id"]), 60, "the job's result", worker)
    assert done["prediction"] == "Egyptian cat"
    for process in (proxy, worker):
        assert password not in process.output()
        for pid in (process.popen.pid, *process.children()):
            assert password.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
