"""The HTTP side as a real process: validation, job lifecycle, and Redis going away."""

import json
import signal
import socket
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
import redis
from conftest import Processes, Relay, base_url, make_env
from launch import free_port, http

ROW = [5.1, 3.5, 1.4, 0.2]


@pytest.fixture
def proxy(db: redis.Redis, procs: Processes) -> str:
    env = make_env()
    procs.proxy(env)
    return base_url(env)


@pytest.mark.parametrize(
    "body, problem",
    [
        ({}, '"data" key'),
        ([[ROW]], '"data" key'),
        ({"data": []}, "non-empty"),
        ({"data": [ROW] * 1001}, "at most 1000"),
        ({"data": [[5.1, 3.5, 1.4]]}, "exactly 4"),
        ({"data": [[5.1, 3.5, 1.4, "0.2"]]}, "must be a number"),
        ({"data": [[5.1, 3.5, 1.4, 0]]}, "in (0, 10)"),
        ({"data": [[5.1, 3.5, 1.4, 10.5]]}, "in (0, 10)"),
        ({"data": [ROW], "priority": "urgent"}, "priority"),
    ],
)
def test_invalid_input_is_422_and_queues_nothing(
    db: redis.Redis, proxy: str, body: Any, problem: str
) -> None:
    status, answer = http("POST", f"{proxy}/predict", body)
    assert status == 422
    assert problem in answer["detail"]
    assert db.dbsize() == 0


def test_body_that_is_not_json_is_422(db: redis.Redis, proxy: str) -> None:
    request = urllib.request.Request(f"{proxy}/predict", data=b"{nope", method="POST")
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=5)
    assert error.value.code == 422
    assert "not valid JSON" in json.loads(error.value.read())["detail"]
    assert db.dbsize() == 0


def test_submit_read_list_and_cancel(db: redis.Redis, proxy: str) -> None:
    status, answer = http("POST", f"{proxy}/predict", {"data": [ROW, ROW]})
    assert status == 202
    job_id = answer["job_id"]
    assert http("GET", f"{proxy}/job/{job_id}") == (200, {"job_id": job_id, "status": "pending"})

    status, page = http("GET", f"{proxy}/jobs?limit=5")
    assert status == 200 and page["total"] == 1
    assert page["jobs"][0]["job_id"] == job_id and page["jobs"][0]["status"] == "pending"

    assert http("DELETE", f"{proxy}/job/{job_id}") == (
        200,
        {"job_id": job_id, "status": "cancelled"},
    )
    assert db.llen("queue:predict") == 0
    assert http("GET", f"{proxy}/job/{job_id}")[1]["status"] == "cancelled"


def test_cancel_a_started_job_is_409(db: redis.Redis, proxy: str) -> None:
    job_id = http("POST", f"{proxy}/predict/test")[1]["job_id"]
    db.lmove("queue:predict", "queue:predict:processing", "RIGHT", "LEFT")  # as a worker would
    db.set(f"job:{job_id}:status", "processing")
    status, answer = http("DELETE", f"{proxy}/job/{job_id}")
    assert status == 409 and "processing" in answer["detail"]


def test_unknown_job_is_404(db: redis.Redis, proxy: str) -> None:
    assert http("GET", f"{proxy}/job/nosuchjob") == (404, {"detail": "job nosuchjob not found"})
    assert http("DELETE", f"{proxy}/job/nosuchjob")[0] == 404


def test_bad_pagination_is_422(db: redis.Redis, proxy: str) -> None:
    assert http("GET", f"{proxy}/jobs?limit=0")[0] == 422
    assert http("GET", f"{proxy}/jobs?offset=x")[0] == 422


def test_redis_stopped_is_503_quickly_and_recovers(procs: Processes) -> None:
    """A private redis-server that the test stops: never the shared one."""
    port = free_port()
    redis_proc = procs.redis(port)
    env = make_env(REDIS_URL=f"redis://127.0.0.1:{port}/0")
    procs.proxy(env)
    url = base_url(env)
    assert http("POST", f"{url}/predict", {"data": [ROW]})[0] == 202

    redis_proc.stop()
    for path, method in (
        ("/predict", "POST"),
        ("/health", "GET"),
        ("/ready", "GET"),
        ("/job/x", "GET"),
    ):
        started = time.monotonic()
        status, answer = http(method, f"{url}{path}", {"data": [ROW]} if method == "POST" else None)
        assert status == 503, (path, answer)
        assert time.monotonic() - started < 3, path
        if path in ("/health", "/ready"):
            assert answer["components"]["redis"].startswith("error")
        else:
            assert "redis unavailable" in answer["detail"]

    procs.redis(port)  # back, empty
    status, answer = http("POST", f"{url}/predict", {"data": [ROW]})
    assert status == 202
    assert http("GET", f"{url}/job/{answer['job_id']}")[1]["status"] == "pending"


def test_sigterm_stops_the_proxy(db: redis.Redis, procs: Processes) -> None:
    proc = procs.proxy(make_env())
    proc.signal(signal.SIGTERM)
    # uvicorn shuts down cleanly, then re-raises the signal so the exit status says why.
    assert proc.popen.wait(15) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in proc.text()


def test_a_submit_retried_after_its_answer_was_lost_queues_one_job(
    db: redis.Redis, procs: Processes, relay: Relay
) -> None:
    """Redis ran SUBMIT but its answer was lost: redis-py retries on a new connection. The
    retry must find that job, not queue a second one nor answer 503."""
    env = make_env(REDIS_URL=relay.url)
    procs.proxy(env)
    url = base_url(env)
    first = http("POST", f"{url}/predict/test")[1]["job_id"]  # scripts loaded: one round trip
    relay.drop_next_reply.set()
    status, answer = http("POST", f"{url}/predict", {"data": [ROW]})
    assert status == 202, answer
    assert not relay.drop_next_reply.is_set(), "the answer was not dropped"
    assert db.lrange("queue:predict", 0, -1) == [answer["job_id"], first]
    assert db.zcard("jobs:recent") == 2


def test_a_redis_that_hangs_is_503_within_the_bound(
    db: redis.Redis, procs: Processes, relay: Relay
) -> None:
    """Connections are accepted, nothing is answered: every call still ends in time."""
    env = make_env(REDIS_URL=relay.url)
    proc = procs.proxy(env)
    url = base_url(env)
    relay.hang.set()
    requests = [
        ("POST", "/predict", {"data": [ROW]}),
        ("POST", "/predict/test", None),
        ("GET", "/job/x", None),
        ("DELETE", "/job/x", None),
        ("GET", "/jobs", None),
        ("GET", "/health", None),
    ]
    for method, path, body in requests:
        started = time.monotonic()
        status, answer = http(method, f"{url}{path}", body)
        elapsed = time.monotonic() - started
        assert status == 503, (path, answer)
        # 2 attempts of at most 0.5 s connect + 1 s read each; the rest is this busy machine.
        assert elapsed < 4, (path, elapsed)
        if path == "/health":
            assert answer["components"]["redis"] == "error: unavailable"
        else:  # a stable message: Redis's own text stays in the log
            assert answer == {"detail": "redis unavailable"}, path
    assert "Timeout" in proc.text()  # ... where the detail is
    relay.hang.clear()
    assert http("POST", f"{url}/predict", {"data": [ROW]})[0] == 202


def test_a_full_queue_is_429_with_retry_after(db: redis.Redis, procs: Processes) -> None:
    env = make_env(MAX_QUEUE=2)
    procs.proxy(env)
    url = base_url(env)
    assert [http("POST", f"{url}/predict/test")[0] for _ in range(2)] == [202, 202]
    request = urllib.request.Request(
        f"{url}/predict", data=json.dumps({"data": [ROW], "priority": "high"}).encode()
    )
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=5)
    assert error.value.code == 429
    assert error.value.headers["Retry-After"] == "5"
    assert "queue holds 2 jobs" in json.loads(error.value.read())["detail"]
    assert db.llen("queue:predict") == 2


@pytest.mark.parametrize(
    "body",
    [
        b'{"data": [[1' + b"1" * 5000 + b", 2, 3, 4]]}",  # over Python's 4,300-digit limit
        b'{"data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # RecursionError in json
        b'{"data": [[5.1, 3.5, 1.4, 0.2]]}\xff',  # not UTF-8
    ],
    ids=["5000-digit integer", "nested 100,000 deep", "bad UTF-8"],
)
def test_hostile_json_is_422(db: redis.Redis, proxy: str, body: Any) -> None:
    request = urllib.request.Request(f"{proxy}/predict", data=body, method="POST")
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=10)
    assert error.value.code == 422
    assert json.loads(error.value.read())["detail"].startswith("body is not valid JSON")
    assert db.dbsize() == 0


def request_with(url: str, headers: dict) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        assert e.code != 401 or json.loads(e.read()) == {"detail": "missing or wrong API key"}
        return e.code


def test_api_key_guards_every_endpoint_but_health(db: redis.Redis, procs: Processes) -> None:
    key = "s3cret-key-for-this-test"
    env = make_env(API_KEY=key)
    proc = procs.proxy(env)
    url = base_url(env)
    good = {"Authorization": f"Bearer {key}"}
    for path in ("/jobs", "/job/x", "/metadata"):
        assert request_with(f"{url}{path}", {}) == 401, path
        assert request_with(f"{url}{path}", {"Authorization": f"Bearer {key}x"}) == 401, path
        assert request_with(f"{url}{path}", {"Authorization": key}) == 401, path
    assert request_with(f"{url}/jobs", good) == 200
    assert request_with(f"{url}/job/x", good) == 404
    assert request_with(f"{url}/health", {}) == 503  # open (and TF Serving is not there)
    assert request_with(f"{url}/ready", {}) == 200  # open: the readiness probe sends no key
    assert request_with(f"{url}/openapi.json", {}) == 200  # open: it holds no data
    request = urllib.request.Request(f"{url}/predict/test", method="POST")
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=5)
    assert error.value.code == 401 and db.dbsize() == 0
    assert key not in proc.text()


def test_openapi_describes_every_route(db: redis.Redis, proxy: str) -> None:
    status, schema = http("GET", f"{proxy}/openapi.json")
    assert status == 200 and schema["openapi"] == "3.0.3"
    assert set(schema["paths"]) == {
        "/predict",
        "/predict/test",
        "/job/{job_id}",
        "/jobs",
        "/health",
        "/ready",
        "/metadata",
    }
    assert set(schema["paths"]["/job/{job_id}"]) == {"get", "delete"}
    assert "429" in schema["paths"]["/predict"]["post"]["responses"]


def test_headers_are_bounded_in_size_and_time(db: redis.Redis, proxy: str) -> None:
    port = int(proxy.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"GET /jobs HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        started = time.monotonic()
        s.sendall(b"GET /jobs HTTP/1.1\r\nHost: x\r\n")  # ... and the rest never comes
        assert s.recv(100) == b""  # closed by the server
        assert 9 < time.monotonic() - started < 25  # HEADER_TIMEOUT, 10 s
