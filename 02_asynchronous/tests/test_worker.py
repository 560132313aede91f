"""End to end: proxy, workers and TensorFlow Serving as real processes; crashes are real too."""

import json
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
import redis
from conftest import Iris, Processes, TfServing, base_url, make_env, submit_many, wait_jobs
from launch import Process, free_port, http

T = TypeVar("T")
SETOSA, VERSICOLOR, VIRGINICA = [5.1, 3.5, 1.4, 0.2], [6.4, 3.2, 4.5, 1.5], [7.7, 3.0, 6.1, 2.3]


@pytest.fixture(scope="module")
def reference(tf_serving: TfServing, iris: Iris, redis_server: redis.Redis) -> dict:
    """Every Iris row predicted once, in one job: what every other answer must agree with."""
    redis_server.flushdb()
    procs = Processes()
    try:
        _, (grpc_port, rest_port) = tf_serving
        env = make_env(grpc_port, rest_port)
        procs.proxy(env)
        procs.worker(env)
        job_id = submit_many(env, [{"data": iris[0]}])[0]
        return wait_jobs(redis_server, env, [job_id])[0]
    finally:
        procs.close()


def test_iris_rows_complete_with_the_right_class(reference: dict, iris: Iris) -> None:
    features, targets = iris
    assert reference["status"] == "completed", reference
    predicted = [row["prediction"] for row in reference["result"]]
    accuracy = sum(p == t for p, t in zip(predicted, targets, strict=True)) / len(targets)
    assert accuracy > 0.95
    first = reference["result"][0]
    assert first["class_name"] == "setosa" and len(first["probabilities"]) == 3
    assert abs(sum(first["probabilities"]) - 1) < 1e-4


def test_one_job_per_class(db: redis.Redis, procs: Processes, env: dict) -> None:
    procs.proxy(env)
    procs.worker(env)
    ids = submit_many(env, [{"data": [row]} for row in (SETOSA, VERSICOLOR, VIRGINICA)])
    jobs = wait_jobs(db, env, ids)
    assert [job["result"][0]["class_name"] for job in jobs] == [
        "setosa",
        "versicolor",
        "virginica",
    ]


def assert_matches_reference(jobs: list[dict], rows: list[int], reference: dict) -> None:
    for job, row in zip(jobs, rows, strict=True):
        assert job["status"] == "completed", job
        assert job["result"][0]["prediction"] == reference["result"][row]["prediction"]
        expected = reference["result"][row]["probabilities"]
        assert job["result"][0]["probabilities"] == pytest.approx(expected, abs=1e-5)


def test_500_concurrent_jobs_all_complete_correctly(
    db: redis.Redis, procs: Processes, env: dict, iris: Iris, reference: dict
) -> None:
    procs.proxy(env)
    procs.worker(env)
    procs.worker(env)
    rows = [i % 150 for i in range(500)]
    ids = submit_many(env, [{"data": [iris[0][r]]} for r in rows])
    assert len(set(ids)) == 500
    assert_matches_reference(wait_jobs(db, env, ids), rows, reference)
    assert db.llen("queue:predict") == db.llen("queue:predict:processing") == 0


def test_sigkill_a_worker_holding_jobs_loses_nothing(
    db: redis.Redis, procs: Processes, env: dict, iris: Iris, reference: dict, tf_serving: TfServing
) -> None:
    """Freeze TensorFlow Serving so the worker is caught mid-Predict, kill it, let another
    worker's reaper hand its jobs back after the visibility timeout."""
    tf_proc, _ = tf_serving
    procs.proxy(env)
    doomed = procs.worker(env | {"PREDICT_TIMEOUT": "120"})
    wait_jobs(db, env, submit_many(env, [{"data": [SETOSA]}]))  # connected and warm
    rows = [i % 150 for i in range(100)]
    tf_proc.signal(signal.SIGSTOP)
    try:
        ids = submit_many(env, [{"data": [iris[0][r]]} for r in rows])
        deadline = time.monotonic() + 30
        while db.llen("queue:predict:processing") == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        # Strings (decode_responses=True); redis-py types every reply as bytes | str.
        held = [str(i) for i in db.lrange("queue:predict:processing", 0, -1)]
        assert held, "the worker never claimed a batch"
        doomed.signal(signal.SIGKILL)
        doomed.popen.wait(10)
    finally:
        tf_proc.signal(signal.SIGCONT)
    assert {db.get(f"job:{i}:status") for i in held} == {"processing"}

    procs.worker(env | {"VISIBILITY_TIMEOUT": "2"})
    assert_matches_reference(wait_jobs(db, env, ids), rows, reference)
    assert db.llen("queue:predict") == db.llen("queue:predict:processing") == 0
    assert db.zcard("queue:predict:claimed") == 0


def test_jobs_wait_while_tf_serving_is_down(db: redis.Redis, procs: Processes) -> None:
    grpc_port, rest_port = free_port(), free_port()
    tf = procs.tf_serving(grpc_port, rest_port)
    env = make_env(grpc_port, rest_port)
    procs.proxy(env)
    worker = procs.worker(env)
    wait_jobs(db, env, submit_many(env, [{"data": [SETOSA]}]))

    tf.stop()
    assert http("GET", f"{base_url(env)}/health")[0] == 503
    # Still ready: the queue takes the jobs while TF Serving is down (the readiness probe).
    assert http("GET", f"{base_url(env)}/ready") == (
        200,
        {"status": "healthy", "components": {"redis": "ok"}},
    )
    ids = submit_many(env, [{"data": [VIRGINICA]}] * 20)
    time.sleep(3)  # the worker tries, gives the jobs back, backs off, tries again
    statuses = db.mget([f"job:{i}:status" for i in ids])
    assert set(statuses) <= {"pending", "processing"}
    assert "jobs returned to the queue" in worker.text()

    procs.tf_serving(grpc_port, rest_port)
    jobs = wait_jobs(db, env, ids, timeout=60)
    assert {job["result"][0]["class_name"] for job in jobs} == {"virginica"}


def test_inference_errors_are_retried_then_failed(
    db: redis.Redis, procs: Processes, env: dict
) -> None:
    procs.proxy(env)
    worker = procs.worker(env | {"MODEL_NAME": "nosuchmodel"})
    job = wait_jobs(db, env, submit_many(env, [{"data": [SETOSA]}]))[0]
    assert job["status"] == "failed"
    assert "after 3 attempts" in job["error"]
    assert worker.text().count("predict failed, retrying") == 2


def test_invalid_data_in_the_queue_fails_that_job_only(
    db: redis.Redis, procs: Processes, env: dict
) -> None:
    """The worker does not trust the queue: anyone with Redis access can push a job."""
    procs.proxy(env)
    procs.worker(env)
    db.set("job:handmade:data", json.dumps([[1, 2, 3]]), ex=60)
    db.set("job:handmade:status", "pending", ex=60)
    db.lpush("queue:predict", "handmade")
    good = submit_many(env, [{"data": [SETOSA]}])
    bad, ok = wait_jobs(db, env, ["handmade", *good])
    assert bad["status"] == "failed" and "invalid job data" in bad["error"]
    assert ok["status"] == "completed"


def test_sigterm_returns_or_finishes_in_flight_jobs(
    db: redis.Redis, procs: Processes, env: dict
) -> None:
    procs.proxy(env)
    worker = procs.worker(env)
    ids = submit_many(env, [{"data": [VERSICOLOR]}] * 50)
    worker.signal(signal.SIGTERM)
    assert worker.popen.wait(20) == 0
    assert '"worker stopped"' in worker.text()
    assert db.llen("queue:predict:processing") == 0  # nothing left held
    statuses = db.mget([f"job:{i}:status" for i in ids])
    assert set(statuses) <= {"pending", "completed"}


def test_num_workers_processes_share_the_queue_and_stop_together(
    db: redis.Redis, procs: Processes, env: dict, reference: dict, iris: Iris
) -> None:
    procs.proxy(env)
    supervisor = procs.worker(env | {"NUM_WORKERS": "2", "BATCH_SIZE": "4"})
    rows = [i % 150 for i in range(200)]
    ids = submit_many(env, [{"data": [iris[0][r]]} for r in rows])
    assert_matches_reference(wait_jobs(db, env, ids), rows, reference)
    pids = {
        json.loads(line)["pid"]
        for line in supervisor.text().splitlines()
        if '"worker started"' in line
    }
    assert len(pids) == 2 and supervisor.pid not in pids
    supervisor.signal(signal.SIGTERM)  # forwarded to both children
    assert supervisor.popen.wait(20) == 0
    assert supervisor.text().count('"worker stopped"') == 2


def test_redis_restart_worker_reconnects(procs: Processes, tf_serving: TfServing) -> None:
    _, (grpc_port, rest_port) = tf_serving
    port = free_port()
    redis_proc = procs.redis(port)
    env = make_env(grpc_port, rest_port, REDIS_URL=f"redis://127.0.0.1:{port}/0")
    procs.proxy(env)
    worker = procs.worker(env)
    redis_proc.stop()
    time.sleep(2)
    assert "redis unavailable, retrying" in worker.text()
    procs.redis(port)
    db = redis.Redis(port=port, decode_responses=True)
    jobs = wait_jobs(db, env, submit_many(env, [{"data": [SETOSA]}]), timeout=30)
    assert jobs[0]["status"] == "completed"
    db.close()


def test_health_and_metadata(db: redis.Redis, procs: Processes, env: dict) -> None:
    procs.proxy(env)
    assert http("GET", f"{base_url(env)}/health") == (
        200,
        {"status": "healthy", "components": {"redis": "ok", "tensorflow_serving": "ok"}},
    )
    status, metadata = http("GET", f"{base_url(env)}/metadata")
    assert status == 200 and metadata["model_spec"]["name"] == "iris"
    assert "serving_default" in json.dumps(metadata["metadata"])


# --- a worker that stalls, and the worker that took its job over ----------------------------


def wait_for(condition: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)
    return result


def log_lines(proc: Process, message: str) -> list[dict]:
    return [json.loads(line) for line in proc.text().splitlines() if f'"{message}"' in line]


@pytest.fixture
def silent_port() -> Iterator[socket.socket]:
    """A port that accepts connections (the kernel's backlog) and never answers; closing it
    resets them."""
    listener = socket.create_server(("127.0.0.1", 0))
    yield listener
    listener.close()


def takeover(
    db: redis.Redis, procs: Processes, env: dict, tf_serving: TfServing, stale_env: dict
) -> tuple[Process, Process, str]:
    """Worker A claims a job and is frozen (SIGSTOP) in the middle of its Predict call, which
    hangs: TensorFlow Serving is frozen too (or, with stale_env's TF_SERVING_GRPC_PORT, A talks
    to a port that never answers). Worker B's reaper hands A's job to B after B's visibility
    timeout; B's Predict hangs too, and B is frozen while it holds the job, so that nothing
    but A moves when A wakes up. Returns (A, B, job id), all three frozen."""
    tf_proc, _ = tf_serving
    procs.proxy(env)
    stale = procs.worker(env | {"VISIBILITY_TIMEOUT": "300"} | stale_env)
    if "TF_SERVING_GRPC_PORT" not in stale_env:
        # Connected before TensorFlow Serving freezes: then only A's deadline can end its call.
        wait_jobs(db, env, submit_many(env, [{"data": [SETOSA]}]))
    tf_proc.signal(signal.SIGSTOP)
    job_id = submit_many(env, [{"data": [VIRGINICA]}])[0]
    wait_for(lambda: db.get(f"job:{job_id}:status") == "processing", 30, "A claims")
    stale.signal(signal.SIGSTOP)
    fresh = procs.worker(env | {"VISIBILITY_TIMEOUT": "6", "PREDICT_TIMEOUT": "120"})
    wait_for(lambda: "requeued jobs past the visibility timeout" in fresh.text(), 90, "B reaps")
    wait_for(
        lambda: (
            db.llen("queue:predict") == 0
            and db.lrange("queue:predict:processing", 0, -1) == [job_id]
            and db.get(f"job:{job_id}:status") == "processing"
        ),
        30,
        "B claims",
    )
    fresh.signal(signal.SIGSTOP)
    return stale, fresh, job_id


def wake_all_and_wait(
    db: redis.Redis, env: dict, tf_proc: Process, fresh: Process, job_id: str
) -> dict:
    """TensorFlow Serving and B back: B (the holder) completes the job, once."""
    tf_proc.signal(signal.SIGCONT)
    fresh.signal(signal.SIGCONT)
    (job,) = wait_jobs(db, env, [job_id], timeout=90)
    return job


def test_a_stale_worker_cannot_fail_a_job_another_worker_now_holds(
    db: redis.Redis, procs: Processes, env: dict, tf_serving: TfServing
) -> None:
    tf_proc, _ = tf_serving
    try:
        stale, fresh, job_id = takeover(
            db, procs, env, tf_serving, {"PREDICT_TIMEOUT": "2", "MAX_ATTEMPTS": "1"}
        )
        stale.signal(signal.SIGCONT)  # its Predict is past its deadline: it fails the batch
        done = wait_for(lambda: log_lines(stale, "batch done")[1:], 30, "A gives up")
        assert done[0]["failed"] == 1 and done[0]["stored"] == 0  # refused: not A's any more
        assert db.get(f"job:{job_id}:status") == "processing"  # still B's
        stale.stop()
    finally:
        tf_proc.signal(signal.SIGCONT)
    job = wake_all_and_wait(db, env, tf_proc, fresh, job_id)
    assert job["status"] == "completed" and job["result"][0]["class_name"] == "virginica"


def test_a_stale_worker_cannot_requeue_a_job_another_worker_now_holds(
    db: redis.Redis,
    procs: Processes,
    env: dict,
    tf_serving: TfServing,
    silent_port: socket.socket,
) -> None:
    tf_proc, _ = tf_serving
    port = str(silent_port.getsockname()[1])
    try:
        stale, fresh, job_id = takeover(
            db, procs, env, tf_serving, {"TF_SERVING_GRPC_PORT": port, "PREDICT_TIMEOUT": "300"}
        )
        before = len(log_lines(stale, "jobs returned to the queue"))
        stale.signal(signal.SIGCONT)
        silent_port.close()  # A's connection is reset: UNAVAILABLE, A gives its batch back
        returned = wait_for(
            lambda: log_lines(stale, "jobs returned to the queue")[before:],
            60,
            "A gives back" + stale.output(),
        )
        assert returned[0]["jobs"] == 0  # refused: not A's any more
        assert db.llen("queue:predict") == 0  # not in the queue while B works on it
        assert db.get(f"job:{job_id}:status") == "processing"
        stale.stop()
    finally:
        tf_proc.signal(signal.SIGCONT)
    job = wake_all_and_wait(db, env, tf_proc, fresh, job_id)
    assert job["status"] == "completed" and job["result"][0]["class_name"] == "virginica"
    assert not log_lines(stale, "batch done")  # A never finished it


# --- jobs that break a worker ----------------------------------------------------------------


def test_deeply_nested_job_data_fails_that_job_and_the_worker_lives(
    db: redis.Redis, procs: Processes, env: dict
) -> None:
    procs.proxy(env)
    worker = procs.worker(env)
    db.set("job:nested:data", "[" * 100_000 + "]" * 100_000, ex=60)
    db.set("job:nested:status", "pending", ex=60)
    db.lpush("queue:predict", "nested")
    bad, ok = wait_jobs(db, env, ["nested", *submit_many(env, [{"data": [SETOSA]}])], timeout=30)
    assert bad == {
        "job_id": "nested",
        "status": "failed",
        "error": "invalid job data: nested too deeply",
    }
    assert ok["status"] == "completed"
    assert worker.popen.poll() is None


def test_an_unexpected_error_fails_only_the_job_it_belongs_to(
    db: redis.Redis, procs: Processes, env: dict, tmp_path: Path
) -> None:
    """A labels file that lacks class 2: describing a virginica raises IndexError. That job
    fails with a reason; the others of its batch complete; the worker goes on."""
    labels = tmp_path / "label.json"
    labels.write_text(json.dumps({"0": "setosa", "1": "versicolor"}))
    procs.proxy(env)
    ids = submit_many(env, [{"data": [row]} for row in (SETOSA, VIRGINICA, VERSICOLOR)], 1)
    worker = procs.worker(env | {"LABELS_PATH": str(labels)})  # one batch: all three queued
    setosa, virginica, versicolor = wait_jobs(db, env, ids, timeout=30)
    assert virginica["status"] == "failed"
    assert virginica["error"] == "worker error (IndexError)"
    assert setosa["status"] == versicolor["status"] == "completed"
    assert "batch failed, retrying its jobs one by one" in worker.text()
    assert worker.popen.poll() is None


def test_an_answer_with_the_wrong_number_of_rows_is_never_stored() -> None:
    from tfserving import InferenceError
    from worker import split_rows

    inputs = [[SETOSA], [VERSICOLOR, VIRGINICA]]
    parts = split_rows(np.eye(3, dtype=np.float32), inputs)
    assert [p.tolist() for p in parts] == [[[1, 0, 0]], [[0, 1, 0], [0, 0, 1]]]
    for wrong in (np.eye(3)[:2], np.ones((4, 3)), np.ones(3)):
        with pytest.raises(InferenceError, match="the model answered shape"):
            split_rows(wrong, inputs)


# --- the supervisor (NUM_WORKERS > 1) --------------------------------------------------------


def alive(pid: int) -> bool:
    """Running: not gone, not a zombie waiting for whoever reaps orphans here."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def started_pids(proc: Process) -> list[int]:
    """Worker processes in the order they logged; sorted, in the order they were started."""
    return [line["pid"] for line in log_lines(proc, "worker started")]


def test_supervisor_replaces_a_dead_worker(db: redis.Redis, procs: Processes, env: dict) -> None:
    procs.proxy(env)
    supervisor = procs.worker(env | {"NUM_WORKERS": "2"})
    first, second = sorted(started_pids(supervisor))
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: len(started_pids(supervisor)) == 3, 120, "a replacement worker")
    assert "worker exited, starting another" in supervisor.text()
    assert alive(second) and alive(started_pids(supervisor)[2])
    jobs = wait_jobs(db, env, submit_many(env, [{"data": [SETOSA]}] * 20), timeout=60)
    assert {job["status"] for job in jobs} == {"completed"}
    supervisor.signal(signal.SIGTERM)
    assert supervisor.popen.wait(30) == 0
    assert not any(alive(pid) for pid in started_pids(supervisor))


def test_supervisor_stops_after_a_worker_it_already_reaped(
    db: redis.Redis, procs: Processes, env: dict
) -> None:
    """SIGTERM after one worker has died and been reaped: forwarding it must not fail on the
    dead one and leave the others running."""
    supervisor = procs.worker(env | {"NUM_WORKERS": "2"})
    first = min(started_pids(supervisor))  # the first started: the one joined first before
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: not Path(f"/proc/{first}").exists(), 30, "the dead worker reaped")
    supervisor.signal(signal.SIGTERM)
    assert supervisor.popen.wait(60) == 0
    assert "Traceback" not in supervisor.text()
    assert not any(alive(pid) for pid in started_pids(supervisor))


def test_workers_do_not_outlive_a_killed_supervisor(
    db: redis.Redis, procs: Processes, env: dict
) -> None:
    supervisor = procs.worker(env | {"NUM_WORKERS": "2"})
    workers = started_pids(supervisor)
    supervisor.signal(signal.SIGKILL)
    try:
        wait_for(lambda: not any(alive(pid) for pid in workers), 30, "workers gone")
    finally:
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_redis_password_from_the_environment_is_used_and_never_shown(
    procs: Processes, tf_serving: TfServing
) -> None:
    _, (grpc_port, rest_port) = tf_serving
    port, password = free_port(), "pw-from-the-environment"
    redis_proc = procs.redis(port, password)
    env = make_env(grpc_port, rest_port, REDIS_URL=f"redis://127.0.0.1:{port}/0")
    proxy = procs.proxy(env | {"REDIS_PASSWORD": password})
    worker = procs.worker(env | {"REDIS_PASSWORD": password})
    db = redis.Redis(port=port, password=password, decode_responses=True)
    jobs = wait_jobs(db, env, submit_many(env, [{"data": [SETOSA]}]), timeout=30)
    assert jobs[0]["status"] == "completed"
    db.close()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port).ping()
    for proc in (redis_proc, proxy, worker):
        assert password not in proc.text()
        assert password not in Path(f"/proc/{proc.pid}/cmdline").read_text()  # what ps shows
