"""A real Prometheus (Debian's package) scraping the real API and a loop-mode job, queried in
PromQL: the rows waiting go to 0 after the job's run, and the rows predicted grow by exactly the
rows registered."""

import json
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from config import Settings
from conftest import Processes, env_for, free_port, http

PROMETHEUS = Path("/usr/bin/prometheus")
ROWS = 1_000

T = TypeVar("T")
pytestmark = pytest.mark.skipif(
    not PROMETHEUS.exists(), reason="/usr/bin/prometheus missing: apt-get install prometheus"
)


@contextmanager
def prometheus(targets: dict[str, str], directory: Path) -> Iterator[str]:
    """Prometheus on a free loopback port, scraping each job's host:port every second, with a
    data directory of its own; always stopped."""
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [target]}]}
            for job, target in targets.items()
        ],
    }
    (directory / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    address = f"127.0.0.1:{free_port()}"
    with open(directory / "prometheus.log", "w") as log:
        server = subprocess.Popen(
            [
                str(PROMETHEUS),
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address={address}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://{address}"
        until(lambda: ready(url, server), what="Prometheus ready")
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def ready(url: str, server: subprocess.Popen[bytes]) -> bool:
    assert server.poll() is None, "Prometheus exited: see prometheus.log in the test's tmp_path"
    try:
        with urllib.request.urlopen(url + "/-/ready", timeout=2) as response:
            ok: bool = response.status == 200
            return ok
    except OSError:
        return False


def query(url: str, promql: str) -> list[dict[str, Any]]:
    """The result vector of an instant query: [{"metric": {...}, "value": [t, "v"]}, ...]."""
    with urllib.request.urlopen(
        f"{url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}", timeout=10
    ) as response:
        answer = json.loads(response.read())
    assert answer["status"] == "success", answer
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def scalar(url: str, promql: str) -> float | None:
    """The one value of a query with a one-element result, else None."""
    result = query(url, promql)
    return float(result[0]["value"][1]) if len(result) == 1 else None


def until(condition: Callable[[], T], timeout: float = 60, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.5)
    return value


def test_prometheus_sees_the_waiting_rows_drain(
    api: str, settings: Settings, processes: Processes, tmp_path: Path
) -> None:
    job_port = free_port()
    targets = {"api": api.removeprefix("http://"), "job": f"127.0.0.1:{job_port}"}
    with prometheus(targets, tmp_path) as prom:
        until(lambda: query(prom, 'up{job="api"} == 1'), what="the API's target up")
        until(lambda: scalar(prom, "batch_rows_unpredicted") == 0, what="an empty table seen")
        items = {"items": [{"values": [5.9, 3.0, 5.1, 1.8]}] * ROWS}
        assert http("POST", api + "/data/list", items)[0] == 201
        until(lambda: scalar(prom, "batch_rows_unpredicted") == ROWS, what=f"{ROWS} rows waiting")

        # The loop job waits INTERVAL before its first run: long enough to be scraped at 0.
        env = env_for(settings, INTERVAL=5, CHUNK_SIZE=100, METRICS_PORT=job_port)
        processes.start(["job.py"], env, "loop")
        until(
            lambda: scalar(prom, 'batch_rows_predicted_total{job="job"}') == 0,
            what="the job's target up, before its first run",
        )
        drained = "batch_rows_unpredicted == 0 and max_over_time(batch_rows_unpredicted[5m]) > 0"
        until(lambda: query(prom, drained), what=drained)
        recent = "time() - batch_last_success_timestamp_seconds < 60"
        until(lambda: query(prom, recent), what=recent)

        # increase() extrapolates to the window's edges, so it is not exact: over a window with
        # no restart, the last value minus the first is.
        def grew(metric: str) -> float | None:
            return scalar(prom, f"sum(max_over_time({metric}[5m]) - min_over_time({metric}[5m]))")

        until(lambda: grew("batch_rows_predicted_total") == ROWS, what=f"{ROWS} rows predicted")
        assert grew("batch_rows_registered_total") == ROWS
        assert scalar(prom, "sum(batch_chunk_duration_seconds_count)") == ROWS / 100
        assert scalar(prom, "sum(batch_rows_quarantined_total)") == 0
