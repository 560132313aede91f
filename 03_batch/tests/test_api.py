"""Every endpoint of the API, against the real server process and a real database."""

from datetime import datetime

import pytest
from conftest import http, query

SETOSA = [5.1, 3.5, 1.4, 0.2]
VIRGINICA = [6.3, 3.3, 6.0, 2.5]


def count(settings) -> int:
    return query(settings, "SELECT COUNT(*) FROM items")[0][0]


def test_post_one_item(api, settings):
    status, item = http("POST", api + "/data", {"values": SETOSA})
    assert status == 201
    assert set(item) == {"id", "values", "prediction", "created_datetime"}
    assert item["values"] == SETOSA and item["prediction"] is None
    datetime.fromisoformat(item["created_datetime"])
    assert http("GET", f"{api}/data/{item['id']}") == (200, item)


def test_post_list_in_order(api, settings):
    status, items = http(
        "POST", api + "/data/list", {"items": [{"values": SETOSA}, {"values": VIRGINICA}]}
    )
    assert status == 201
    assert [i["values"] for i in items] == [SETOSA, VIRGINICA]
    assert items[1]["id"] == items[0]["id"] + 1
    assert all(i["prediction"] is None for i in items)
    assert count(settings) == 2


def test_integers_are_stored_as_floats(api):
    status, item = http("POST", api + "/data", {"values": [5, 3, 1, 0]})
    assert status == 201 and item["values"] == [5.0, 3.0, 1.0, 0.0]


def test_get_missing_item_is_404(api):
    assert http("GET", api + "/data/999999") == (404, {"detail": "Item not found"})
    assert http("GET", api + "/data/abc")[0] == 404


def test_pagination_walks_every_row_once(api):
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


def test_predicted_and_unpredicted_filters(api, settings):
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
def test_bad_pagination_is_400(api, query_string):
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
def test_bad_item_is_400_and_writes_nothing(api, settings, item):
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
def test_non_json_numbers_and_malformed_json_are_400(api, settings, raw):
    status, body = http("POST", api + "/data", raw=raw)
    assert status == 400 and body["detail"]
    assert count(settings) == 0


@pytest.mark.parametrize(
    "body",
    [{"items": []}, {"items": [{"values": SETOSA}] * 10_001}, {"items": "x"}, {"values": SETOSA}],
    ids=["empty list", "10,001 items", "items not a list", "no items key"],
)
def test_bad_list_is_400_and_writes_nothing(api, settings, body):
    status, answer = http("POST", api + "/data/list", body)
    assert status == 400 and answer["detail"]
    assert count(settings) == 0


def test_ten_thousand_items_in_one_request(api, settings):
    status, items = http("POST", api + "/data/list", {"items": [{"values": VIRGINICA}] * 10_000})
    assert status == 201 and len(items) == 10_000
    assert [i["id"] for i in items] == list(range(items[0]["id"], items[0]["id"] + 10_000))
    assert count(settings) == 10_000


def test_health_and_metadata(api):
    assert http("GET", api + "/health") == (200, {"status": "ok"})
    status, meta = http("GET", api + "/metadata")
    assert status == 200
    assert meta["input"] == [{"name": "input", "type": "tensor(float)", "shape": [None, 4]}]
    assert meta["output"][0]["name"] == "probabilities"
    assert meta["output"][0]["shape"] == [None, 3]
    assert meta["labels"] == {"0": "setosa", "1": "versicolor", "2": "virginica"}


def test_wrong_method_is_405_json(api):
    status, body = http("GET", api + "/data")
    assert status == 405 and "detail" in body
