"""TensorFlow Serving's Prometheus page (/monitoring/prometheus/metrics, --monitoring_config_file):
after real traffic, each counter moved by exactly what was sent.

The :tensorflow:serving:* checks hold for the real server too (TF_SERVING_HOST; compose passes
the same flag); http_requests_total is the stand-in's own.
"""

import json
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import CHAPTER, METRICS_PATH, Samples, Server, scrape, stand_in_only
from grpc_client import GrpcClient
from rest_client import RestClient, ServingError

ROW = [[5.1, 3.5, 1.4, 0.2]]
COUNT = ":tensorflow:serving:request_count"
LATENCY = ":tensorflow:serving:request_latency"
QUEUING = ":tensorflow:serving:batching_session:queuing_latency"
RUNS = ":tensorflow:serving:batching_session:wrapped_run_count"


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return sample(after, name, **labels) - sample(before, name, **labels)


def test_predict_counters_move_by_what_was_sent(
    server: Server, rest: RestClient, grpc_client: GrpcClient
) -> None:
    before = scrape(server)
    for _ in range(5):
        rest.predict(ROW)
    for bad in ([[5.1, 3.5]], [[5.1, 3.5, 1.4]]):  # wrong shapes: INVALID_ARGUMENT
        with pytest.raises(ServingError):
            rest.predict(bad)
    for _ in range(3):
        grpc_client.predict(np.array(ROW, np.float32))
    with pytest.raises(grpc.RpcError) as info:  # a version the server does not have
        grpc_client.predict(np.array(ROW, np.float32), version=9)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    after = scrape(server)

    assert moved(before, after, COUNT, model_name="iris", status="OK") == 8
    assert moved(before, after, COUNT, model_name="iris", status="INVALID_ARGUMENT") == 2
    assert moved(before, after, COUNT, model_name="iris", status="NOT_FOUND") == 1
    # Latency only for the successful calls, by TensorFlow Serving's API/entrypoint labels.
    rest_labels = dict(model_name="iris", API="predict", entrypoint="REST")
    grpc_labels = dict(model_name="iris", API="Predict", entrypoint="GRPC")
    assert moved(before, after, LATENCY + "_count", **rest_labels) == 5
    assert moved(before, after, LATENCY + "_count", **grpc_labels) == 3
    assert moved(before, after, LATENCY + "_sum", **rest_labels) > 0  # microseconds
    # Eight requests went through the batching queue (the refused shapes never reach it), one
    # at a time here, so in one to eight model calls.
    assert moved(before, after, QUEUING + "_count", thread_pool_name="") == 8
    assert 1 <= moved(before, after, RUNS) <= 8


def test_latency_buckets_are_tensorflow_servings(server: Server, rest: RestClient) -> None:
    rest.predict(ROW)
    samples = scrape(server)
    labels = dict(model_name="iris", API="predict", entrypoint="REST")
    buckets = {
        dict(key)["le"]: value
        for (name, key), value in samples.items()
        if name == LATENCY + "_bucket" and {k: v for k, v in key if k != "le"} == labels
    }
    # monitoring::Buckets::Exponential(10, 1.8, 33), each limit printed with 6 digits, then +Inf.
    limits = [10 * 1.8**i for i in range(33)]
    assert list(buckets) == [f"{limit:.6g}" for limit in limits] + ["+Inf"]
    assert list(buckets)[:6] == ["10", "18", "32.4", "58.32", "104.976", "188.957"]
    counts = list(buckets.values())
    assert counts == sorted(counts)  # cumulative
    assert counts[-1] == sample(samples, LATENCY + "_count", **labels)


@stand_in_only
def test_http_requests_by_route_template(server: Server, rest: RestClient) -> None:
    before = scrape(server)
    rest.status()
    rest.status()
    rest.predict(ROW)
    with pytest.raises(ServingError):  # not the served model: 404, and no series of its own
        RestClient(server.host, server.rest_port, "nope", timeout=30).predict(ROW)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://{server.host}:{server.rest_port}/nope/42", timeout=30)
    assert info.value.code == 404
    after = scrape(server)

    def requests(method: str, route: str, status: str) -> float:
        return moved(
            before, after, "http_requests_total", method=method, route=route, status=status
        )

    assert requests("GET", "/v1/models/{model_name}", "200") == 2
    assert requests("POST", "/v1/models/{model_name}:predict", "200") == 1
    assert requests("POST", "/v1/models/{model_name}:predict", "404") == 1
    assert requests("GET", "unmatched", "404") == 1
    assert moved(before, after, COUNT, model_name="nope", status="NOT_FOUND") == 0
    routes = {dict(key)["route"] for name, key in after if name == "http_requests_total"}
    assert not any("iris" in route or "nope" in route for route in routes)
    duration = dict(method="POST", route="/v1/models/{model_name}:predict")
    assert moved(before, after, "http_request_duration_seconds_count", **duration) == 2


def test_the_page_is_prometheus_text(server: Server) -> None:
    url = f"http://{server.host}:{server.rest_port}{METRICS_PATH}"
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    assert "\n:tensorflow:serving:request_count{" in text


def test_monitoring_config_is_read_as_tensorflow_serving_reads_it(tmp_path: Path) -> None:
    from monitoring import DEFAULT_PATH, metrics_path

    assert metrics_path(str(CHAPTER / "monitoring.config")) == METRICS_PATH
    config = tmp_path / "monitoring.config"
    config.write_text("prometheus_config { enable: true }  # no path: the default one")
    assert metrics_path(str(config)) == DEFAULT_PATH
    config.write_text('prometheus_config { enable: false, path: "/m" }')
    assert metrics_path(str(config)) is None
    config.write_text("prometheus_config { enable: true, port: 9 }")
    with pytest.raises(ValueError, match="port"):
        metrics_path(str(config))


@stand_in_only
def test_openapi_does_not_list_the_metrics_page(server: Server) -> None:
    url = f"http://{server.host}:{server.rest_port}/openapi.json"
    with urllib.request.urlopen(url, timeout=30) as response:
        assert METRICS_PATH not in json.loads(response.read())["paths"]
