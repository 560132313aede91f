"""One specialised service on its own: health, metadata, predictions, and refusing bad input."""

import os
import subprocess
import sys

import pytest
from conftest import Cluster, Http
from payload import MAX_BODY_BYTES
from processes import CLASSES, HERE
from test_proxy import assert_streamed_body_is_cut_off

SETOSA = [5.1, 3.5, 1.4, 0.2]
VIRGINICA = [6.5, 3.0, 5.5, 2.0]


def test_health_and_metadata_name_the_class(cluster: Cluster, http: Http) -> None:
    for mode, service in cluster.services.items():
        assert http(service.url + "/health") == (200, {"health": "ok"})
        status, body = http(service.url + "/metadata")
        assert status == 200
        assert body["mode"] == mode
        assert body["model"] == f"iris_svc_0_{mode}.onnx"


def test_one_row_answers_one_pair(cluster: Cluster, http: Http) -> None:
    status, body = http(cluster.services["setosa"].url + "/predict", {"data": [SETOSA]})
    assert status == 200
    p_class, p_not = body["prediction"]
    assert p_class > 0.9
    assert p_class + p_not == pytest.approx(1, abs=1e-5)


def test_several_rows_answer_one_pair_per_row(cluster: Cluster, http: Http) -> None:
    url = cluster.services["virginica"].url + "/predict"
    status, body = http(url, {"data": [SETOSA, VIRGINICA, VIRGINICA]})
    assert status == 200
    assert len(body["prediction"]) == 3
    assert [pair[0] > 0.5 for pair in body["prediction"]] == [False, True, True]


def test_predict_test_uses_the_sample_row(cluster: Cluster, http: Http) -> None:
    status, body = http(cluster.services["setosa"].url + "/predict/test")
    assert status == 200
    assert body["prediction"][0] > 0.9


BAD_BODIES = [
    b"not json",
    b'{"rows": [[1, 2, 3, 4]]}',
    b'{"data": []}',
    b'{"data": [[1, 2, 3]]}',
    b'{"data": [[1, 2, 3, "4"]]}',
    b'{"data": [[1, 2, 3, true]]}',
    b'{"data": [[1, 2, 3, NaN]]}',
    b'{"data": [[1, 2, 3, 1e39]]}',
    b'{"data": [[1, 2, 3, 1' + b"0" * 400 + b"]]}",
    b'{"data": [[1, 2, 3, 1' + b"0" * 5000 + b"]]}",  # past Python's 4,300-digit int limit
    b'{"data": [' + b",".join([b"[1, 2, 3, 4]"] * 1001) + b"]}",
    b'{"data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # RecursionError in json.loads
]


@pytest.mark.parametrize("body", BAD_BODIES, ids=lambda body: body[:30].decode())
def test_bad_input_is_a_422_with_a_message(cluster: Cluster, http: Http, body: bytes) -> None:
    status, answer = http(cluster.services["setosa"].url + "/predict", body)
    assert status == 422
    assert answer["error"]


def test_a_body_over_the_cap_is_a_413(cluster: Cluster, http: Http) -> None:
    url = cluster.services["setosa"].url
    status, answer = http(url + "/predict", b" " * (MAX_BODY_BYTES + 1))
    assert (status, answer) == (413, {"error": f"body larger than {MAX_BODY_BYTES} bytes"})
    assert_streamed_body_is_cut_off(url, "/predict")


def test_an_unknown_mode_stops_the_service_at_start_up() -> None:
    result = subprocess.run(
        [sys.executable, "service.py"],
        cwd=HERE,
        env={**os.environ, "MODE": "rose", "PORT": "0"},  # inherited: coverage follows it
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "MODE='rose' is not one of " + str(sorted(CLASSES)) in result.stdout + result.stderr
