"""Metrics after real traffic: the proxy's and the worker's /metrics move by exactly what was sent,
and a real Prometheus server scrapes both and sees a burst of jobs drain."""

import functools
import json
import os
import shutil
import signal
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import redis
from conftest import (
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

PROMETHEUS = "/usr/bin/prometheus"


def labels(**pairs: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(pairs.items()))


def status(method: str, url: str) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as r:
            code: int = r.status
            return code
    except urllib.error.HTTPError as exc:
        return exc.code


def requests(metrics: dict[tuple, float], method: str, route: str, status: str) -> float:
    return metrics.get(
        ("http_requests_total", labels(method=method, route=route, status=status)), 0
    )


def test_the_proxy_counts_each_request_by_route_template(start: Started, db: redis.Redis) -> None:
    _, base = start_proxy(start)
    good = json.dumps({"image_data": SAMPLE_B64}).encode()
    for _ in range(3):
        assert http("POST", f"{base}/predict", good)[0] == 200
    for body in (b"not json", b'{"image_data": "not base64!"}'):
        assert http("POST", f"{base}/predict", body)[0] == 400
    assert http("GET", f"{base}/predict/test")[0] == 200
    job_ids = [key.decode() for key in db.lrange("queue:jobs", 0, -1) if isinstance(key, bytes)]
    for job_id in (*job_ids[:2], "000000", "123abc"):
        http("GET", f"{base}/job/{job_id}")
    assert status("GET", f"{base}/no/such/path") == 404  # Starlette's plain-text 404
    assert status("HEAD", f"{base}/") == 200

    metrics = scrape(f"{base}/metrics")
    assert requests(metrics, "POST", "/predict", "200") == 3
    assert requests(metrics, "POST", "/predict", "400") == 2
    assert requests(metrics, "GET", "/predict/test", "200") == 1
    assert requests(metrics, "GET", "/job/{job_id}", "200") == 2
    assert requests(metrics, "GET", "/job/{job_id}", "404") == 2
    assert requests(metrics, "GET", "unmatched", "404") == 1
    assert requests(metrics, "HEAD", "/", "200") == 1
    duration = metrics[
        ("http_request_duration_seconds_count", labels(method="POST", route="/predict"))
    ]
    assert duration == 5
    # One fast inference per image that decoded; a job queued for each.
    assert (
        metrics[("model_inference_duration_seconds_count", labels(model="efficientnet_lite0"))] == 4
    )
    assert metrics[("jobs_submitted_total", ())] == 4
    # Never a raw path or an id as a label value.
    routes = {dict(key[1]).get("route") for key in metrics if key[0].startswith("http_")}
    assert routes <= {
        "/predict",
        "/predict/test",
        "/job/{job_id}",
        "/",
        "/openapi.json",
        "unmatched",
    }


def test_metrics_need_the_api_key_when_it_is_set(start: Started, db: redis.Redis) -> None:
    _, base = start_proxy(start, API_KEY="s3cret")
    assert http("GET", f"{base}/metadata")[0] == 401
    with pytest.raises(urllib.error.HTTPError) as refused:
        scrape(f"{base}/metrics")
    assert refused.value.code == 401
    metrics = scrape(f"{base}/metrics", headers={"Authorization": "Bearer s3cret"})
    assert requests(metrics, "GET", "/metadata", "401") == 1
    assert requests(metrics, "GET", "/metrics", "401") == 1


def test_the_worker_counts_jobs_by_final_status(start: Started, db: redis.Redis) -> None:
    worker = start_worker(start, MAX_ATTEMPTS=3)
    job_ids = [submit(SAMPLE) for _ in range(3)]
    db.hset("queue:jobs:attempts", "abcdef", 3)  # as if three processes had died on it
    db.set("image:abcdef", SAMPLE)
    db.lpush("queue:jobs", "abcdef")
    for job_id in (*job_ids, "abcdef"):
        wait_until(functools.partial(result, db, job_id), 60, f"job {job_id}", worker)

    metrics = scrape(worker.metrics_url)
    assert metrics[("jobs_finished_total", labels(status="complete"))] == 3
    assert metrics[("jobs_finished_total", labels(status="failed"))] == 1
    # Latency for the completed jobs only; each took one claim, the poison job its fourth.
    assert metrics[("job_latency_seconds_count", ())] == 3
    assert 0 < metrics[("job_latency_seconds_sum", ())] < 3 * 60
    assert metrics[("job_attempts_count", ())] == 4
    assert metrics[("job_attempts_bucket", labels(le="1.0"))] == 3
    assert metrics[("job_attempts_bucket", labels(le="4.0"))] == 4
    assert metrics[("model_inference_duration_seconds_count", labels(model="resnet50"))] == 3
    assert metrics[("jobs_reaped_total", ())] == 0
    assert metrics[("worker_restarts_total", ())] == 0
    assert metrics[("job_queue_length", labels(state="waiting"))] == 0


class Prometheus:
    """A real Prometheus server on a free port, its own data directory, scraping every second."""

    def __init__(self, tmp_path: Path, targets: dict[str, str]):
        self.port = free_port()
        jobs = [
            {"job_name": name, "static_configs": [{"targets": [target]}]}
            for name, target in targets.items()
        ]
        config = tmp_path / "prometheus.yml"
        # JSON is YAML: no YAML writer needed.
        config.write_text(json.dumps({"global": {"scrape_interval": "1s"}, "scrape_configs": jobs}))
        self.log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def api(self, path: str, **params: str) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        data: dict = body["data"]
        return data

    def query(self, promql: str) -> list[float]:
        return [float(s["value"][1]) for s in self.api("query", query=promql)["result"]]

    def targets_up(self) -> set[str]:
        try:
            active = self.api("targets")["activeTargets"]
        except OSError:
            return set()  # not listening yet
        return {t["labels"]["job"] for t in active if t["health"] == "up"}

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.mark.skipif(
    not shutil.which(PROMETHEUS), reason=f"{PROMETHEUS} missing: apt-get install prometheus"
)
def test_prometheus_sees_a_burst_of_jobs_drain(
    start: Started, db: redis.Redis, tmp_path: Path
) -> None:
    burst = 12
    _, base = start_proxy(start)
    # Claims never expire here: a stopped process keeps its job without a reaper's help.
    worker = start_worker(start, VISIBILITY_TIMEOUT=300)
    prometheus = Prometheus(
        tmp_path,
        {"proxy": base.removeprefix("http://"), "worker": worker.metrics_url.split("/")[2]},
    )
    try:
        wait_until(lambda: prometheus.targets_up() == {"proxy", "worker"}, 60, "both targets up")
        # Both processes stopped: the burst can only pile up (at most one job each is claimed).
        pids = worker_processes(db, worker)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            body = json.dumps({"image_data": SAMPLE_B64}).encode()
            for _ in range(burst):
                assert http("POST", f"{base}/predict", body)[0] == 200
            wait_until(
                lambda: prometheus.query(f"sum(job_queue_length) >= {burst}"),
                30,
                "Prometheus to see the burst queued",
            )
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        # The pattern's signal: the queue back at 0, after a minute in which it held the burst.
        drained = (
            f"sum(job_queue_length) == 0 and max_over_time(sum(job_queue_length)[1m:1s]) >= {burst}"
        )
        wait_until(lambda: prometheus.query(drained), 90, "Prometheus to see the queue drain")
        wait_until(
            lambda: prometheus.query('sum(jobs_finished_total{status="complete"})') == [burst],
            30,
            "Prometheus to see every job complete",
        )
        # A rate needs two scrapes of a series; its own scrapes of /metrics keep it above 0.
        wait_until(
            lambda: prometheus.query("sum(rate(http_requests_total[1m])) > 0"),
            30,
            "Prometheus to compute a request rate",
        )
        predicted = 'sum(http_requests_total{route="/predict", status="200"})'
        assert prometheus.query(predicted) == [burst]  # the burst arrived whole
        wait_until(
            lambda: prometheus.query(
                "histogram_quantile(0.5, sum by (le) (rate(job_latency_seconds_bucket[1m]))) > 0"
            ),
            30,
            "Prometheus to compute a job latency",
        )
    finally:
        prometheus.stop()
