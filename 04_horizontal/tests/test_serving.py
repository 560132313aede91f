"""What both apps share (serving.py): bind address, slow or greedy clients, the API key."""

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import Cluster, Http, MakeProxy, MakeService, connect, status_line
from serving import MAX_HEADER_BYTES, REQUEST_READ_TIMEOUT_S, ServerSettings

SETOSA = [5.1, 3.5, 1.4, 0.2]
KEY = "test-key-not-a-secret"


def test_both_apps_listen_on_loopback_unless_host_says_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("HOST", raising=False)
    assert ServerSettings.from_env(default_port=8000).host == "127.0.0.1"
    monkeypatch.setenv("HOST", "0.0.0.0")
    assert ServerSettings.from_env(default_port=8000).host == "0.0.0.0"


def closed_within(sock: socket.socket, seconds: float, drip: bool = False) -> float | None:
    """Seconds until the server closes the connection, or None if it is still open after
    `seconds`. With drip, send one more header byte every half second meanwhile."""
    started = time.monotonic()
    sock.settimeout(0.5)
    while time.monotonic() - started < seconds:
        try:
            if drip:
                sock.sendall(b"a")
            if sock.recv(1024) == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - started
    return None


def test_a_client_that_sends_nothing_or_drips_its_headers_is_cut_off(cluster: Cluster) -> None:
    url = cluster.services["setosa"].url
    limit = REQUEST_READ_TIMEOUT_S + 15  # generous: the machine is shared
    idle, dripping = connect(url), connect(url)
    dripping.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    results: dict[str, float | None] = {}
    threads = [
        threading.Thread(target=lambda: results.update(idle=closed_within(idle, limit))),
        threading.Thread(
            target=lambda: results.update(drip=closed_within(dripping, limit, drip=True))
        ),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    idle.close()
    dripping.close()
    assert results["idle"] is not None and results["drip"] is not None, results
    assert results["idle"] >= REQUEST_READ_TIMEOUT_S - 1, results


def test_headers_over_the_bound_are_refused(cluster: Cluster) -> None:
    with connect(cluster.services["setosa"].url) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * MAX_HEADER_BYTES)
        sock.sendall(b"\r\n\r\n")
        assert status_line(sock) == b"HTTP/1.1 400 Bad Request"
    with connect(cluster.services["setosa"].url) as sock:  # a normal request still works
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_line(sock) == b"HTTP/1.1 200 OK"


def test_past_the_concurrency_limit_the_answer_is_a_quick_503(service_with: MakeService) -> None:
    service = service_with(LIMIT_CONCURRENCY="2")
    held = [connect(service.url) for _ in range(2)]  # open, silent: each counts as one
    try:
        with connect(service.url) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status_line(sock) == b"HTTP/1.1 503 Service Unavailable"
    finally:
        for sock in held:
            sock.close()


@pytest.fixture(scope="module")
def keyed() -> Iterator[Cluster]:
    """Services and proxy, all with the same API_KEY."""
    from conftest import running_cluster

    with running_cluster(proxy_env={"API_KEY": KEY, "SERVICE_TIMEOUT_S": "5"}, API_KEY=KEY) as c:
        yield c


BEARER = {"Authorization": f"Bearer {KEY}"}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_with_api_key_set_a_call_without_it_is_a_401(
    keyed: Cluster, http: Http, headers: dict[str, str]
) -> None:
    for url, path, body in [
        (keyed.proxy.url, "/predict/label", {"data": [SETOSA]}),
        (keyed.proxy.url, "/metadata", None),
        (keyed.proxy.url, "/health/all", None),
        (keyed.services["setosa"].url, "/predict", {"data": [SETOSA]}),
    ]:
        status, answer = http(url + path, body, headers=headers)
        assert (status, answer) == (401, {"error": "missing or wrong API key"})


def test_with_api_key_set_health_and_openapi_stay_open(keyed: Cluster, http: Http) -> None:
    for url in (keyed.proxy.url, keyed.services["setosa"].url):
        assert http(url + "/health") == (200, {"health": "ok"})
        assert http(url + "/openapi.json")[0] == 200


def test_the_proxy_shows_its_own_key_to_the_services(keyed: Cluster, http: Http) -> None:
    status, body = http(keyed.proxy.url + "/predict/label", {"data": [SETOSA]}, headers=BEARER)
    assert status == 200
    assert body == {"prediction": {"proba": body["prediction"]["proba"], "label": "setosa"}}
    status, body = http(keyed.proxy.url + "/health/all", headers=BEARER)
    assert body == {name: {"health": "ok"} for name in keyed.services}


def test_a_proxy_without_the_key_is_refused_by_keyed_services(
    keyed: Cluster, proxy_for: MakeProxy, http: Http
) -> None:
    proxy = proxy_for({name: s.url for name, s in keyed.services.items()})
    status, body = http(proxy.url + "/predict", {"data": [SETOSA]})
    assert status == 502
    assert body["missing"] == {name: "HTTP 401" for name in keyed.services}
