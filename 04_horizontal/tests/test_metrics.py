"""/metrics on the proxy and on each service, scraped after real traffic: the counters move by
exactly what was sent, labels are route templates and configured service names only."""

import urllib.request

import proxy as proxy_app
import service as service_app
from conftest import Cluster, MakeProxy, MakeRecorder, MakeService, call
from processes import CLASSES, free_port
from prometheus_client.parser import text_string_to_metric_families

ROW = [6.5, 3.0, 5.5, 2.0]


def scrape(url: str, headers: dict | None = None) -> dict[tuple, float]:
    """{(sample name, frozenset of labels): value} of one /metrics answer."""
    request = urllib.request.Request(url + "/metrics", headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def moved(before: dict, after: dict, name: str) -> dict[frozenset, float]:
    """How much each series of one sample name grew between two scrapes (the non-zero ones)."""
    return {
        key[1]: after[key] - before.get(key, 0)
        for key in after
        if key[0] == name and after[key] != before.get(key, 0)
    }


def labels(**items: str) -> frozenset:
    return frozenset(items.items())


def test_counters_move_by_exactly_the_requests_sent(cluster: Cluster) -> None:
    proxy, services = cluster.proxy.url, {n: p.url for n, p in cluster.services.items()}
    before = scrape(proxy)
    before_services = {name: scrape(url) for name, url in services.items()}

    for _ in range(3):
        assert call(proxy + "/predict", {"data": [ROW]})[0] == 200
    for _ in range(2):
        assert call(proxy + "/predict/label", {"data": [ROW, ROW]})[0] == 200
    assert call(proxy + "/predict/label", {"data": [[1, 2, 3]]})[0] == 422  # no service called
    assert call(proxy + "/predict/12345")[0] == 404  # no route: one bounded label, not the path
    assert call(proxy + "/predict")[0] == 405  # the route exists, not for GET

    after = scrape(proxy)
    assert moved(before, after, "http_requests_total") == {
        labels(method="POST", route="/predict", status="200"): 3,
        labels(method="POST", route="/predict/label", status="200"): 2,
        labels(method="POST", route="/predict/label", status="422"): 1,
        labels(method="GET", route="unmatched", status="404"): 1,
        labels(method="GET", route="/predict", status="405"): 1,
        labels(method="GET", route="/metrics", status="200"): 1,  # the first scrape
    }
    assert moved(before, after, "http_request_duration_seconds_count") == {
        labels(method="POST", route="/predict"): 3,
        labels(method="POST", route="/predict/label"): 3,
        labels(method="GET", route="unmatched"): 1,
        labels(method="GET", route="/predict"): 1,
        labels(method="GET", route="/metrics"): 1,
    }
    assert moved(before, after, "fanout_service_call_duration_seconds_count") == {
        labels(service=name): 5 for name in CLASSES
    }
    assert moved(before, after, "fanout_service_call_failures_total") == {}
    assert moved(before, after, "fanout_partial_answers_total") == {}
    assert not any("12345" in value for _, series in after for _, value in series)

    for name, url in services.items():
        service_after = scrape(url)
        assert moved(before_services[name], service_after, "http_requests_total") == {
            labels(method="POST", route="/predict", status="200"): 5,
            labels(method="GET", route="/metrics", status="200"): 1,
        }, name
        inference = moved(
            before_services[name], service_after, "service_inference_duration_seconds_count"
        )
        assert inference == {labels(): 5}, name


def test_failures_are_counted_by_service_and_reason(
    service_with: MakeService, recorder: MakeRecorder, proxy_for: MakeProxy
) -> None:
    slow = service_with(TEST_DELAY_MS="3000")
    services = {
        "setosa": service_with().url,
        "broken": recorder(status=500).url,
        "garbage": recorder(raw=b"[1, 2]").url,  # JSON, but not an object
        "wrong_shape": recorder(body={"prediction": [0.5]}).url,
        "huge": recorder(endless=True).url,
        "gone": f"http://127.0.0.1:{free_port()}",
        "slow": slow.url,
    }
    proxy = proxy_for(services, SERVICE_TIMEOUT_S="0.5").url
    before = scrape(proxy)
    # Every series is there from the start, at 0: rate() and increase() see the first failure.
    assert (
        before["fanout_service_call_failures_total", labels(service="gone", reason="connect")] == 0
    )

    status, body = call(proxy + "/predict/label", {"data": [ROW]})
    assert status == 200 and set(body["missing"]) == set(services) - {"setosa"}

    after = scrape(proxy)
    assert moved(before, after, "fanout_service_call_failures_total") == {
        labels(service="broken", reason="http_status"): 1,
        labels(service="garbage", reason="invalid_answer"): 1,
        labels(service="wrong_shape", reason="invalid_answer"): 1,
        labels(service="huge", reason="too_large"): 1,
        labels(service="gone", reason="connect"): 1,
        labels(service="slow", reason="timeout"): 1,
    }
    assert moved(before, after, "fanout_partial_answers_total") == {labels(): 1}
    # Every call is timed, failed or not; the slow one for as long as its timeout.
    assert moved(before, after, "fanout_service_call_duration_seconds_count") == {
        labels(service=name): 1 for name in services
    }
    slow_seconds = moved(before, after, "fanout_service_call_duration_seconds_sum")
    assert 0.5 <= slow_seconds[labels(service="slow")] < 2

    # No service at all: a 502, no partial answer.
    assert call(proxy_for({"gone": services["gone"]}).url + "/predict", {"data": [ROW]})[0] == 502


def test_metrics_need_the_api_key_when_one_is_set(service_with: MakeService) -> None:
    service = service_with(API_KEY="metrics-key")
    key = {"Authorization": "Bearer metrics-key"}
    assert call(service.url + "/metrics")[0] == 401
    assert call(service.url + "/predict", {"data": [ROW]})[0] == 401
    after = scrape(service.url, key)
    # Refused before routing, and still counted under the route's template.
    assert after["http_requests_total", labels(method="POST", route="/predict", status="401")] == 1
    assert after["http_requests_total", labels(method="GET", route="/metrics", status="401")] == 1


def test_each_app_has_its_own_registry() -> None:
    """Two apps of each kind in one process: with the process-wide registry, the second would
    fail with "Duplicated timeseries"."""
    for _ in range(2):
        proxy_app.create_app(proxy_app.Settings.from_env())
        service_app.create_app(service_app.Settings.from_env())
