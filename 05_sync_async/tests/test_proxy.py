"""The HTTP side: the fast answer, the queued job, and strict validation."""

import asyncio
import base64
import contextlib
import io
import json
import os
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from conftest import (
    CAT_CLASSES,
    REDIS_PASSWORD,
    REDIS_URL,
    SAMPLE_B64,
    Started,
    free_port,
    http,
    start_proxy,
)
from PIL import Image

import jobs


def predict(base: str, payload: object) -> tuple[int, dict]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return http("POST", f"{base}/predict", body)


def test_health_and_metadata(proxy: str, db: redis.Redis) -> None:
    assert http("GET", f"{proxy}/health") == (200, {"health": "ok"})
    status, metadata = http("GET", f"{proxy}/metadata")
    assert status == 200
    assert metadata["sync_model"] == "efficientnet_lite0"
    assert metadata["async_model"] == "resnet50"


def test_predict_answers_now_and_queues_the_job(proxy: str, db: redis.Redis) -> None:
    status, body = predict(proxy, {"image_data": SAMPLE_B64})
    assert status == 200, body
    assert body["result_sync"] in CAT_CLASSES
    assert [entry["label"] for entry in body["top5"]][0] == body["result_sync"]
    job_id = body["job_id"]
    assert len(job_id) == 6
    assert db.lrange("queue:jobs", 0, -1) == [job_id.encode()]
    assert 3500 < db.ttl(f"image:{job_id}") <= 3600
    # No worker runs in this test: the job waits, and says so.
    assert http("GET", f"{proxy}/job/{job_id}") == (
        200,
        {job_id: {"status": "queued", "prediction": ""}},
    )


def test_predict_test_uses_the_sample(proxy: str, db: redis.Redis) -> None:
    status, body = http("GET", f"{proxy}/predict/test")
    assert status == 200
    assert body["result_sync"] in CAT_CLASSES
    assert db.llen("queue:jobs") == 1


def png(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


BAD_REQUESTS = {
    "not JSON": b"image_data=abc",
    "not an object": ["abc"],
    "missing field": {"image": SAMPLE_B64},
    "not a string": {"image_data": 12},
    "bad base64": {"image_data": "not base64!"},
    "non-ASCII base64": {"image_data": "5²×Ë7TlN"},
    "not an image": {"image_data": base64.b64encode(b"hello, world").decode()},
    "truncated image": {"image_data": SAMPLE_B64[: len(SAMPLE_B64) // 2]},
    "too many bytes": {"image_data": base64.b64encode(os.urandom(1_000_001)).decode()},
    "body far too large": {"image_data": "A" * 3_000_000},
    "too many pixels": {"image_data": png(1001, 1000)},
    "deeply nested": b'{"image_data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "huge integer": b'{"image_data": ' + b"7" * 5000 + b"}",
    "a GIF": {"image_data": base64.b64encode(b"GIF89a" + bytes(100)).decode()},
}


def test_bad_requests_are_400_and_queue_nothing(proxy: str, db: redis.Redis) -> None:
    for name, payload in BAD_REQUESTS.items():
        status, body = predict(proxy, payload)
        assert status == 400, (name, body)
        assert set(body) == {"error"}, name
        assert "object at" not in body["error"], (name, body)  # no Python reprs
    assert db.dbsize() == 0


def test_unknown_job_is_404(proxy: str, db: redis.Redis) -> None:
    for job_id in ("000000", "not-an-id"):
        status, body = http("GET", f"{proxy}/job/{job_id}")
        assert status == 404
        assert "error" in body


def test_job_ids_never_collide(db: redis.Redis) -> None:
    ids = iter(["aaaaaa", "aaaaaa", "bbbbbb"])

    async def two_jobs() -> tuple[str, str]:
        client = aioredis.Redis.from_url(REDIS_URL, password=REDIS_PASSWORD)
        try:
            keys = jobs.Keys()
            first = await jobs.submit(client, keys, b"one", 60, 10, new_id=lambda: next(ids))
            second = await jobs.submit(client, keys, b"two", 60, 10, new_id=lambda: next(ids))
            return first, second
        finally:
            await client.aclose()

    assert asyncio.run(two_jobs()) == ("aaaaaa", "bbbbbb")
    assert db.get("image:aaaaaa") == b"one"
    assert db.lrange("queue:jobs", 0, -1) == [b"bbbbbb", b"aaaaaa"]


def test_redis_down_is_503_not_500(start: Started) -> None:
    # A closed port: the fast model still loads, the queue is unreachable.
    _, base = start_proxy(start, REDIS_URL=f"redis://127.0.0.1:{free_port()}/5")
    status, body = predict(base, {"image_data": SAMPLE_B64})
    # A stable message: Redis's own error text (addresses, ports) stays in the proxy's log.
    assert (status, body) == (503, {"error": "job queue unavailable, try again later"})
    assert http("GET", f"{base}/health")[0] == 503


def test_decodes_run_at_most_decode_threads_at_once(start: Started, db: redis.Redis) -> None:
    # Each decode holds up to ~8 bytes per pixel: their number, not the clients', bounds memory.
    process, base = start_proxy(start, DECODE_THREADS=1)
    image = png(3000, 3000)  # 9 M pixels: a slow decode, just under the default limit
    assert predict(base, {"image_data": image})[0] == 200  # the decode thread now exists
    threads = len(list(Path(f"/proc/{process.popen.pid}/task").iterdir()))
    with ThreadPoolExecutor(8) as clients:
        answers = list(clients.map(lambda _: predict(base, {"image_data": image}), range(8)))
    assert [status for status, _ in answers] == [200] * 8
    assert len(list(Path(f"/proc/{process.popen.pid}/task").iterdir())) == threads


def test_a_hung_redis_is_a_fast_503(start: Started, hung_redis: int) -> None:
    # Connections are accepted, nothing is ever answered. Each request must give up after
    # REDIS_TIMEOUT in all (0.5 s here), not after redis-py's socket timeouts add up.
    url = f"redis://127.0.0.1:{hung_redis}/5"
    _, base = start_proxy(start, REDIS_URL=url, REDIS_TIMEOUT=0.5)
    body = json.dumps({"image_data": SAMPLE_B64}).encode()
    for method, path, payload in [
        ("POST", "/predict", body),
        ("GET", "/job/abcdef", None),
        ("GET", "/health", None),
    ]:
        status, answer = http(method, f"{base}{path}", payload, timeout=4)
        assert status == 503, (path, answer)


def test_a_retried_submit_queues_one_job(start: Started, db: redis.Redis, lossy_redis: int) -> None:
    # The first SUBMIT runs but its reply is lost: the retry must not queue a second job.
    db.script_load(jobs.SUBMIT)  # so that the first EVALSHA runs the script
    _, base = start_proxy(start, REDIS_URL=f"redis://127.0.0.1:{lossy_redis}/5")
    status, body = predict(base, {"image_data": SAMPLE_B64})
    assert status == 200, body
    assert db.lrange("queue:jobs", 0, -1) == [body["job_id"].encode()]
    assert db.keys("image:*") == [f"image:{body['job_id']}".encode()]


def test_a_full_queue_is_429_with_retry_after(start: Started, db: redis.Redis) -> None:
    _, base = start_proxy(start, MAX_QUEUE_LENGTH=2)
    for _ in range(2):
        assert predict(base, {"image_data": SAMPLE_B64})[0] == 200
    request = urllib.request.Request(
        f"{base}/predict", data=json.dumps({"image_data": SAMPLE_B64}).encode(), method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 429
    assert int(refused.value.headers["Retry-After"]) > 0
    assert set(json.loads(refused.value.read())) == {"error"}
    assert db.llen("queue:jobs") == 2
    assert len(db.keys("image:*")) == 2  # the refused image was not stored


def test_the_proxy_binds_to_host(start: Started) -> None:
    process, base = start_proxy(start)  # HOST unset: loopback only
    assert f"Uvicorn running on {base}" in process.output()


def test_connections_past_max_concurrency_are_refused(start: Started) -> None:
    _, base = start_proxy(start, MAX_CONCURRENCY=2)
    port = int(base.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
    try:
        request = urllib.request.Request(f"{base}/health")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
        assert refused.value.code == 503
    finally:
        for connection in idle:
            connection.close()
    assert http("GET", f"{base}/health")[0] == 200


def test_api_key_when_set(start: Started, db: redis.Redis) -> None:
    _, base = start_proxy(start, API_KEY="s3cret-key")
    body = json.dumps({"image_data": SAMPLE_B64}).encode()
    assert http("GET", f"{base}/health")[0] == 200  # probes need no key
    assert http("GET", f"{base}/openapi.json")[0] == 200
    for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"}):
        for method, path, payload in [
            ("GET", "/metadata", None),
            ("POST", "/predict", body),
            ("GET", "/predict/test", None),
            ("GET", "/job/abcdef", None),
        ]:
            status, answer = http(method, f"{base}{path}", payload, headers=headers)
            assert (status, set(answer)) == (401, {"error"}), (path, headers)
    assert db.dbsize() == 0
    good = {"Authorization": "Bearer s3cret-key"}
    assert http("GET", f"{base}/metadata", headers=good)[0] == 200
    status, answer = http("POST", f"{base}/predict", body, headers=good)
    assert status == 200
    assert http("GET", f"{base}/job/{answer['job_id']}", headers=good)[0] == 200


def test_huge_headers_are_refused(start: Started) -> None:
    # httptools, uvicorn's default parser, would take headers of any size: h11 is bounded.
    _, base = start_proxy(start)
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            connection.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1_000_000)
        answer = connection.recv(200)
    assert answer.startswith(b"HTTP/1.1 4"), answer


def test_a_body_sent_too_slowly_is_408(start: Started, db: redis.Redis) -> None:
    _, base = start_proxy(start, BODY_TIMEOUT=1)
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"image_data": "'
        )  # ... and the rest never comes
        answer = connection.recv(200)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert db.dbsize() == 0
