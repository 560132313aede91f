"""The HTTP side as a real process: validation, job lifecycle, and Redis going away."""

import json
import signal
import time
import urllib.error
import urllib.request

import pytest
from conftest import base_url, make_env
from launch import free_port, http

ROW = [5.1, 3.5, 1.4, 0.2]


@pytest.fixture
def proxy(db, procs) -> str:
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
def test_invalid_input_is_422_and_queues_nothing(db, proxy, body, problem):
    status, answer = http("POST", f"{proxy}/predict", body)
    assert status == 422
    assert problem in answer["detail"]
    assert db.dbsize() == 0


def test_body_that_is_not_json_is_422(db, proxy):
    request = urllib.request.Request(f"{proxy}/predict", data=b"{nope", method="POST")
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=5)
    assert error.value.code == 422
    assert "not valid JSON" in json.loads(error.value.read())["detail"]
    assert db.dbsize() == 0


def test_submit_read_list_and_cancel(db, proxy):
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


def test_cancel_a_started_job_is_409(db, proxy):
    job_id = http("POST", f"{proxy}/predict/test")[1]["job_id"]
    db.lmove("queue:predict", "queue:predict:processing", "RIGHT", "LEFT")  # as a worker would
    db.set(f"job:{job_id}:status", "processing")
    status, answer = http("DELETE", f"{proxy}/job/{job_id}")
    assert status == 409 and "processing" in answer["detail"]


def test_unknown_job_is_404(db, proxy):
    assert http("GET", f"{proxy}/job/nosuchjob") == (404, {"detail": "job nosuchjob not found"})
    assert http("DELETE", f"{proxy}/job/nosuchjob")[0] == 404


def test_bad_pagination_is_422(db, proxy):
    assert http("GET", f"{proxy}/jobs?limit=0")[0] == 422
    assert http("GET", f"{proxy}/jobs?offset=x")[0] == 422


def test_redis_stopped_is_503_quickly_and_recovers(procs):
    """A private redis-server that the test stops: never the shared one."""
    port = free_port()
    redis_proc = procs.redis(port)
    env = make_env(REDIS_URL=f"redis://127.0.0.1:{port}/0")
    procs.proxy(env)
    url = base_url(env)
    assert http("POST", f"{url}/predict", {"data": [ROW]})[0] == 202

    redis_proc.stop()
    for path, method in (("/predict", "POST"), ("/health", "GET"), ("/job/x", "GET")):
        started = time.monotonic()
        status, answer = http(method, f"{url}{path}", {"data": [ROW]} if method == "POST" else None)
        assert status == 503, (path, answer)
        assert time.monotonic() - started < 3, path
        if path == "/health":
            assert answer["components"]["redis"].startswith("error")
        else:
            assert "redis unavailable" in answer["detail"]

    procs.redis(port)  # back, empty
    status, answer = http("POST", f"{url}/predict", {"data": [ROW]})
    assert status == 202
    assert http("GET", f"{url}/job/{answer['job_id']}")[1]["status"] == "pending"


def test_sigterm_stops_the_proxy(db, procs):
    proc = procs.proxy(make_env())
    proc.signal(signal.SIGTERM)
    # uvicorn shuts down cleanly, then re-raises the signal so the exit status says why.
    assert proc.popen.wait(15) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in proc.text()
