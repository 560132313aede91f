"""The proxy in front of the three services: fan-out, aggregation, and partial failure."""

import csv
import json
import time
from typing import Any

import pytest
from conftest import Cluster, ClusterWith, Http, MakeProxy, MakeRecorder, connect, status_line
from payload import MAX_BODY_BYTES
from processes import CLASSES, HERE, free_port, wait_healthy
from proxy import parse_services

SETOSA = [5.1, 3.5, 1.4, 0.2]


def iris() -> tuple[list[list[float]], list[str]]:
    labels = json.loads((HERE.parent / "models" / "label.json").read_text())
    with open(HERE.parent / "models" / "iris.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    features = [[float(r[k]) for k in list(r)[:4]] for r in rows]
    return features, [labels[r["target"]] for r in rows]


def test_the_services_setting_is_parsed_and_a_malformed_one_refused() -> None:
    assert parse_services(" a=http://h:1/ , b=https://h:2,") == {
        "a": "http://h:1",
        "b": "https://h:2",
    }
    for setting, problem in [
        ("", "at least one name=url"),
        ("a", "expected name=http://host:port"),
        ("=http://h:1", "expected name=http://host:port"),
        ("a=h:1", "expected name=http://host:port"),
        ("a=http://h:1,a=http://h:2", "'a' is listed twice"),
    ]:
        with pytest.raises(ValueError, match=problem):
            parse_services(setting)


def test_health_and_health_of_every_service(cluster: Cluster, http: Http) -> None:
    assert http(cluster.proxy.url + "/health") == (200, {"health": "ok"})
    status, body = http(cluster.proxy.url + "/health/all")
    assert status == 200
    assert body == {name: {"health": "ok"} for name in CLASSES}


def test_metadata_names_the_services_but_not_their_addresses(cluster: Cluster, http: Http) -> None:
    status, body = http(cluster.proxy.url + "/metadata")
    assert status == 200
    assert body["services"] == list(CLASSES)
    assert body["input"]["data_structure"] == "(rows, 4)"
    assert "127.0.0.1" not in json.dumps(body)


def test_predict_returns_every_service_output_keyed_by_name(cluster: Cluster, http: Http) -> None:
    status, body = http(cluster.proxy.url + "/predict", {"data": [SETOSA]})
    assert status == 200
    assert set(body) == set(CLASSES)
    assert all(len(body[name]["prediction"]) == 2 for name in CLASSES)
    assert body["setosa"]["prediction"][0] > 0.9


def test_get_and_post_test_endpoints_answer_for_every_service(cluster: Cluster, http: Http) -> None:
    for status, body in (
        http(cluster.proxy.url + "/predict/get/test"),
        http(cluster.proxy.url + "/predict/post/test", b""),
    ):
        assert status == 200
        assert set(body) == set(CLASSES)


def test_label_is_right_for_at_least_95_percent_of_iris(cluster: Cluster, http: Http) -> None:
    features, truth = iris()
    status, body = http(cluster.proxy.url + "/predict/label", {"data": features})
    assert status == 200
    predicted = [item["label"] for item in body["prediction"]]
    accuracy = sum(p == t for p, t in zip(predicted, truth, strict=True)) / len(truth)
    assert accuracy >= 0.95, accuracy


def test_one_row_gets_one_label(cluster: Cluster, http: Http) -> None:
    status, body = http(cluster.proxy.url + "/predict/label", {"data": [SETOSA]})
    assert status == 200
    assert body["prediction"]["label"] == "setosa"
    assert 0.9 < body["prediction"]["proba"] <= 1
    assert "missing" not in body


def test_requests_go_to_all_services_in_parallel_not_one_after_another(
    cluster_with: ClusterWith, http: Http
) -> None:
    delay = 0.6
    slow = cluster_with(TEST_DELAY_MS=str(int(delay * 1000)), proxy_env={"SERVICE_TIMEOUT_S": "10"})
    elapsed = []
    for _ in range(3):
        started = time.perf_counter()
        status, body = http(slow.proxy.url + "/predict/label", {"data": [SETOSA]})
        elapsed.append(time.perf_counter() - started)
        assert status == 200 and "missing" not in body
    # One after another would take 3 delays (1.8 s); in parallel it is one delay plus overhead.
    assert delay <= min(elapsed) < 2 * delay, elapsed


def test_a_killed_service_is_named_and_full_answers_return_when_it_is_back(
    cluster_with: ClusterWith, http: Http
) -> None:
    running = cluster_with(proxy_env={"SERVICE_TIMEOUT_S": "2"})
    proxy = running.proxy.url
    virginica = running.services["virginica"]
    virginica.kill()

    started = time.perf_counter()
    status, body = http(proxy + "/predict", {"data": [SETOSA]})
    assert time.perf_counter() - started < 2 + 1  # within the per-service timeout, plus slack
    assert status == 200
    assert body["setosa"]["prediction"][0] > 0.9
    assert set(body["virginica"]) == {"error"}

    status, body = http(proxy + "/predict/label", {"data": [SETOSA]})
    assert status == 200
    assert body["prediction"]["label"] == "setosa"
    assert list(body["missing"]) == ["virginica"]

    status, body = http(proxy + "/health/all")
    assert status == 200
    assert body["virginica"]["health"] == "down"
    assert body["setosa"] == {"health": "ok"}

    virginica.spawn()  # the same service, same port
    wait_healthy(virginica)
    status, body = http(proxy + "/predict", {"data": [SETOSA]})
    assert status == 200
    assert all("prediction" in body[name] for name in CLASSES)
    status, body = http(proxy + "/predict/label", {"data": [SETOSA]})
    assert "missing" not in body


def test_a_service_slower_than_its_timeout_is_named_and_the_others_answer(
    cluster_with: ClusterWith, http: Http
) -> None:
    # A timeout generous enough for the healthy services on a busy machine.
    running = cluster_with(
        env_for={"virginica": {"TEST_DELAY_MS": "20000"}}, proxy_env={"SERVICE_TIMEOUT_S": "2"}
    )
    started = time.perf_counter()
    status, body = http(running.proxy.url + "/predict/label", {"data": [SETOSA]})
    assert time.perf_counter() - started < 2 + 3  # not the 20 s the slow service would take
    assert status == 200
    assert body["prediction"]["label"] == "setosa"
    assert body["missing"] == {"virginica": "no answer within 2.0 s"}


def test_a_service_that_answers_an_error_is_named(
    cluster: Cluster, recorder: MakeRecorder, proxy_for: MakeProxy, http: Http
) -> None:
    broken = recorder(status=500, body={"error": "Traceback at /srv/secret.py"})
    proxy = proxy_for({"setosa": cluster.services["setosa"].url, "broken": broken.url})
    status, body = http(proxy.url + "/predict", {"data": [SETOSA]})
    assert status == 200
    assert "prediction" in body["setosa"]
    assert body["broken"] == {"error": "HTTP 500"}  # its body is logged, not passed on
    status, body = http(proxy.url + "/predict/label", {"data": [SETOSA]})
    assert body["prediction"]["label"] == "setosa"
    assert body["missing"] == {"broken": "HTTP 500"}


# A service that answers 200 with something that is not a usable answer: each must be named, the
# healthy service's answer kept, never a 500 for the whole request.
MISBEHAVING: dict[str, dict[str, Any]] = {
    "NaN": dict(raw=b'{"prediction": [NaN, 0.5], "health": NaN}'),
    "Infinity": dict(raw=b'{"prediction": [1e400, 0.5], "health": 1e400}'),
    "no prediction": dict(raw=b'{"answer": [0.5, 0.5]}'),
    "a list": dict(raw=b"[0.5, 0.5]"),
    "a string": dict(raw=b'"ok"'),
    "null": dict(raw=b"null"),
    "not JSON": dict(raw=b"<html>"),
    "deeply nested": dict(raw=b"[" * 100_000 + b"]" * 100_000),
    "nested in the prediction": dict(raw=b'{"prediction": ' + b"[" * 900 + b"]" * 900 + b"}"),
    "a 1 MB object": dict(raw=b'{"prediction": [0.5, 0.5], "pad": "' + b"x" * 2**20 + b'"}'),
    "an endless body": dict(raw=b'{"prediction": [0.5, 0.5], "pad": "', endless=True),
}


@pytest.mark.parametrize("answer", MISBEHAVING.values(), ids=MISBEHAVING.keys())
def test_a_service_answering_200_with_garbage_is_named(
    cluster: Cluster,
    recorder: MakeRecorder,
    proxy_for: MakeProxy,
    http: Http,
    answer: dict[str, Any],
) -> None:
    bad = recorder(status=200, **answer)
    proxy = proxy_for({"setosa": cluster.services["setosa"].url, "bad": bad.url})

    status, body = http(proxy.url + "/predict", {"data": [SETOSA]})
    assert status == 200, body
    assert body["setosa"]["prediction"][0] > 0.9
    assert set(body["bad"]) == {"error"}

    status, body = http(proxy.url + "/predict/label", {"data": [SETOSA]})
    assert status == 200, body
    assert body["prediction"]["label"] == "setosa"
    assert list(body["missing"]) == ["bad"]

    status, body = http(proxy.url + "/health/all")
    assert status == 200, body
    assert body["setosa"] == {"health": "ok"}
    assert body["bad"]["health"] == "down"


def test_what_is_read_from_a_service_is_capped(
    cluster: Cluster, recorder: MakeRecorder, proxy_for: MakeProxy, http: Http
) -> None:
    big = recorder(status=200, **MISBEHAVING["an endless body"])
    proxy = proxy_for({"setosa": cluster.services["setosa"].url, "big": big.url})
    status, body = http(proxy.url + "/predict", {"data": [SETOSA]})
    assert body["big"] == {"error": f"answer larger than {MAX_BODY_BYTES} bytes"}


def test_when_no_service_answers_the_proxy_says_so_with_a_502(
    proxy_for: MakeProxy, http: Http
) -> None:
    proxy = proxy_for({name: f"http://127.0.0.1:{free_port()}" for name in CLASSES})
    for path in ("/predict", "/predict/label"):
        status, body = http(proxy.url + path, {"data": [SETOSA]})
        assert status == 502
        assert body["error"] == "no service answered"
        # A stable reason by name; the address stays in the proxy's log.
        assert body["missing"] == {name: "cannot connect" for name in CLASSES}
    status, body = http(proxy.url + "/health/all")
    assert status == 200
    assert body == {name: {"health": "down", "error": "cannot connect"} for name in CLASSES}


def test_a_connection_is_reused_until_its_lifetime_then_made_anew(
    recorder: MakeRecorder, proxy_for: MakeProxy, http: Http
) -> None:
    # One request at a time: a kept-alive connection would serve every one of them for ever, so
    # with replicas behind one name the first replica would get them all.
    answer = {"prediction": [0.5, 0.5], "health": "ok"}
    kept = recorder(body=answer, keep_alive=True)
    proxy = proxy_for({"kept": kept.url})
    for _ in range(10):
        assert http(proxy.url + "/predict", {"data": [SETOSA]})[0] == 200
    assert len(set(kept.ports)) == 1  # kept alive: one connection for all ten
    renewed = recorder(body=answer, keep_alive=True)
    proxy = proxy_for({"renewed": renewed.url}, CONNECTION_LIFETIME_S="0.3")
    deadline = time.monotonic() + 20  # a generous bound for a busy machine; about 1 s here
    while len(set(renewed.ports)) < 3 and time.monotonic() < deadline:
        assert http(proxy.url + "/predict", {"data": [SETOSA]})[0] == 200
        time.sleep(0.05)
    assert len(set(renewed.ports)) >= 3  # a new connection after each 0.3 s of use
    assert len(renewed.ports) > 3  # and each one reused meanwhile


@pytest.mark.parametrize(
    "body",
    [b"not json", b'{"data": []}', b'{"data": [[1, 2, 3]]}', b'{"data": [[1, 2, 3, NaN]]}'],
)
def test_bad_input_is_a_422_and_no_service_is_called(
    recorder: MakeRecorder, proxy_for: MakeProxy, http: Http, body: bytes
) -> None:
    service = recorder(status=200, body={"prediction": [0.5, 0.5]})
    proxy = proxy_for({"only": service.url})
    for path in ("/predict", "/predict/label"):
        status, answer = http(proxy.url + path, body)
        assert status == 422
        assert answer["error"]
    assert service.requests == []
    # The recorder is wired: a good request does reach it.
    assert http(proxy.url + "/predict", {"data": [SETOSA]})[0] == 200
    assert service.requests == ["POST /predict"]


@pytest.mark.parametrize(
    "body",
    [
        b'{"data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # RecursionError in json.loads
        b'{"data": [' + b",".join([b"[1.5, 2.5, 3.5, 4.5]"] * 1001) + b"]}",
    ],
    ids=["deeply nested", "1,001 rows"],
)
def test_nested_or_too_many_rows_is_a_422(
    recorder: MakeRecorder, proxy_for: MakeProxy, http: Http, body: bytes
) -> None:
    service = recorder(status=200, body={"prediction": [0.5, 0.5]})
    proxy = proxy_for({"only": service.url})
    status, answer = http(proxy.url + "/predict", body)
    assert status == 422 and answer["error"]
    assert service.requests == []


def test_a_body_over_the_cap_is_a_413_before_it_is_read(
    recorder: MakeRecorder, proxy_for: MakeProxy, http: Http
) -> None:
    service = recorder(status=200, body={"prediction": [0.5, 0.5]})
    proxy = proxy_for({"only": service.url})
    status, answer = http(proxy.url + "/predict", b" " * (MAX_BODY_BYTES + 1))
    assert (status, answer) == (413, {"error": f"body larger than {MAX_BODY_BYTES} bytes"})
    assert_streamed_body_is_cut_off(proxy.url, "/predict/label")
    assert service.requests == []


def assert_streamed_body_is_cut_off(url: str, path: str) -> None:
    """A chunked body (no Content-Length) that never ends: 413 once the cap is passed."""
    with connect(url) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )
        chunk = b" " * 65536
        for _ in range(MAX_BODY_BYTES // len(chunk) + 1):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        # No terminating chunk: a server reading the whole body first would wait forever.
        assert status_line(sock) == b"HTTP/1.1 413 Request Entity Too Large"
