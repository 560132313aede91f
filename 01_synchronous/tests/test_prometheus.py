"""A real Prometheus (Debian's package) scraping the server's TensorFlow Serving page, queried in
PromQL through its HTTP API: what a dashboard on this chapter would ask.

Runs against the stand-in (`make test`) or a real server (TF_SERVING_HOST): the
:tensorflow:serving:* queries hold for both. Bounded: a few seconds of 1 s scrapes.
"""

import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import METRICS_PATH, REAL_SERVER, Server
from rest_client import RestClient

PROMETHEUS = Path("/usr/bin/prometheus")
ROW = [[5.1, 3.5, 1.4, 0.2]]
pytestmark = pytest.mark.skipif(
    not PROMETHEUS.exists(), reason="/usr/bin/prometheus missing: apt-get install prometheus"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def prometheus(target: str, directory: Path) -> Iterator[str]:
    """Prometheus on a free loopback port scraping target's page every second; always stopped."""
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "tfserving",
                "metrics_path": METRICS_PATH,
                "static_configs": [{"targets": [target]}],
            }
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
            status: int = response.status
            return status == 200
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


T = TypeVar("T")


def until(
    condition: Callable[[], T],
    timeout: float = 45,
    what: str = "condition",
    then: Callable[[], None] | None = None,
) -> T:
    """Poll condition() until it is truthy (calling then() between tries); return its value."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        if then:
            then()
        time.sleep(0.5)
    return value


# The dashboard's queries (README, Metrics). A name starting with ':' is a valid PromQL name,
# as TensorFlow Serving's dashboards write it; {__name__="..."} is the same selector.
REQUEST_RATE = 'sum by (status) (rate(:tensorflow:serving:request_count{model_name="iris"}[1m]))'
SAME_BY_NAME = 'sum(rate({__name__=":tensorflow:serving:request_count", status="OK"}[1m]))'
P99_MS = (
    "histogram_quantile(0.99, sum by (le) ("
    'rate(:tensorflow:serving:request_latency_bucket{API="predict", entrypoint="REST"}[1m])'
    ")) / 1000"
)
QUEUE_WAIT_MS = (
    "rate(:tensorflow:serving:batching_session:queuing_latency_sum[1m])"
    " / rate(:tensorflow:serving:batching_session:queuing_latency_count[1m]) / 1000"
)


def test_prometheus_sees_the_predictions(server: Server, rest: RestClient, tmp_path: Path) -> None:
    with prometheus(f"{server.host}:{server.rest_port}", tmp_path) as prom:
        until(lambda: query(prom, 'up{job="tfserving"} == 1'), what="the target up")

        def traffic() -> None:
            for _ in range(5):
                rest.predict(ROW)

        ok = until(lambda: query(prom, REQUEST_RATE + " > 0"), what=REQUEST_RATE, then=traffic)
        assert {r["metric"]["status"] for r in ok} == {"OK"}
        assert float(until(lambda: query(prom, SAME_BY_NAME), then=traffic)[0]["value"][1]) > 0
        p99 = until(lambda: query(prom, P99_MS + " > 0"), what=P99_MS, then=traffic)
        assert float(p99[0]["value"][1]) < 60_000  # milliseconds: below the last finite bucket
        until(lambda: query(prom, QUEUE_WAIT_MS + " >= 0"), what=QUEUE_WAIT_MS, then=traffic)
        if not REAL_SERVER:  # the stand-in's own HTTP metrics, on the same page
            http = 'sum(rate(http_requests_total{route="/v1/models/{model_name}:predict"}[1m])) > 0'
            until(lambda: query(prom, http), what=http, then=traffic)
