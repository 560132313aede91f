"""What only the stand-in needs to prove: version choice, no-batching path, logs, start-up."""

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import CHAPTER, MODEL_BASE_PATH, Iris, local_only, start_local_server, stop
from rest_client import RestClient, ServingError

pytestmark = local_only


@pytest.fixture(scope="module")
def two_versions(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[subprocess.Popen[str], RestClient]]:
    """Versions 1 and 7 of the same SavedModel, served without batching."""
    base = tmp_path_factory.mktemp("models") / "iris"
    base.mkdir()
    for version in ("1", "7"):
        (base / version).symlink_to(MODEL_BASE_PATH / "1", target_is_directory=True)
    (base / "not-a-version").mkdir()
    process, server = start_local_server(base_path=base)
    yield process, RestClient(server.host, server.rest_port, timeout=60)
    stop(process)


def port_of(client: RestClient) -> int:
    """The REST port a client talks to: the raw-socket tests below open their own connections."""
    port = urllib.parse.urlsplit(client.base).port
    assert port is not None
    return port


def test_serves_the_highest_numbered_version(
    two_versions: tuple[subprocess.Popen[str], RestClient],
) -> None:
    _, client = two_versions
    assert client.status()["model_version_status"][0]["version"] == "7"
    with pytest.raises(ServingError) as info:
        client.status(version=1)
    assert info.value.status == 404


def test_predicts_without_batching(
    two_versions: tuple[subprocess.Popen[str], RestClient], iris: Iris, expected: np.ndarray
) -> None:
    _, client = two_versions
    np.testing.assert_allclose(client.predict(iris[0].tolist()), expected, atol=1e-5)


MAX_CONNECTIONS = 200  # local_serving.MAX_CONNECTIONS, stated here as the README does


def test_connections_past_the_limit_get_503(
    two_versions: tuple[subprocess.Popen[str], RestClient],
) -> None:
    _, client = two_versions
    port = port_of(client)
    idle = [socket.create_connection(("127.0.0.1", port), timeout=30)]
    try:
        while len(idle) < MAX_CONNECTIONS:
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=30))
        with pytest.raises(ServingError) as info:
            client.status()
        assert info.value.status == 503
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 30  # the server notices the closed sockets, then answers
    while True:
        try:
            assert client.status()["model_version_status"]
            break
        except ServingError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


HEADER_TIMEOUT_SECONDS = 10  # local_serving.HEADER_TIMEOUT_SECONDS


def test_a_client_dribbling_its_headers_is_cut_off(
    two_versions: tuple[subprocess.Popen[str], RestClient],
) -> None:
    # One header byte a second: each byte is activity, but the headers never complete.
    _, client = two_versions
    port = port_of(client)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /v1/models/iris HTTP/1.1\r\nX-Slow: ")
        closed = False
        while time.monotonic() - started < HEADER_TIMEOUT_SECONDS + 20:
            try:
                sock.sendall(b"a")
                sock.settimeout(1)
                if sock.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except OSError:  # reset or broken pipe: closed by the server
                closed = True
                break
    assert closed, "the server kept a connection whose headers never completed"
    assert time.monotonic() - started >= HEADER_TIMEOUT_SECONDS - 1


def test_headers_over_the_size_limit_are_cut_off(
    two_versions: tuple[subprocess.Popen[str], RestClient],
) -> None:
    # uvicorn's httptools parser keeps every header byte: 2 MiB of one header must not be kept.
    _, client = two_versions
    port = port_of(client)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(b"GET /v1/models/iris HTTP/1.1\r\nX-Big: " + b"a" * (2 << 20))
            sock.settimeout(HEADER_TIMEOUT_SECONDS + 10)
            answer = sock.recv(1)
        except OSError:  # reset while sending: closed by the server
            answer = b""
    assert answer == b""
    assert time.monotonic() - started < HEADER_TIMEOUT_SECONDS / 2  # not the timeout's doing


def test_no_metrics_page_without_a_monitoring_config(
    two_versions: tuple[subprocess.Popen[str], RestClient],
) -> None:
    # As TensorFlow Serving: the page exists only when --monitoring_config_file enables it.
    _, client = two_versions
    url = client.base.split("/v1/")[0] + "/monitoring/prometheus/metrics"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(url, timeout=30)
    assert info.value.code == 404


def test_logs_are_json_lines_and_sigterm_stops_cleanly(
    two_versions: tuple[subprocess.Popen[str], RestClient],
) -> None:
    process, _ = two_versions
    stop(process)
    assert process.returncode == 0 and process.stdout is not None
    lines = process.stdout.read().splitlines()
    assert lines and all(json.loads(line)["level"] for line in lines)
    # HOST is unset in the tests: both servers bind the loopback address only.
    messages = [json.loads(line)["message"] for line in lines]
    assert any(m.startswith("gRPC API on 127.0.0.1:") for m in messages)
    assert any("Uvicorn running on http://127.0.0.1:" in m for m in messages)


def test_missing_model_path_fails_fast_with_a_message(tmp_path: Path) -> None:
    command = [
        sys.executable, "local_serving.py", "--port=0", "--rest_api_port=0",
        f"--model_base_path={tmp_path / 'nothing'}",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=CHAPTER, capture_output=True, text=True, timeout=180)
    assert result.returncode == 1
    message = json.loads(result.stdout.splitlines()[-1])["message"]
    assert "cannot start" in message and "nothing" in message


def test_a_wrong_monitoring_config_fails_fast_with_a_message(tmp_path: Path) -> None:
    config = tmp_path / "monitoring.config"
    config.write_text("prometheus_config { enable: yes please }")
    command = [
        sys.executable, "local_serving.py", "--port=0", "--rest_api_port=0",
        f"--model_base_path={MODEL_BASE_PATH}", f"--monitoring_config_file={config}",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=CHAPTER, capture_output=True, text=True, timeout=180)
    assert result.returncode == 1
    message = json.loads(result.stdout.splitlines()[-1])["message"]
    assert "cannot start" in message and "monitoring.config" in message
