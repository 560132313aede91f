"""The compose stack for real: the walkthrough, replicas sharing the calls, a stopped service, a
crashed one, and the monitoring profile's Prometheus scraping every replica. Run by
`make containers` (../.ci/containers/chapter.sh), which brings the stack up healthy first, sets
COMPOSE (a command prefix for this stack) and takes it down afterwards.
"""

import json
import os
import re
import shlex
import subprocess
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import CONTAINER_NOTES, call
from processes import HERE

pytestmark = [
    pytest.mark.containers,
    pytest.mark.skipif(
        not os.environ.get("COMPOSE"),
        reason="COMPOSE is unset: run `make containers`, which starts the compose stack",
    ),
]

ROW = {"data": [[6.5, 3.0, 5.5, 2.0]]}
LABEL = {"prediction": {"proba": 0.982979, "label": "virginica"}}  # the README's answer for ROW
TIMEOUT_S = 1.0  # SERVICE_TIMEOUT_S in compose.yaml
LIFETIME_S = 5.0  # CONNECTION_LIFETIME_S in compose.yaml
# Why a call to a stopped service fails depends on timing: its name is gone from Docker's DNS
# ("cannot connect"), but the proxy may still hold the old address for up to LIFETIME_S, and a
# connection to an address nobody has any more hangs until the call's timeout.
GONE = re.compile(rf'"(cannot connect|no answer within {TIMEOUT_S} s)"')


def compose(*args: str, timeout: float = 180) -> str:
    command = shlex.split(os.environ["COMPOSE"]) + list(args)
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{shlex.join(args)}: {done.stderr[-2000:]}"
    return done.stdout


def proxy_url() -> str:
    return "http://" + compose("port", "proxy", "9000").strip()


def until(condition: Callable[[], object], timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not after {timeout} s"
        time.sleep(0.2)


def all_healthy(proxy: str) -> bool:
    try:
        status, body = call(proxy + "/health/all", timeout=5)
    except OSError:
        return False
    return status == 200 and all(v == {"health": "ok"} for v in body.values())


def log_entries(service: str) -> list[tuple[str, dict]]:
    """(container, JSON log entry) for each line every replica of a service has logged."""
    entries = []
    for line in compose("logs", "--no-color", service).splitlines():
        container, sep, text = line.partition("|")
        if sep and text.strip().startswith("{"):
            entries.append((container.strip(), json.loads(text)))
    return entries


def predictions_by_replica(service: str) -> Counter:
    return Counter(
        container
        for container, entry in log_entries(service)
        if entry.get("method") == "POST" and entry.get("path") == "/predict"
    )


def readme_answers() -> list[str]:
    """Every answer line of the README's walkthrough, with the missing service's reason masked."""
    text = (HERE / "README.md").read_text()
    walkthrough = text[text.index("## Walkthrough") : text.index("## Failure behaviour")]
    lines = [line for line in walkthrough.splitlines() if line.startswith("{")]
    return [GONE.sub('"GONE"', line) for line in lines if '"time"' not in line]


def test_the_walkthrough_gives_the_readme_answers() -> None:
    env = {**os.environ, "COMPOSE": os.environ["COMPOSE"]}
    done = subprocess.run(
        ["bash", str(HERE / "demo.sh")], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    output = GONE.sub('"GONE"', done.stdout)
    missing = [line for line in readme_answers() if line not in output]
    assert not missing, f"README answers not given by the containers: {missing}"
    assert all_healthy(proxy_url())  # demo.sh started virginica again


def test_replicas_of_a_service_share_its_calls() -> None:
    proxy = proxy_url()
    compose("up", "-d", "--wait", "--pull", "never", "--no-recreate",
            "--scale", "service_virginica=3")  # fmt: skip
    try:
        replicas = compose("ps", "-q", "service_virginica").split()
        assert len(replicas) == 3
        before = predictions_by_replica("service_virginica")
        # One caller, one request at a time: one connection, renewed every LIFETIME_S, each new
        # one to the next address of the name's current answer (Docker's DNS lists all three).
        started = time.monotonic()
        while time.monotonic() - started < 2 * LIFETIME_S + 2:
            status, body = call(proxy + "/predict/label", ROW)
            assert (status, body) == (200, LABEL)
        one_at_a_time = predictions_by_replica("service_virginica") - before
        # 30 callers at once: 30 connections, opened in turn to each replica.
        with ThreadPoolExecutor(30) as pool:
            answers = list(pool.map(lambda _: call(proxy + "/predict/label", ROW), range(30)))
        assert all(status == 200 and "missing" not in body for status, body in answers)
        at_once = predictions_by_replica("service_virginica") - before - one_at_a_time
        CONTAINER_NOTES.append(f"virginica calls, one at a time for 12 s: {dict(one_at_a_time)}")
        CONTAINER_NOTES.append(f"virginica calls, 30 at once: {dict(at_once)}")
        assert len(at_once) == 3 and min(at_once.values()) >= 5, at_once
        assert sum(one_at_a_time.values()) > 0
    finally:
        compose("up", "-d", "--wait", "--pull", "never", "--no-recreate",
                "--scale", "service_virginica=1")  # fmt: skip
    assert len(compose("ps", "-q", "service_virginica").split()) == 1
    until(lambda: all_healthy(proxy), what="every service healthy after scaling back")
    assert call(proxy + "/predict/label", ROW) == (200, LABEL)


def test_a_stopped_service_is_named_within_its_timeout() -> None:
    proxy = proxy_url()
    compose("stop", "service_setosa")
    try:
        for _ in range(3):  # the first call may still find a cached address, the others not
            started = time.monotonic()
            status, body = call(proxy + "/predict/label", ROW)
            elapsed = time.monotonic() - started
            assert status == 200
            assert body["prediction"] == {"proba": 0.982979, "label": "virginica"}
            assert set(body["missing"]) == {"setosa"}
            assert GONE.fullmatch(f'"{body["missing"]["setosa"]}"'), body
            assert elapsed < TIMEOUT_S + 1.0  # its timeout, plus the proxy's own time
            CONTAINER_NOTES.append(f"setosa stopped: {body['missing']} in {elapsed:.2f} s")
    finally:
        compose("start", "service_setosa")
    until(lambda: all_healthy(proxy), what="setosa healthy after start")
    assert "missing" not in call(proxy + "/predict/label", ROW)[1]


def test_a_crashed_service_is_restarted() -> None:
    proxy = proxy_url()

    def starts() -> int:
        return sum(
            "Started server process" in e["message"] for _, e in log_entries("service_versicolor")
        )

    before = starts()
    # A real crash: SIGKILL to Python inside its container (PID 1 there is the init of
    # `init: true`, and Python its only child). `docker compose kill` would be a manual stop.
    python_pid = "$(cat /proc/1/task/1/children)"
    compose("exec", "-T", "service_versicolor", "sh", "-c", f"kill -KILL {python_pid}")
    until(lambda: starts() > before, what="versicolor started again by its restart policy")
    until(lambda: all_healthy(proxy), what="versicolor healthy after the crash")
    status, body = call(proxy + "/predict", ROW)
    assert status == 200 and all("prediction" in v for v in body.values()), body


def prometheus_get(url: str, path: str, **params: str) -> dict:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(url + path + query, timeout=5) as response:
        answer = json.loads(response.read())
    assert answer["status"] == "success", answer
    data: dict = answer["data"]
    return data


def targets_up(prometheus: str) -> Counter:
    """How many targets of each job Prometheus scrapes successfully; empty while it starts."""
    try:
        targets = prometheus_get(prometheus, "/api/v1/targets", state="active")["activeTargets"]
    except OSError:
        return Counter()
    return Counter(t["labels"]["job"] for t in targets if t["health"] == "up")


def test_prometheus_scrapes_every_role_and_every_replica() -> None:
    monitoring = ("--profile", "monitoring")
    proxy = proxy_url()
    compose(*monitoring, "up", "-d", "--wait", "--pull", "never", "prometheus")
    try:
        prometheus = "http://" + compose(*monitoring, "port", "prometheus", "9090").strip()
        one_each = Counter(proxy=1, service_setosa=1, service_versicolor=1, service_virginica=1)
        until(lambda: targets_up(prometheus) == one_each, what=f"targets {dict(one_each)} up")
        compose("up", "-d", "--wait", "--pull", "never", "--no-recreate",
                "--scale", "service_virginica=3")  # fmt: skip
        try:
            # dns_sd_configs re-reads the name every 5 s: each new address is a target.
            until(lambda: targets_up(prometheus)["service_virginica"] == 3,
                  what="three virginica targets up")  # fmt: skip
            CONTAINER_NOTES.append(f"prometheus targets up, scaled: {dict(targets_up(prometheus))}")

            def traffic_seen() -> list:
                assert call(proxy + "/predict/label", ROW) == (200, LABEL)
                rate = "sum(rate(http_requests_total{job='proxy', route='/predict/label'}[1m])) > 0"
                result: list = prometheus_get(prometheus, "/api/v1/query", query=rate)["result"]
                return result

            until(traffic_seen, what="the proxy's request rate in Prometheus")
        finally:
            compose("up", "-d", "--wait", "--pull", "never", "--no-recreate",
                    "--scale", "service_virginica=1")  # fmt: skip
        until(lambda: targets_up(prometheus) == one_each, what="back to one target each")
    finally:
        compose(*monitoring, "rm", "--stop", "--force", "--volumes", "prometheus")
