"""Both command lines, configured from the environment as the README shows."""

import json
import os
import subprocess
import sys

import numpy as np
from conftest import CHAPTER, Server


def run(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(
        os.environ,
        TF_SERVING_HOST=server.host,
        TF_SERVING_REST_PORT=str(server.rest_port),
        TF_SERVING_GRPC_PORT=str(server.grpc_port),
    )
    command = [sys.executable, *args]
    return subprocess.run(
        command, cwd=CHAPTER, env=env, capture_output=True, text=True, timeout=180
    )


def test_rest_client_cli(server: Server, expected: np.ndarray) -> None:
    assert json.loads(run(server, "rest_client.py", "status").stdout)["model_version_status"]
    rows = json.dumps([[5.1, 3.5, 1.4, 0.2]])
    answer = json.loads(run(server, "rest_client.py", "predict", "--rows", rows).stdout)
    np.testing.assert_allclose(answer["predictions"], expected[:1], atol=1e-5)


def test_rest_client_cli_reports_errors(server: Server) -> None:
    result = run(server, "rest_client.py", "predict", "--model", "nope")
    assert result.returncode == 1
    assert json.loads(result.stderr)["status"] == 404


def test_grpc_client_cli(server: Server, expected: np.ndarray) -> None:
    rows = json.dumps([[5.1, 3.5, 1.4, 0.2]])
    result = run(server, "grpc_client.py", "predict", "--rows", rows)
    np.testing.assert_allclose(json.loads(result.stdout)["output"], expected[:1], atol=1e-5)
