"""A real Prometheus (Debian's package) scraping the real proxy and services, queried in PromQL."""

import json
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest
from conftest import ClusterWith, call
from processes import free_port

PROMETHEUS = Path("/usr/bin/prometheus")
ROW = {"data": [[6.5, 3.0, 5.5, 2.0]]}
T = TypeVar("T")

pytestmark = pytest.mark.skipif(
    not PROMETHEUS.exists(), reason="/usr/bin/prometheus missing: apt-get install prometheus"
)


@contextmanager
def prometheus(targets: dict[str, str], directory: Path) -> Iterator[str]:
    """Prometheus on a free loopback port, scraping each job's URL every second; always stopped."""
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [url.removeprefix("http://")]}]}
            for job, url in targets.items()
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


def query(url: str, promql: str) -> list[dict]:
    """The result vector of an instant query: [{"metric": {...}, "value": [t, "v"]}, ...]."""
    with urllib.request.urlopen(
        f"{url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}", timeout=10
    ) as response:
        answer = json.loads(response.read())
    assert answer["status"] == "success", answer
    result: list[dict] = answer["data"]["result"]
    return result


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


def test_prometheus_sees_the_traffic_and_a_stopped_service(
    cluster_with: ClusterWith, tmp_path: Path
) -> None:
    cluster = cluster_with(proxy_env={"SERVICE_TIMEOUT_S": "2"})
    jobs = {"proxy": cluster.proxy.url}
    jobs.update({f"service_{name}": process.url for name, process in cluster.services.items()})
    with prometheus(jobs, tmp_path) as prom:
        up = until(lambda: len(query(prom, "up == 1")) == len(jobs), what="every target up")
        assert up

        def traffic() -> None:
            assert call(cluster.proxy.url + "/predict/label", ROW)[0] == 200

        rate = 'sum(rate(http_requests_total{job="proxy", route="/predict/label"}[1m])) > 0'
        until(lambda: query(prom, rate), what=rate, then=traffic)
        served = 'sum by (job) (increase(http_requests_total{route="/predict", status="200"}[1m]))'
        until(
            lambda: (
                {r["metric"]["job"] for r in query(prom, served + " > 0")}
                == {f"service_{name}" for name in cluster.services}
            ),
            what="every service serving the proxy's calls",
            then=traffic,
        )

        cluster.services["virginica"].kill()
        failures = "sum by (service, reason) (increase(fanout_service_call_failures_total[1m])) > 0"
        failed = until(lambda: query(prom, failures), what=failures, then=traffic)
        assert [r["metric"] for r in failed] == [{"service": "virginica", "reason": "connect"}]
        partial = "increase(fanout_partial_answers_total[1m]) > 0"
        until(lambda: query(prom, partial), what=partial, then=traffic)
        down = until(lambda: query(prom, "up == 0"), what="the stopped service's target down")
        assert [r["metric"]["job"] for r in down] == ["service_virginica"]
