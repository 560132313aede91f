"""The compose stack for real: `make containers` (../.ci/containers/chapter.sh .) brings it up
healthy, runs these, and takes it down.

COMPOSE is a command prefix for the stack (`$COMPOSE port tfserving 8501` -> 127.0.0.1:NNNNN:
ports are ephemeral, on loopback). In order: the README walkthrough (demo.sh) against the
container, the `client` service's REST and gRPC calls, the chapter's own tests against the
container, the `monitoring` profile's Prometheus scraping it, and last a crash of the server,
which the restart policy must answer.

In CI `tensorflow/serving:2.18.0` is the stand-in built from local_serving.py (Docker Hub is
unreachable), but the chapter's tests treat it as the real server (TF_SERVING_HOST set): they
check what a user's run against tensorflow/serving checks. The stand-in-only tests (its log,
bind address, limits, fuzzing from /openapi.json) start their own server in `make test`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from typing import Any

import numpy as np
import pytest
from conftest import CHAPTER

COMPOSE = shlex.split(os.environ.get("COMPOSE", ""))
pytestmark = [
    pytest.mark.containers,
    pytest.mark.skipif(
        not COMPOSE, reason="COMPOSE is unset: run `make containers`, which brings the stack up"
    ),
]
SAMPLE_CLASSES = [0, 2]  # cli.SAMPLE_ROWS: a setosa and a virginica
RESTART_TIMEOUT = 300  # seconds: the server loads TensorFlow again on a busy 2-core machine


def compose(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*COMPOSE, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def published(port: int) -> tuple[str, int]:
    """Where the host reaches tfserving's container port (asked again after a restart)."""
    return published_by("tfserving", port)


def published_by(service: str, port: int) -> tuple[str, int]:
    answer = compose("--profile", "monitoring", "port", service, str(port))
    assert answer.returncode == 0, answer.stderr
    host, _, host_port = answer.stdout.strip().rpartition(":")
    return host, int(host_port)


def server_env() -> dict[str, str]:
    """The clients', demo.sh's and conftest's variables, naming the container's ports."""
    host, rest_port = published(8501)
    _, grpc_port = published(8500)
    return dict(
        os.environ,
        TF_SERVING_HOST=host,
        TF_SERVING_REST_PORT=str(rest_port),
        TF_SERVING_GRPC_PORT=str(grpc_port),
    )


def transcript(text: str) -> list[tuple[str, str]]:
    """(command, output) for each `$ command` line of demo.sh's output or of a README block."""
    pairs = []
    for chunk in re.split(r"^\$ ", text, flags=re.MULTILINE)[1:]:
        command, _, output = chunk.partition("\n")
        pairs.append((command, output.split("```")[0].strip()))
    return pairs


def answer_to(pairs: list[tuple[str, str]], pattern: str) -> str:
    """The output of the first curl command matching pattern (a regex)."""
    for command, output in pairs:
        if "curl " in command and re.search(pattern, command):
            return output
    raise AssertionError(f"no curl command matching {pattern!r}")


# The README's walkthrough answers demo.sh must reproduce: JSON compared by value (TensorFlow
# Serving spaces its JSON differently), error answers by their status line.
JSON_ANSWERS = [
    r"/v1/models/iris$",  # status
    re.escape("[[5.1, 3.5, 1.4, 0.2], [6.3, 3.3, 6.0, 2.5]]}' "),  # row format
    re.escape('{"inputs": {"input": [[5.9, 3.0, 5.1, 1.8]]}}') + ".*versions/1:predict$",
    re.escape("| gzip |"),
]
STATUS_ANSWERS = [
    re.escape("[[5.1, 3.5, 1.4]]}' "),  # wrong shape
    re.escape("[[5.1, 3.5' "),  # malformed JSON
    r"versions/2:predict$",  # unknown version
]


def test_walkthrough_gives_the_readme_answers() -> None:
    run = subprocess.run(
        ["./demo.sh"], cwd=CHAPTER, env=server_env(), capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "demo: all steps answered as expected" in run.stdout
    demo = transcript(run.stdout)
    readme = transcript((CHAPTER / "README.md").read_text())
    for pattern in JSON_ANSWERS:
        got, shown = json.loads(answer_to(demo, pattern)), json.loads(answer_to(readme, pattern))
        if "model_version_status" in shown:
            assert got == shown
        else:
            key = "outputs" if "outputs" in shown else "predictions"
            # The same probabilities to 7 decimals: float32 softmax on another CPU (oneDNN picks
            # its kernels by instruction set) moves a 1e-6 probability in its 6th digit.
            np.testing.assert_allclose(got[key], shown[key], rtol=1e-5, atol=1e-7)
    for pattern in STATUS_ANSWERS:
        got, shown = answer_to(demo, pattern), answer_to(readme, pattern)
        assert got.splitlines()[0] == shown.splitlines()[0]


def json_values(text: str) -> list:
    """Every JSON document printed one after another (indented or not)."""
    decoder, values, index = json.JSONDecoder(), [], 0
    while index < len(text.rstrip()):
        while text[index].isspace():
            index += 1
        value, index = decoder.raw_decode(text, index)
        values.append(value)
    return values


def test_client_service_answers_with_the_right_classes() -> None:
    # The image from this checkout (`up` leaves the profiled client out; cached layers make it
    # quick after the first run).
    build = compose("--profile", "client", "build", "client", timeout=1800)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    run = compose("run", "--rm", "-T", "client", timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    status, rest, grpc_ = json_values(run.stdout)
    assert status["model_version_status"][0]["state"] == "AVAILABLE"
    assert np.argmax(rest["predictions"], axis=1).tolist() == SAMPLE_CLASSES
    assert np.argmax(grpc_["output"], axis=1).tolist() == SAMPLE_CLASSES
    # REST prints the float32 values' shortest decimal text, gRPC the exact values.
    np.testing.assert_allclose(rest["predictions"], grpc_["output"], rtol=1e-6)


def test_client_image_runs_as_a_user_and_its_size(capsys: pytest.CaptureFixture[str]) -> None:
    run = compose("run", "--rm", "--no-deps", "-T", "client", "id", "-u")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() != "0", "the client image runs as root"
    images = compose("--profile", "client", "config", "--images").stdout.split()
    with capsys.disabled():
        for image in sorted(set(images)):
            size = subprocess.run(
                ["docker", "image", "inspect", "-f", "{{.Size}}", image],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            print(f"\n  image {image}: {int(size) / 1e6:.0f} MB", end="")
        print()


def test_chapter_tests_pass_against_the_container(capsys: pytest.CaptureFixture[str]) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not containers"],
        cwd=CHAPTER, env=server_env(), capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    with capsys.disabled():
        print("\n  chapter tests against the container:", run.stdout.strip().splitlines()[-1])


PROMETHEUS_TIMEOUT = 120  # seconds: start, first scrapes, a query's window filling


def prometheus_api(path: str) -> dict[str, Any]:
    host, port = published_by("prometheus", 9090)
    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=10) as response:
        answer = json.loads(response.read())
    assert answer["status"] == "success", answer
    data: dict[str, Any] = answer["data"]
    return data


def test_monitoring_profile_scrapes_tfserving() -> None:
    # chapter.sh starts the stack without profiles: the profile's Prometheus is started (and
    # removed) here, from the chapter's own prometheus.yml.
    up = compose("--profile", "monitoring", "up", "-d", "--wait", "--pull", "never", "prometheus")
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        deadline = time.monotonic() + PROMETHEUS_TIMEOUT
        while True:
            try:
                targets = prometheus_api("/api/v1/targets")["activeTargets"]
            except OSError:
                targets = []
            if targets and all(t["health"] == "up" for t in targets):
                break
            assert time.monotonic() < deadline, f"targets not all up: {targets}"
            time.sleep(1)
        assert [(t["labels"]["job"], t["scrapeUrl"]) for t in targets] == [
            ("tfserving", "http://tfserving:8501/monitoring/prometheus/metrics")
        ]
        host, port = published(8501)
        body = json.dumps({"instances": [[5.1, 3.5, 1.4, 0.2]]}).encode()
        url = f"http://{host}:{port}/v1/models/iris:predict"
        promql = 'sum(rate({__name__=":tensorflow:serving:request_count", status="OK"}[1m])) > 0'
        query = "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        while not prometheus_api(query)["result"]:
            assert time.monotonic() < deadline, f"no answer to {promql}"
            with urllib.request.urlopen(url, body, timeout=30) as response:
                assert response.status == 200
            time.sleep(1)
    finally:
        stop = compose("--profile", "monitoring", "rm", "--force", "--stop", "-v", "prometheus")
        assert stop.returncode == 0, stop.stderr


def container_state(container: str) -> dict:
    answer = subprocess.run(
        ["docker", "inspect", "-f", "{{json .State}} {{.RestartCount}}", container],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    state, restarts = answer.stdout.rsplit(" ", 1)
    return dict(json.loads(state), RestartCount=int(restarts))


def test_a_crashed_server_is_restarted() -> None:
    container = compose("ps", "-q", "tfserving").stdout.strip()
    before = container_state(container)
    assert before["Running"] and before["Health"]["Status"] == "healthy"
    # A real crash: SIGKILL to the server process, sent from the host because it is the
    # container's pid 1, which the kernel shields from a SIGKILL sent inside its own namespace
    # (`exec kill -9 1` does nothing). `docker kill` would count as a manual stop instead.
    os.kill(before["Pid"], signal.SIGKILL)
    deadline = time.monotonic() + RESTART_TIMEOUT
    while True:
        state = container_state(container)
        if (
            state["RestartCount"] > before["RestartCount"]
            and state.get("Health", {}).get("Status") == "healthy"
        ):
            break
        assert time.monotonic() < deadline, f"not back and healthy: {state}"
        time.sleep(2)
    host, port = published(8501)
    body = json.dumps({"instances": [[5.1, 3.5, 1.4, 0.2]]}).encode()
    with urllib.request.urlopen(
        f"http://{host}:{port}/v1/models/iris:predict", body, timeout=30
    ) as response:
        assert np.argmax(json.loads(response.read())["predictions"]) == 0
