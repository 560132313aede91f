"""End to end: proxy, workers and TensorFlow Serving as real processes; crashes are real too."""

import json
import signal
import time

import pytest
import redis
from conftest import Processes, base_url, make_env, submit_many, wait_jobs
from launch import free_port, http

SETOSA, VERSICOLOR, VIRGINICA = [5.1, 3.5, 1.4, 0.2], [6.4, 3.2, 4.5, 1.5], [7.7, 3.0, 6.1, 2.3]


@pytest.fixture(scope="module")
def reference(tf_serving, iris, redis_server):
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


def test_iris_rows_complete_with_the_right_class(reference, iris):
    features, targets = iris
    assert reference["status"] == "completed", reference
    predicted = [row["prediction"] for row in reference["result"]]
    accuracy = sum(p == t for p, t in zip(predicted, targets, strict=True)) / len(targets)
    assert accuracy > 0.95
    first = reference["result"][0]
    assert first["class_name"] == "setosa" and len(first["probabilities"]) == 3
    assert abs(sum(first["probabilities"]) - 1) < 1e-4


def test_one_job_per_class(db, procs, env):
    procs.proxy(env)
    procs.worker(env)
    ids = submit_many(env, [{"data": [row]} for row in (SETOSA, VERSICOLOR, VIRGINICA)])
    jobs = wait_jobs(db, env, ids)
    assert [job["result"][0]["class_name"] for job in jobs] == [
        "setosa",
        "versicolor",
        "virginica",
    ]


def assert_matches_reference(jobs, rows, reference):
    for job, row in zip(jobs, rows, strict=True):
        assert job["status"] == "completed", job
        assert job["result"][0]["prediction"] == reference["result"][row]["prediction"]
        expected = reference["result"][row]["probabilities"]
        assert job["result"][0]["probabilities"] == pytest.approx(expected, abs=1e-5)


def test_500_concurrent_jobs_all_complete_correctly(db, procs, env, iris, reference):
    procs.proxy(env)
    procs.worker(env)
    procs.worker(env)
    rows = [i % 150 for i in range(500)]
    ids = submit_many(env, [{"data": [iris[0][r]]} for r in rows])
    assert len(set(ids)) == 500
    assert_matches_reference(wait_jobs(db, env, ids), rows, reference)
    assert db.llen("queue:predict") == db.llen("queue:predict:processing") == 0


def test_sigkill_a_worker_holding_jobs_loses_nothing(db, procs, env, iris, reference, tf_serving):
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
        held = db.lrange("queue:predict:processing", 0, -1)
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


def test_jobs_wait_while_tf_serving_is_down(db, procs):
    grpc_port, rest_port = free_port(), free_port()
    tf = procs.tf_serving(grpc_port, rest_port)
    env = make_env(grpc_port, rest_port)
    procs.proxy(env)
    worker = procs.worker(env)
    wait_jobs(db, env, submit_many(env, [{"data": [SETOSA]}]))

    tf.stop()
    assert http("GET", f"{base_url(env)}/health")[0] == 503
    ids = submit_many(env, [{"data": [VIRGINICA]}] * 20)
    time.sleep(3)  # the worker tries, gives the jobs back, backs off, tries again
    statuses = db.mget([f"job:{i}:status" for i in ids])
    assert set(statuses) <= {"pending", "processing"}
    assert "jobs returned to the queue" in worker.text()

    procs.tf_serving(grpc_port, rest_port)
    jobs = wait_jobs(db, env, ids, timeout=60)
    assert {job["result"][0]["class_name"] for job in jobs} == {"virginica"}


def test_inference_errors_are_retried_then_failed(db, procs, env):
    procs.proxy(env)
    worker = procs.worker(env | {"MODEL_NAME": "nosuchmodel"})
    job = wait_jobs(db, env, submit_many(env, [{"data": [SETOSA]}]))[0]
    assert job["status"] == "failed"
    assert "after 3 attempts" in job["error"]
    assert worker.text().count("predict failed, retrying") == 2


def test_invalid_data_in_the_queue_fails_that_job_only(db, procs, env):
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


def test_sigterm_returns_or_finishes_in_flight_jobs(db, procs, env):
    procs.proxy(env)
    worker = procs.worker(env)
    ids = submit_many(env, [{"data": [VERSICOLOR]}] * 50)
    worker.signal(signal.SIGTERM)
    assert worker.popen.wait(20) == 0
    assert '"worker stopped"' in worker.text()
    assert db.llen("queue:predict:processing") == 0  # nothing left held
    statuses = db.mget([f"job:{i}:status" for i in ids])
    assert set(statuses) <= {"pending", "completed"}


def test_num_workers_processes_share_the_queue_and_stop_together(db, procs, env, reference, iris):
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


def test_redis_restart_worker_reconnects(procs, tf_serving):
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


def test_health_and_metadata(db, procs, env):
    procs.proxy(env)
    assert http("GET", f"{base_url(env)}/health") == (
        200,
        {"status": "healthy", "components": {"redis": "ok", "tensorflow_serving": "ok"}},
    )
    status, metadata = http("GET", f"{base_url(env)}/metadata")
    assert status == 200 and metadata["model_spec"]["name"] == "iris"
    assert "serving_default" in json.dumps(metadata["metadata"])
