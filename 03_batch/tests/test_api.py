"""Every endpoint of the API, against the real server process and a real database."""

import json
import select
import socket
import urllib.error
import urllib.request
from datetime import datetime

import pytest
from api import FLOAT32_MAX
from config import MAX_BODY, MAX_CONNECTIONS, MAX_HEADER_BYTES, MAX_ITEMS, Settings
from conftest import Processes, env_for, free_port, http, query, start_api, wait_for

SETOSA = [5.1, 3.5, 1.4, 0.2]
VIRGINICA = [6.3, 3.3, 6.0, 2.5]


def count(settings: Settings) -> int:
    n: int = query(settings, "SELECT COUNT(*) FROM items")[0][0]
    return n


def test_post_one_item(api: str, settings: Settings) -> None:
    status, item = http("POST", api + "/data", {"values": SETOSA})
    assert status == 201
    assert set(item) == {"id", "values", "prediction", "created_datetime"}
    assert item["values"] == SETOSA and item["prediction"] is None
    datetime.fromisoformat(item["created_datetime"])
    assert http("GET", f"{api}/data/{item['id']}") == (200, item)


def test_post_list_in_order(api: str, settings: Settings) -> None:
    status, items = http(
        "POST", api + "/data/list", {"items": [{"values": SETOSA}, {"values": VIRGINICA}]}
    )
    assert status == 201
    assert [i["values"] for i in items] == [SETOSA, VIRGINICA]
    assert items[1]["id"] == items[0]["id"] + 1
    assert all(i["prediction"] is None for i in items)
    assert count(settings) == 2


def test_integers_are_stored_as_floats(api: str) -> None:
    status, item = http("POST", api + "/data", {"values": [5, 3, 1, 0]})
    assert status == 201 and item["values"] == [5.0, 3.0, 1.0, 0.0]


def test_get_missing_item_is_404(api: str) -> None:
    assert http("GET", api + "/data/999999") == (404, {"detail": "Item not found"})
    assert http("GET", api + "/data/abc")[0] == 404


def test_pagination_walks_every_row_once(api: str) -> None:
    status, items = http("POST", api + "/data/list", {"items": [{"values": SETOSA}] * 250})
    assert status == 201
    ids = [i["id"] for i in items]

    status, page = http("GET", api + "/data/all")
    assert status == 200 and [i["id"] for i in page] == ids[:100]  # default limit 100

    seen, after = [], 0
    while True:
        status, page = http("GET", f"{api}/data/all?limit=60&after_id={after}")
        assert status == 200 and len(page) <= 60
        if not page:
            break
        seen += [i["id"] for i in page]
        after = page[-1]["id"]
    assert seen == ids

    assert len(http("GET", api + "/data/all?limit=1000")[1]) == 250


def test_predicted_and_unpredicted_filters(api: str, settings: Settings) -> None:
    _, items = http("POST", api + "/data/list", {"items": [{"values": SETOSA}] * 3})
    ids = [i["id"] for i in items]
    # Give one row a prediction, as the job would.
    query(
        settings,
        "UPDATE items SET prediction = %s WHERE id = %s",
        ('{"0": 1, "1": 0, "2": 0}', ids[1]),
    )
    _, predicted = http("GET", api + "/data/predicted")
    _, unpredicted = http("GET", api + "/data/unpredicted")
    assert [i["id"] for i in predicted] == [ids[1]]
    assert predicted[0]["prediction"] == {"0": 1, "1": 0, "2": 0}
    assert [i["id"] for i in unpredicted] == [ids[0], ids[2]]
    _, page = http("GET", f"{api}/data/unpredicted?after_id={ids[0]}&limit=1")
    assert [i["id"] for i in page] == [ids[2]]


@pytest.mark.parametrize(
    "query_string",
    ["limit=0", "limit=1001", "limit=abc", "after_id=-1", "after_id=1.5"],
)
def test_bad_pagination_is_400(api: str, query_string: str) -> None:
    status, body = http("GET", f"{api}/data/all?{query_string}")
    assert status == 400 and "detail" in body


BAD_ITEMS = {
    "too short": {"values": [1, 2, 3]},
    "too long": {"values": [1, 2, 3, 4, 5]},
    "string": {"values": [1, 2, 3, "4"]},
    "boolean": {"values": [1, 2, 3, True]},
    "null": {"values": [1, 2, 3, None]},
    "nested": {"values": [1, 2, 3, [4]]},
    "not a list": {"values": "1,2,3,4"},
    "missing values": {"value": [1, 2, 3, 4]},
    "extra key": {"values": [1, 2, 3, 4], "id": 7},
    "not an object": [1, 2, 3, 4],
    "beyond float32": {"values": [1, 2, 3, 1e39]},
    "huge integer": {"values": [1, 2, 3, 10**400]},
}


@pytest.mark.parametrize("item", BAD_ITEMS.values(), ids=BAD_ITEMS.keys())
def test_bad_item_is_400_and_writes_nothing(api: str, settings: Settings, item: object) -> None:
    status, body = http("POST", api + "/data", item)
    assert status == 400 and body["detail"]
    # The same item inside a list, after a good one: the whole request is refused.
    status, body = http("POST", api + "/data/list", {"items": [{"values": SETOSA}, item]})
    assert status == 400 and body["detail"].startswith("items[1]")
    assert count(settings) == 0


@pytest.mark.parametrize(
    "raw",
    [
        b'{"values": [NaN, 3.5, 1.4, 0.2]}',
        b'{"values": [Infinity, 3.5, 1.4, 0.2]}',
        b'{"values": [5.1, 3.5, 1.4, 0.2]',  # malformed
        b"",
    ],
    ids=["NaN", "Infinity", "malformed", "empty body"],
)
def test_non_json_numbers_and_malformed_json_are_400(
    api: str, settings: Settings, raw: bytes
) -> None:
    status, body = http("POST", api + "/data", raw=raw)
    assert status == 400 and body["detail"]
    assert count(settings) == 0


@pytest.mark.parametrize(
    "body",
    [
        {"items": []},
        {"items": [{"values": SETOSA}] * 10_001},
        {"items": "x"},
        {"values": SETOSA},
        {"items": [{"values": SETOSA}], "x": 1},
    ],
    ids=["empty list", "10,001 items", "items not a list", "no items key", "extra key"],
)
def test_bad_list_is_400_and_writes_nothing(api: str, settings: Settings, body: object) -> None:
    status, answer = http("POST", api + "/data/list", body)
    assert status == 400 and answer["detail"]
    assert count(settings) == 0


def test_ten_thousand_items_in_one_request(api: str, settings: Settings) -> None:
    status, items = http("POST", api + "/data/list", {"items": [{"values": VIRGINICA}] * 10_000})
    assert status == 201 and len(items) == 10_000
    assert [i["id"] for i in items] == list(range(items[0]["id"], items[0]["id"] + 10_000))
    assert count(settings) == 10_000


def test_health_and_metadata(api: str) -> None:
    assert http("GET", api + "/health") == (200, {"status": "ok"})
    status, meta = http("GET", api + "/metadata")
    assert status == 200
    assert meta["input"] == [{"name": "input", "type": "tensor(float)", "shape": [None, 4]}]
    assert meta["output"][0]["name"] == "probabilities"
    assert meta["output"][0]["shape"] == [None, 3]
    assert meta["labels"] == {"0": "setosa", "1": "versicolor", "2": "virginica"}


def test_wrong_method_is_405_json(api: str) -> None:
    status, body = http("GET", api + "/data")
    assert status == 405 and "detail" in body


# Hostile callers: bodies, nesting, URLs, slow and idle connections, keys.


def raw_exchange(url: str, request: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes over one connection; return what the server answers until it closes or
    stops for `timeout` s (a server still waiting for more of the request answers nothing)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(request)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
                if b"\r\n\r\n" in answer and answer.endswith(b"}"):
                    break
        except TimeoutError:
            pass
    return answer


def test_declared_oversized_body_is_413_before_any_of_it_is_read(api: str) -> None:
    answer = raw_exchange(
        api,
        b"POST /data/list HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % (100 * MAX_BODY),  # ... and no body is sent at all
    )
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"detail"' in answer


def test_streamed_body_is_cut_off_past_the_limit(api: str) -> None:
    # Chunked, no length: the server cannot know the size before it has read MAX_BODY + 1 bytes.
    # The terminating chunk is never sent, so only a server that stops reading can answer.
    data = b"[" * (MAX_BODY + 1)
    answer = raw_exchange(
        api,
        b"POST /data/list HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n" % len(data)
        + data
        + b"\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_ten_thousand_items_of_the_longest_numbers_fit_the_body_limit(
    api: str, settings: Settings
) -> None:
    longest = [-FLOAT32_MAX, -1.1754943508222875e-38, -FLOAT32_MAX, -FLOAT32_MAX]
    body = {"items": [{"values": longest}] * MAX_ITEMS}
    assert len(json.dumps(body)) < MAX_BODY
    status, items = http("POST", api + "/data/list", body)
    assert status == 201 and len(items) == MAX_ITEMS


@pytest.mark.parametrize("path", ["/data", "/data/list"])
def test_deeply_nested_json_is_400(api: str, settings: Settings, path: str) -> None:
    for raw in (b"[" * 100_000 + b"]" * 100_000, b'{"items": ' + b"[" * 100_000):
        status, body = http("POST", api + path, raw=raw)
        assert status == 400 and body["detail"].startswith("malformed JSON")
    assert count(settings) == 0


def test_integer_literal_of_5000_digits_is_400(api: str, settings: Settings) -> None:
    status, body = http("POST", api + "/data", raw=b'{"values": [1, 2, 3, %s]}' % (b"9" * 5000))
    assert status == 400 and body["detail"]
    assert count(settings) == 0


@pytest.mark.parametrize("item_id", ["9" * 5000, "99999999999999999999999", "-1", "1.5"])
def test_unknown_or_absurd_id_in_the_url_is_404(api: str, item_id: str) -> None:
    status, body = http("GET", f"{api}/data/{item_id}")
    assert status == 404 and body["detail"] in ("Item not found", "Not Found")
    assert http("GET", f"{api}/data/18446744073709551615") == (404, {"detail": "Item not found"})


def test_wrong_method_on_a_known_path_is_405_with_allow(api: str) -> None:
    req = urllib.request.Request(api + "/data/list", method="GET")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 405 and e.value.headers["Allow"] == "POST"


def test_headers_growing_past_the_bound_are_refused(api: str) -> None:
    # A client trickling an endless header block: once MAX_HEADER_BYTES have arrived without
    # the blank line that ends it, the server answers 400 instead of buffering more.
    host, port = api.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: ")
        for _ in range(4):
            sock.sendall(b"a" * (MAX_HEADER_BYTES // 2))
            # Separate reads on the server side; stop sending as soon as it has answered.
            if select.select([sock], [], [], 1)[0]:
                break
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]


def test_idle_connections_past_the_limit_get_503(api: str) -> None:
    host, port = api.removeprefix("http://").split(":")
    idle = [socket.create_connection((host, int(port))) for _ in range(MAX_CONNECTIONS)]
    try:
        status, body = http_status_only(api + "/data/all")
        assert status == 503
    finally:
        for sock in idle:
            sock.close()
    wait_for(lambda: http("GET", api + "/health")[0] == 200, what="the server to recover")


def http_status_only(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_host_defaults_to_loopback_only(processes: Processes, settings: Settings) -> None:
    env = env_for(settings, PORT=free_port())
    env.pop("HOST", None)
    url = start_api(processes, settings, env=env)
    port = int(url.rsplit(":", 1)[1])
    assert http("GET", url + "/health")[0] == 200
    # 127.0.0.2 is loopback too, but only a server bound to every address (0.0.0.0) answers it.
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.2", port)) != 0


def test_api_key_guards_every_endpoint_but_health(processes: Processes, settings: Settings) -> None:
    url = start_api(processes, settings, API_KEY="s3cret-key")
    row = {"values": [5.1, 3.5, 1.4, 0.2]}
    for method, path, body in [
        ("POST", "/data", row),
        ("POST", "/data/list", {"items": [row]}),
        ("GET", "/data/all", None),
        ("GET", "/data/1", None),
        ("GET", "/metadata", None),
    ]:
        for header in (None, "Bearer wrong", "s3cret-key", "Basic s3cret-key"):
            status, answer = http(method, url + path, body, auth=header)
            assert (status, answer) == (401, {"detail": "missing or wrong API key"}), header
    assert count(settings) == 0
    assert http("GET", url + "/health")[0] == 200
    assert http("POST", url + "/data", row, auth="Bearer s3cret-key")[0] == 201
    assert http("GET", url + "/data/all", auth="Bearer s3cret-key")[0] == 200
