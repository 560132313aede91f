"""Metrics after real traffic: the proxy's /metrics and the worker's METRICS_PORT move by exactly
what was sent, parsed with prometheus-client's own parser; a SIGKILLed worker's job is counted
once as reaped and once as completed."""

import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import pytest
import redis
from conftest import (
    Processes,
    TfServing,
    base_url,
    make_env,
    metrics_url,
    scrape,
    submit_many,
    wait_jobs,
)
from launch import free_port, http

SETOSA = [5.1, 3.5, 1.4, 0.2]


def labels(**pairs: str) -> tuple:
    return tuple(sorted(pairs.items()))


def status(method: str, url: str) -> int:
    """The status of a request whose answer may not be JSON (Starlette's plain-text 404)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code


def requests(metrics: dict[tuple, float], method: str, route: str, code: int) -> float:
    key = ("http_requests_total", labels(method=method, route=route, status=str(code)))
    return metrics.get(key, 0)


def wait_for(check: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def test_the_proxy_counts_each_request_by_route_template(db: redis.Redis, procs: Processes) -> None:
    env = make_env()  # no worker and no TensorFlow Serving: the jobs stay queued
    procs.proxy(env)
    base = base_url(env)
    ids = submit_many(env, [{"data": [SETOSA]}] * 3, threads=3)
    assert http("POST", f"{base}/predict", {"data": [[1, 2, 3]]})[0] == 422
    assert http("POST", f"{base}/predict", {"data": [SETOSA], "priority": "x"})[0] == 422
    assert http("POST", f"{base}/predict", {"data": [SETOSA], "priority": "high"})[0] == 202
    assert http("POST", f"{base}/predict/test")[0] == 202
    for job_id in (ids[0], ids[1], "0000000000"):
        http("GET", f"{base}/job/{job_id}")
    assert http("DELETE", f"{base}/job/{ids[2]}")[0] == 200
    assert status("GET", f"{base}/no/such/path") == 404
    assert status("PUT", f"{base}/predict") == 405

    metrics = scrape(f"{base}/metrics")
    assert requests(metrics, "POST", "/predict", 202) == 4
    assert requests(metrics, "POST", "/predict", 422) == 2
    assert requests(metrics, "PUT", "/predict", 405) == 1
    assert requests(metrics, "POST", "/predict/test", 202) == 1
    assert requests(metrics, "GET", "/job/{job_id}", 200) == 2
    assert requests(metrics, "GET", "/job/{job_id}", 404) == 1
    assert requests(metrics, "DELETE", "/job/{job_id}", 200) == 1
    assert requests(metrics, "GET", "unmatched", 404) == 1
    count = ("http_request_duration_seconds_count", labels(method="POST", route="/predict"))
    assert metrics[count] == 6
    assert metrics[("jobs_submitted_total", labels(priority="normal"))] == 4
    assert metrics[("jobs_submitted_total", labels(priority="high"))] == 1
    # Read from Redis at this scrape: five queued, one of them cancelled.
    assert metrics[("job_queue_length", labels(state="waiting"))] == 4
    assert metrics[("job_queue_length", labels(state="claimed"))] == 0
    # Never a raw path or an id as a label value (/jobs: start_proxy asks it until it is up).
    routes = {dict(key[1]).get("route") for key in metrics if key[0].startswith("http_")}
    assert routes == {"/predict", "/predict/test", "/job/{job_id}", "/jobs", "unmatched"}


def test_metrics_need_the_api_key_when_it_is_set(db: redis.Redis, procs: Processes) -> None:
    env = make_env(API_KEY="s3cret")
    procs.proxy(env)
    base = base_url(env)
    assert status("GET", f"{base}/jobs") == 401
    with pytest.raises(urllib.error.HTTPError) as refused:
        scrape(f"{base}/metrics")
    assert refused.value.code == 401
    metrics = scrape(f"{base}/metrics", {"Authorization": "Bearer s3cret"})
    assert requests(metrics, "GET", "/metrics", 401) == 1
    assert requests(metrics, "GET", "/jobs", 401) >= 2  # start_proxy's checks, and ours


def test_without_redis_the_queue_length_is_absent_not_stale(procs: Processes) -> None:
    port = free_port()
    redis_proc = procs.redis(port)
    env = make_env(REDIS_URL=f"redis://127.0.0.1:{port}/0")
    procs.proxy(env)
    url = f"{base_url(env)}/metrics"
    assert ("job_queue_length", labels(state="waiting")) in scrape(url)
    redis_proc.stop()
    started = time.monotonic()
    metrics = scrape(url)
    assert time.monotonic() - started < 5  # the pool's timeouts bound a scrape
    assert not any(name == "job_queue_length" for name, _ in metrics)
    assert ("http_requests_total", labels(method="GET", route="/metrics", status="200")) in metrics


def test_the_worker_counts_jobs_by_final_status(
    db: redis.Redis, procs: Processes, env: dict
) -> None:
    env = env | {"METRICS_PORT": str(free_port()), "MAX_CLAIMS": "3"}
    procs.proxy(env)
    procs.worker(env)
    good = submit_many(env, [{"data": [SETOSA]}, {"data": [SETOSA] * 2}, {"data": [SETOSA]}])
    # Straight into Redis: data the worker refuses, and a job three workers died holding.
    db.set("job:bad:status", "pending")
    db.set("job:bad:data", json.dumps([[1, 2, 3]]))
    db.set("job:doomed:status", "pending")
    db.set("job:doomed:data", json.dumps([SETOSA]))
    db.hset("queue:predict:attempts", "doomed", 3)
    db.lpush("queue:predict", "bad", "doomed")
    jobs = wait_jobs(db, env, [*good, "bad", "doomed"])
    assert [job["status"] for job in jobs] == ["completed"] * 3 + ["failed"] * 2

    metrics = scrape(metrics_url(env))
    assert metrics[("jobs_finished_total", labels(status="completed"))] == 3
    assert metrics[("jobs_finished_total", labels(status="failed"))] == 2
    # Latency for completed jobs only; attempts for every job a worker finished (not `doomed`,
    # which the CLAIM script failed before any worker ran it).
    assert metrics[("job_latency_seconds_count", ())] == 3
    assert 0 < metrics[("job_latency_seconds_sum", ())] < 3 * 90
    assert metrics[("job_attempts_count", ())] == 4
    assert metrics[("job_attempts_bucket", labels(le="1.0"))] == 4
    # Every row reached TensorFlow Serving exactly once, in however many Predict calls.
    assert metrics[("tf_serving_predict_batch_size_sum", ())] == 4
    calls = metrics[("tf_serving_predict_batch_size_count", ())]
    assert metrics[("tf_serving_predict_duration_seconds_count", ())] == calls
    assert metrics[("jobs_reaped_total", ())] == 0


def test_a_sigkilled_worker_s_job_is_counted_once_as_reaped_and_once_completed(
    db: redis.Redis, procs: Processes, env: dict, tf_serving: TfServing
) -> None:
    """Both processes of a supervised worker die (one mid-Predict, TensorFlow Serving frozen);
    the supervisor's sum keeps what they counted and the replacements' reapers count the job
    they give back once between them."""
    tf_proc, _ = tf_serving
    env = env | {
        "METRICS_PORT": str(free_port()),
        "NUM_WORKERS": "2",
        "PREDICT_TIMEOUT": "120",
        "VISIBILITY_TIMEOUT": "2",
    }
    procs.proxy(env)
    supervisor = procs.worker(env)
    wait_jobs(db, env, submit_many(env, [{"data": [SETOSA]}]))  # one completed before
    children = [
        json.loads(line)["pid"]
        for line in supervisor.text().splitlines()
        if '"worker started"' in line
    ]
    tf_proc.signal(signal.SIGSTOP)
    try:
        [job_id] = submit_many(env, [{"data": [SETOSA]}])
        wait_for(lambda: db.hexists("queue:predict:holder", job_id), 30, "the job claimed")
        for pid in children:
            os.kill(pid, signal.SIGKILL)
    finally:
        tf_proc.signal(signal.SIGCONT)
    [job] = wait_jobs(db, env, [job_id], timeout=180)
    assert job["status"] == "completed"

    metrics = scrape(metrics_url(env))
    assert metrics[("jobs_finished_total", labels(status="completed"))] == 2
    assert metrics[("jobs_reaped_total", ())] == 1
    assert metrics[("worker_restarts_total", ())] == 2
    assert metrics[("job_attempts_bucket", labels(le="1.0"))] == 1  # the first job
    assert metrics[("job_attempts_bucket", labels(le="2.0"))] == 2  # this one: claimed twice
    # The killed holder's Predict call never returned; the replacement's did.
    assert metrics[("tf_serving_predict_batch_size_count", ())] >= 3
    assert metrics[("job_latency_seconds_count", ())] == 2
