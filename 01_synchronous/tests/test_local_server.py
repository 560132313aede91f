"""What only the stand-in needs to prove: version choice, batching, start-up, logs, shutdown."""

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import CHAPTER, MODEL_BASE_PATH, local_only, start_local_server, stop
from rest_client import RestClient, ServingError

pytestmark = local_only

BATCHING = """
max_batch_size { value: 32 }
batch_timeout_micros { value: 2000 }
num_batch_threads { value: 1 }
"""


@pytest.fixture(scope="module")
def batching_server(tmp_path_factory):
    """Versions 1 and 7 of the same SavedModel, served with batching on."""
    base = tmp_path_factory.mktemp("models") / "iris"
    base.mkdir()
    for version in ("1", "7"):
        (base / version).symlink_to(MODEL_BASE_PATH / "1", target_is_directory=True)
    (base / "not-a-version").mkdir()
    config = base.parent / "batching.config"
    config.write_text(BATCHING)
    process, server = start_local_server(
        "--enable_batching", f"--batching_parameters_file={config}", base_path=base
    )
    yield process, server
    stop(process)


def test_serves_the_highest_numbered_version(batching_server):
    _, server = batching_server
    client = RestClient(server.host, server.rest_port)
    assert client.status()["model_version_status"][0]["version"] == "7"
    with pytest.raises(ServingError) as info:
        client.status(version=1)
    assert info.value.status == 404


def test_batched_concurrent_requests_each_get_their_own_rows(batching_server, iris, expected):
    _, server = batching_server
    client = RestClient(server.host, server.rest_port, timeout=60)
    rows = iris[0]

    def one(i: int) -> np.ndarray:
        return np.array(client.predict(rows[i : i + 1 + i % 3].tolist()))

    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(one, range(100)))
    for i, got in enumerate(answers):
        np.testing.assert_allclose(got, expected[i : i + 1 + i % 3], atol=1e-5)


def test_request_larger_than_max_batch_size_is_400(batching_server, iris):
    _, server = batching_server
    with pytest.raises(ServingError) as info:
        RestClient(server.host, server.rest_port).predict(iris[0][:33].tolist())
    assert info.value.status == 400
    assert "larger than maximum input batch size 32" in info.value.message


def test_logs_are_json_lines_and_sigterm_stops_cleanly(batching_server):
    process, _ = batching_server
    stop(process)
    assert process.returncode == 0
    lines = process.stdout.read().splitlines()
    assert lines and all(json.loads(line)["level"] for line in lines)


def test_missing_model_path_fails_fast_with_a_message(tmp_path):
    command = [
        sys.executable, "local_serving.py", "--port=0", "--rest_api_port=0",
        f"--model_base_path={tmp_path / 'nothing'}",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=CHAPTER, capture_output=True, text=True, timeout=180)
    assert result.returncode == 1
    message = json.loads(result.stdout.splitlines()[-1])["message"]
    assert "cannot start" in message and "nothing" in message
