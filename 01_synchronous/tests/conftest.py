"""Fixtures: a real server process on free ports, or a real TensorFlow Serving.

With TF_SERVING_HOST set, the tests talk to the server there (TF_SERVING_REST_PORT and
TF_SERVING_GRPC_PORT, default 8501/8500) and start nothing, so the very same tests check the
stand-in against tensorflow/serving. Otherwise they start local_serving.py as a subprocess.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from rest_client import RestClient

if TYPE_CHECKING:  # imports TensorFlow: loaded only by the tests that use it
    from grpc_client import GrpcClient

CHAPTER = Path(__file__).resolve().parents[1]
MODELS = CHAPTER.parent / "models"
MODEL_BASE_PATH = MODELS / "iris"
REAL_SERVER = bool(os.environ.get("TF_SERVING_HOST"))
STARTUP_TIMEOUT = 180  # seconds: loading TensorFlow on a busy 2-core machine is slow

BATCHING_FLAGS = ("--enable_batching", f"--batching_parameters_file={CHAPTER / 'batching.config'}")
MONITORING_FLAG = f"--monitoring_config_file={CHAPTER / 'monitoring.config'}"
METRICS_PATH = "/monitoring/prometheus/metrics"  # what monitoring.config enables
Iris = tuple[np.ndarray, np.ndarray]  # the 150 rows (float32 [150, 4]) and their labels
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]  # (name, labels) -> value
local_only = pytest.mark.skipif(REAL_SERVER, reason="starts its own local server")
stand_in_only = pytest.mark.skipif(
    REAL_SERVER, reason="a limit of the stand-in only: TensorFlow Serving has none"
)


@dataclass(frozen=True)
class Server:
    host: str
    rest_port: int
    grpc_port: int


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def model_state(host: str, rest_port: int) -> str | None:
    try:
        url = f"http://{host}:{rest_port}/v1/models/iris"
        with urllib.request.urlopen(url, timeout=2) as response:
            state: str = json.loads(response.read())["model_version_status"][0]["state"]
            return state
    except OSError:
        return None


def start_local_server(
    *extra: str, base_path: Path = MODEL_BASE_PATH
) -> tuple[subprocess.Popen[str], Server]:
    """Starts local_serving.py on free ports; returns (process, Server) once AVAILABLE."""
    rest_port, grpc_port = free_port(), free_port()
    command = [
        sys.executable, str(CHAPTER / "local_serving.py"), f"--port={grpc_port}",
        f"--rest_api_port={rest_port}", "--model_name=iris", f"--model_base_path={base_path}",
        *extra,
    ]  # fmt: skip
    # stderr (TensorFlow's own start-up lines) is kept apart: stdout must be JSON lines only.
    env = {k: v for k, v in os.environ.items() if k != "HOST"}  # the default, loopback
    process = subprocess.Popen(
        command, cwd=CHAPTER, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while model_state("127.0.0.1", rest_port) != "AVAILABLE":
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process)
            out, err = process.communicate()
            pytest.fail(f"local_serving.py did not become ready:\n{out}\n{err}")
        time.sleep(0.2)
    return process, Server("127.0.0.1", rest_port, grpc_port)


def stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    if REAL_SERVER:
        host = os.environ["TF_SERVING_HOST"]
        rest_port = int(os.environ.get("TF_SERVING_REST_PORT", "8501"))
        grpc_port = int(os.environ.get("TF_SERVING_GRPC_PORT", "8500"))
        if model_state(host, rest_port) != "AVAILABLE":
            pytest.exit(
                f"TF_SERVING_HOST is set but http://{host}:{rest_port}/v1/models/iris is not "
                "AVAILABLE; start it with `docker compose up -d tfserving` in 01_synchronous"
            )
        yield Server(host, rest_port, grpc_port)
        return
    # The flags `make run` and compose.yaml use: batching on, parameters from batching.config,
    # the Prometheus page on as monitoring.config says.
    process, running = start_local_server(*BATCHING_FLAGS, MONITORING_FLAG)
    try:
        yield running
    finally:
        stop(process)


@pytest.fixture(scope="session")
def iris() -> Iris:
    """The 150 Iris rows (float32 [150, 4]) and their labels."""
    with (MODELS / "iris.csv").open() as f:
        rows = list(csv.DictReader(f))
    features = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    x = np.array([[float(r[k]) for k in features] for r in rows], np.float32)
    y = np.array([int(r["target"]) for r in rows])
    return x, y


@pytest.fixture(scope="session")
def saved_model() -> Any:  # the stub's type for a loaded SavedModel is private
    import tensorflow as tf

    return tf.saved_model.load(str(MODEL_BASE_PATH / "1"))


@pytest.fixture(scope="session")
def expected(saved_model: Any, iris: Iris) -> np.ndarray:
    """The SavedModel's own output for the 150 rows: what every server must answer."""
    import tensorflow as tf

    signature = saved_model.signatures["serving_default"]
    output: np.ndarray = signature(input=tf.constant(iris[0]))["output"].numpy()
    return output


@pytest.fixture(scope="session")
def rest(server: Server) -> RestClient:
    return RestClient(server.host, server.rest_port, "iris", timeout=30)


@pytest.fixture(scope="session")
def grpc_client(server: Server) -> Iterator[GrpcClient]:
    from grpc_client import GrpcClient

    with GrpcClient(server.host, server.grpc_port, "iris", timeout=30) as client:
        yield client


def scrape(server: Server) -> Samples:
    """Every sample of the server's Prometheus page: (name, labels) -> value, parsed by
    prometheus-client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://{server.host}:{server.rest_port}{METRICS_PATH}"
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
