"""The REST API (8501) through rest_client.py: shapes, predictions, and every error."""

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import pytest
from conftest import Iris, Server, stand_in_only
from rest_client import RestClient, ServingError

TOLERANCE = 1e-5  # float32 printed as decimal text, and possibly other CPU kernels


def test_status_has_tensorflow_serving_shape(rest: RestClient) -> None:
    ok = {"error_code": "OK", "error_message": ""}
    expected = {"model_version_status": [{"version": "1", "state": "AVAILABLE", "status": ok}]}
    assert rest.status() == expected
    assert rest.status(version=1) == expected


def test_metadata_has_tensorflow_serving_shape(rest: RestClient) -> None:
    metadata = rest.metadata()
    assert metadata["model_spec"] == {"name": "iris", "signature_name": "", "version": "1"}
    signature = metadata["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert signature["method_name"] == "tensorflow/serving/predict"
    (name, tensor), = signature["inputs"].items()  # fmt: skip
    assert name == "input" and tensor["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in tensor["tensor_shape"]["dim"]] == ["-1", "4"]
    output = signature["outputs"]["output"]
    assert output["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in output["tensor_shape"]["dim"]] == ["-1", "3"]


@pytest.mark.parametrize("columnar", [False, True], ids=["row", "columnar"])
@pytest.mark.parametrize("size", [1, 150])
def test_predict_equals_the_saved_model(
    rest: RestClient, iris: Iris, expected: np.ndarray, columnar: bool, size: int
) -> None:
    rows = iris[0][:size].tolist()
    got = np.array(rest.predict(rows, columnar=columnar))
    assert got.shape == (size, 3)
    np.testing.assert_allclose(got, expected[:size], atol=TOLERANCE)


def test_predict_response_keys_follow_the_request_format(rest: RestClient, iris: Iris) -> None:
    row = iris[0][:1].tolist()
    assert list(rest.predict_raw({"instances": row})) == ["predictions"]
    assert list(rest.predict_raw({"inputs": {"input": row}})) == ["outputs"]
    assert list(rest.predict_raw({"inputs": row})) == ["outputs"]  # single input: no name


def test_predict_with_version_and_signature_name(
    rest: RestClient, iris: Iris, expected: np.ndarray
) -> None:
    rows = iris[0][:3].tolist()
    got = rest.predict(rows, version=1, signature_name="serving_default")
    np.testing.assert_allclose(got, expected[:3], atol=TOLERANCE)


def raw_post(server: Server, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
    url = f"http://{server.host}:{server.rest_port}{path}"
    request = urllib.request.Request(url, data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


PREDICT = "/v1/models/iris:predict"
BAD_REQUESTS = {
    "malformed JSON": b'{"instances": [[5.1, 3.5',
    "empty body": b"",
    "not an object": b"[[5.1, 3.5, 1.4, 0.2]]",
    "no instances or inputs": b'{"rows": [[5.1, 3.5, 1.4, 0.2]]}',
    "both instances and inputs": b'{"instances": [[1, 2, 3, 4]], "inputs": [[1, 2, 3, 4]]}',
    "empty instances": b'{"instances": []}',
    "too few columns": b'{"instances": [[5.1, 3.5, 1.4]]}',
    "ragged rows": b'{"instances": [[5.1, 3.5, 1.4, 0.2], [1.0]]}',
    "string value": b'{"instances": [["a", 3.5, 1.4, 0.2]]}',
    "null value": b'{"instances": [[null, 3.5, 1.4, 0.2]]}',
    "wrong input name": b'{"inputs": {"x": [[5.1, 3.5, 1.4, 0.2]]}}',
    "unknown signature": b'{"signature_name": "nope", "instances": [[5.1, 3.5, 1.4, 0.2]]}',
}


@pytest.mark.parametrize("body", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_request_is_400_with_error(server: Server, body: bytes) -> None:
    status, answer = raw_post(server, PREDICT, body)
    assert status == 400
    assert list(answer) == ["error"] and answer["error"]


def test_bad_requests_change_nothing(
    server: Server, rest: RestClient, iris: Iris, expected: np.ndarray
) -> None:
    for body in BAD_REQUESTS.values():
        assert raw_post(server, PREDICT, body)[0] == 400
    np.testing.assert_allclose(rest.predict(iris[0][:2].tolist()), expected[:2], atol=TOLERANCE)
    assert rest.status()["model_version_status"][0]["state"] == "AVAILABLE"


@pytest.mark.parametrize(
    "path",
    ["/v1/models/nope:predict", "/v1/models/iris/versions/99:predict"],
    ids=["unknown model", "unknown version"],
)
def test_predict_unknown_model_or_version_is_404(server: Server, path: str) -> None:
    status, answer = raw_post(server, path, b'{"instances": [[5.1, 3.5, 1.4, 0.2]]}')
    assert status == 404
    assert "not found" in answer["error"].lower()


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.status(version=99),
        lambda c: c.metadata(version=99),
    ],
    ids=["status", "metadata"],
)
def test_unknown_version_status_and_metadata_are_404(
    rest: RestClient, call: Callable[[RestClient], object]
) -> None:
    with pytest.raises(ServingError) as info:
        call(rest)
    assert info.value.status == 404


def test_missing_model_name_is_400(server: Server) -> None:
    url = f"http://{server.host}:{server.rest_port}/v1/models"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(url, timeout=30)
    assert info.value.code == 400
    assert json.loads(info.value.read())["error"] == "Missing model name in request."


def test_unknown_model_status_is_404(server: Server) -> None:
    from rest_client import RestClient

    with pytest.raises(ServingError) as info:
        RestClient(server.host, server.rest_port, "nope").status()
    assert info.value.status == 404
    assert info.value.message == "Could not find any versions of model nope"


# ---- hostile bodies and URLs (issue 10) ---------------------------------------------------

MAX_BODY_BYTES = 32 * 1024 * 1024  # rest_api.MAX_BODY_BYTES, stated here as the README does
ROW_BODY = b'{"instances": [[5.1, 3.5, 1.4, 0.2]]}'


def raw_request(
    server: Server,
    method: str,
    path: str,
    body: bytes | Iterable[bytes] = b"",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    """(status, JSON answer) over http.client, for headers urllib would not send."""
    import http.client

    connection = http.client.HTTPConnection(server.host, server.rest_port, timeout=30)
    try:
        chunked = not isinstance(body, bytes)  # an iterable: sent as chunks
        connection.request(method, path, body, headers or {}, encode_chunked=chunked)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_gzip_body_is_accepted(server: Server, expected: np.ndarray) -> None:
    import gzip

    status, answer = raw_request(
        server, "POST", PREDICT, gzip.compress(ROW_BODY), {"Content-Encoding": "gzip"}
    )
    assert status == 200
    np.testing.assert_allclose(answer["predictions"], expected[:1], atol=TOLERANCE)


@stand_in_only
def test_gzip_bomb_is_refused_at_the_limit(server: Server) -> None:
    # 38 KB on the wire, a valid JSON document of MAX_BODY_BYTES + 1 once decoded.
    import gzip

    bomb = gzip.compress(ROW_BODY[:-1] + b" " * (MAX_BODY_BYTES - len(ROW_BODY) + 1) + b"}")
    status, answer = raw_request(server, "POST", PREDICT, bomb, {"Content-Encoding": "gzip"})
    assert status == 413
    assert "larger than" in answer["error"]


@stand_in_only
def test_body_over_the_limit_is_413(server: Server) -> None:
    body = ROW_BODY[:-1] + b" " * (MAX_BODY_BYTES - len(ROW_BODY) + 1) + b"}"
    status, answer = raw_request(server, "POST", PREDICT, body)
    assert status == 413 and "larger than" in answer["error"]


@stand_in_only
def test_declared_huge_body_is_refused_before_it_is_sent(server: Server) -> None:
    # Content-Length says 1 TB and no body follows: the answer must not wait for the body.
    import socket

    with socket.create_connection((server.host, server.rest_port), timeout=20) as sock:
        sock.sendall(
            b"POST /v1/models/iris:predict HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 1000000000000\r\n\r\n{"
        )
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413")


@stand_in_only
def test_chunked_body_over_the_limit_is_413(server: Server) -> None:
    # No Content-Length: the limit holds while the chunks stream in.
    def chunks() -> Iterator[bytes]:
        yield ROW_BODY[:-1]
        for _ in range(MAX_BODY_BYTES // (1 << 20) + 1):
            yield b" " * (1 << 20)
        yield b"}"

    status, answer = raw_request(server, "POST", PREDICT, chunks())
    assert status == 413


def test_deeply_nested_json_is_400(server: Server) -> None:
    body = b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, answer = raw_post(server, PREDICT, body)
    assert status == 400 and list(answer) == ["error"]


@pytest.mark.parametrize("digits", [20, 5000])
def test_version_too_large_for_int64_is_400(server: Server, digits: int) -> None:
    version = "9" * digits
    status, answer = raw_post(server, f"/v1/models/iris/versions/{version}:predict", ROW_BODY)
    assert status == 400
    assert answer["error"] == f"Failed to convert version: {version} to numeric."
    status, answer = raw_request(server, "GET", f"/v1/models/iris/versions/{version}")
    assert status == 400 and answer["error"].startswith("Failed to convert version")


def test_columnar_extra_inputs_are_ignored(server: Server, expected: np.ndarray) -> None:
    body = json.dumps({"inputs": {"input": [[5.1, 3.5, 1.4, 0.2]], "extra": [1, 2]}}).encode()
    status, answer = raw_post(server, PREDICT, body)
    assert status == 200
    np.testing.assert_allclose(answer["outputs"], expected[:1], atol=TOLERANCE)


def test_columnar_missing_input_is_400_with_tensorflow_servings_words(server: Server) -> None:
    status, answer = raw_post(server, PREDICT, b'{"inputs": {"x": [[5.1, 3.5, 1.4, 0.2]]}}')
    assert status == 400
    assert answer["error"] == "Missing named input: input in 'inputs' object."


def test_unknown_version_label_is_400(server: Server) -> None:
    status, answer = raw_post(server, "/v1/models/iris/labels/canary:predict", ROW_BODY)
    assert status == 400
    assert answer["error"] == "Unrecognized servable version label: canary"
    status, answer = raw_request(server, "GET", "/v1/models/iris/labels/canary/metadata")
    assert status == 400
    assert answer["error"] == "Unrecognized servable version label: canary"


def test_body_that_is_not_gzip_is_400(server: Server) -> None:
    status, answer = raw_request(server, "POST", PREDICT, ROW_BODY, {"Content-Encoding": "gzip"})
    assert status == 400 and list(answer) == ["error"]
