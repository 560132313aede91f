"""A real Prometheus server (Debian's package) scrapes the proxy and the worker every second and
sees the pattern's signal through its HTTP API: a burst of jobs queues, then the queue's length
falls back to 0 while every job completes."""

import json
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from conftest import Processes, submit_many, wait_jobs
from launch import free_port

PROMETHEUS = Path("/usr/bin/prometheus")
BURST = 20
SETOSA = [5.1, 3.5, 1.4, 0.2]


class Prometheus:
    """Prometheus on a free loopback port, its own data directory, scraping every second."""

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
                str(PROMETHEUS),
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

    def wait(self, check: Callable[[], object], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.log.flush()
                log = Path(self.log.name).read_text()[-3000:]
                raise TimeoutError(f"{what}\n--- prometheus ---\n{log}")
            time.sleep(0.5)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.mark.skipif(
    not PROMETHEUS.exists(), reason=f"{PROMETHEUS} missing: apt-get install prometheus"
)
def test_prometheus_sees_a_burst_of_jobs_drain(
    db: redis.Redis, procs: Processes, env: dict, tmp_path: Path
) -> None:
    env = env | {"METRICS_PORT": str(free_port())}
    procs.proxy(env)
    worker = procs.worker(env)
    prometheus = Prometheus(
        tmp_path,
        {"proxy": f"127.0.0.1:{env['PORT']}", "worker": f"127.0.0.1:{env['METRICS_PORT']}"},
    )
    try:
        prometheus.wait(lambda: prometheus.targets_up() == {"proxy", "worker"}, 60, "targets up")
        # The worker frozen: the burst can only pile up (its pending BLMOVE may take one job).
        worker.signal(signal.SIGSTOP)
        try:
            ids = submit_many(env, [{"data": [SETOSA]}] * BURST)
            prometheus.wait(
                lambda: prometheus.query(f"sum(job_queue_length) >= {BURST}"),
                30,
                "Prometheus to see the burst queued",
            )
        finally:
            worker.signal(signal.SIGCONT)
        # The pattern's signal: the queue back at 0, after a minute in which it held the burst.
        drained = (
            f"sum(job_queue_length) == 0 and max_over_time(sum(job_queue_length)[1m:1s]) >= {BURST}"
        )
        prometheus.wait(lambda: prometheus.query(drained), 90, "Prometheus to see the queue drain")
        assert {job["status"] for job in wait_jobs(db, env, ids)} == {"completed"}
        prometheus.wait(
            lambda: prometheus.query('sum(jobs_finished_total{status="completed"})') == [BURST],
            30,
            "Prometheus to see every job completed",
        )
        # A rate needs two scrapes of a series; its own scrapes of /metrics keep it above 0.
        prometheus.wait(
            lambda: prometheus.query("sum(rate(http_requests_total[1m])) > 0"),
            30,
            "Prometheus to compute a request rate",
        )
        # The burst arrived whole.
        assert prometheus.query('sum(http_requests_total{route="/predict", status="202"})') == [
            BURST
        ]
        prometheus.wait(
            lambda: prometheus.query(
                "histogram_quantile(0.5, sum by (le) (rate(job_latency_seconds_bucket[1m]))) > 0"
            ),
            30,
            "Prometheus to compute a job latency",
        )
    finally:
        prometheus.stop()
