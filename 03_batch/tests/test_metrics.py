"""/metrics of the API and of a loop-mode job, scraped after real traffic and real runs: the
counters move by exactly what was sent and done, labels are route templates, the table gauges
come from the database and a locked table cannot hold a scrape."""

import time
import urllib.request

import db
from config import METRICS_QUERY_TIMEOUT_S, Settings
from conftest import (
    Processes,
    env_for,
    free_port,
    http,
    insert_rows,
    log_lines,
    query,
    start_api,
    wait_for,
)
from prometheus_client.parser import text_string_to_metric_families
from test_job import hold_gap_lock

SETOSA = [5.1, 3.5, 1.4, 0.2]


def scrape(url: str, auth: str | None = None) -> dict[tuple, float]:
    """{(sample name, frozenset of labels): value} of one /metrics answer."""
    request = urllib.request.Request(url + "/metrics")
    if auth:
        request.add_header("Authorization", auth)
    with urllib.request.urlopen(request, timeout=30) as response:
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


def value(samples: dict[tuple, float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def present(samples: dict[tuple, float], name: str, **labels: str) -> float:
    """A sample's value; the test fails if the scrape does not have it."""
    found = value(samples, name, **labels)
    assert found is not None, (name, labels)
    return found


def labels(**items: str) -> frozenset:
    return frozenset(items.items())


def test_http_counters_move_by_exactly_the_requests_sent(api: str) -> None:
    before = scrape(api)
    ids = [http("POST", api + "/data", {"values": SETOSA})[1]["id"] for _ in range(3)]
    assert http("POST", api + "/data/list", {"items": [{"values": SETOSA}] * 4})[0] == 201
    assert http("POST", api + "/data", {"values": [1, 2, 3]})[0] == 400
    for item_id in ids[:2]:
        assert http("GET", f"{api}/data/{item_id}")[0] == 200
    assert http("GET", api + "/data/987654")[0] == 404  # the route matches; the row does not
    assert http("GET", api + "/no/such/path/123")[0] == 404  # no route: one bounded label
    assert http("GET", api + "/data/list")[0] == 405  # the route exists, not for GET
    after = scrape(api)

    assert moved(before, after, "http_requests_total") == {
        labels(method="POST", route="/data", status="201"): 3,
        labels(method="POST", route="/data/list", status="201"): 1,
        labels(method="POST", route="/data", status="400"): 1,
        labels(method="GET", route="/data/{item_id}", status="200"): 2,
        labels(method="GET", route="/data/{item_id}", status="404"): 1,
        labels(method="GET", route="unmatched", status="404"): 1,
        labels(method="GET", route="/data/list", status="405"): 1,
        labels(method="GET", route="/metrics", status="200"): 1,  # the first scrape
    }
    assert moved(before, after, "http_request_duration_seconds_count") == {
        labels(method="POST", route="/data"): 4,
        labels(method="POST", route="/data/list"): 1,
        labels(method="GET", route="/data/{item_id}"): 3,
        labels(method="GET", route="unmatched"): 1,
        labels(method="GET", route="/data/list"): 1,
        labels(method="GET", route="/metrics"): 1,
    }
    # Only stored rows count as registered: the refused one does not.
    assert moved(before, after, "batch_rows_registered_total") == {labels(): 7}
    routes = {dict(key[1]).get("route") for key in after}
    assert not any("987654" in r or "123" in r for r in routes if r), routes


def test_metrics_need_the_api_key_when_it_is_set(processes: Processes, settings: Settings) -> None:
    url = start_api(processes, settings, API_KEY="s3cret")
    status, body = http("GET", url + "/metrics")
    assert (status, body) == (401, {"detail": "missing or wrong API key"})
    samples = scrape(url, auth="Bearer s3cret")
    assert value(samples, "http_requests_total", method="GET", route="/metrics", status="401") == 1


def test_table_gauges_and_job_counters_follow_a_run(
    api: str, settings: Settings, processes: Processes
) -> None:
    good = 23
    assert http("POST", api + "/data/list", {"items": [{"values": SETOSA}] * good})[0] == 201
    # Rows another writer stored: two the model cannot score, and one an hour old.
    for values in ("[1, 2, 3]", '"abc"'):
        query(settings, "INSERT INTO items (`values`) VALUES (%s)", (values,))
    query(
        settings,
        "UPDATE items SET created_datetime = NOW() - INTERVAL 1 HOUR ORDER BY id LIMIT 1",
    )
    samples = scrape(api)
    assert value(samples, "batch_rows_unpredicted") == good + 2
    assert 3600 <= present(samples, "batch_oldest_unpredicted_age_seconds") < 3600 + 60

    port = free_port()
    started = time.time()
    env = env_for(settings, INTERVAL=0.5, CHUNK_SIZE=5, THREADS=2, METRICS_PORT=port)
    job = processes.start(["job.py"], env, "loop")
    job_url = f"http://127.0.0.1:{port}"

    def job_samples() -> dict[tuple, float]:  # empty until the first successful run
        try:
            s = scrape(job_url)
        except OSError:
            return {}
        return s if value(s, "batch_last_success_timestamp_seconds") else {}

    samples = wait_for(job_samples, what="the loop job's first successful run")
    assert job.poll() is None
    assert value(samples, "batch_rows_predicted_total") == good
    assert value(samples, "batch_rows_quarantined_total") == 2
    # Every chunk the job's threads committed, in one registry: as many as its log lines.
    chunks = [m for m in log_lines(job) if m["message"] == "chunk"]
    assert len(chunks) == 5  # 25 rows in chunks of 5
    assert value(samples, "batch_chunk_duration_seconds_count") == len(chunks)
    assert value(samples, "batch_chunk_duration_seconds_bucket", le="+Inf") == len(chunks)
    assert value(samples, "batch_runs_total", result="failure") == 0
    assert present(samples, "batch_runs_total", result="success") >= 1
    assert started <= present(samples, "batch_last_success_timestamp_seconds") <= time.time()
    assert not [k for k in samples if k[0] == "batch_chunk_retries_total"]

    samples = scrape(api)
    assert value(samples, "batch_rows_unpredicted") == 0  # quarantined rows do not wait
    assert value(samples, "batch_oldest_unpredicted_age_seconds") == 0


def test_a_retried_chunk_is_counted_by_its_reason(settings: Settings, processes: Processes) -> None:
    n = 30
    insert_rows(settings, [SETOSA] * n)
    holder = hold_gap_lock(settings)  # the job's first write-back waits LOCK_WAIT_S, then 1205
    port = free_port()
    env = env_for(settings, INTERVAL=0.2, CHUNK_SIZE=10, THREADS=1, METRICS_PORT=port)
    job = processes.start(["job.py"], env, "loop")
    job_url = f"http://127.0.0.1:{port}"

    def retried() -> float | None:
        try:
            s = scrape(job_url)
        except OSError:
            return None
        return value(s, "batch_chunk_retries_total", reason="lock_wait_timeout")

    wait_for(retried, timeout=60, what="a retry counted")
    holder.rollback()
    holder.close()

    def all_predicted() -> dict[tuple, float]:  # empty until then
        s = scrape(job_url)
        return s if value(s, "batch_rows_predicted_total") == n else {}

    samples = wait_for(all_predicted, what=f"{n} rows predicted")
    logged = [m for m in log_lines(job) if m["message"] == "chunk failed; retrying"]
    assert all("1205" in m["error"] for m in logged)
    assert moved({}, samples, "batch_chunk_retries_total") == {
        labels(reason="lock_wait_timeout"): len(logged)
    }


def test_a_locked_table_cannot_hold_a_scrape(
    api: str, settings: Settings, processes: Processes
) -> None:
    locker = db.connect(settings)
    try:
        with locker.cursor() as cur:
            cur.execute("LOCK TABLES items WRITE")  # the gauges' queries must wait for it
        started = time.monotonic()
        samples = scrape(api)
        took = time.monotonic() - started
        assert took < 2 * METRICS_QUERY_TIMEOUT_S + 1, took
        assert value(samples, "batch_rows_unpredicted") is None  # left out, not stale or 0
        assert value(samples, "batch_rows_registered_total") == 0  # the rest is served
        api_log = processes.started[0]
        warnings = [m for m in log_lines(api_log) if m["message"] == "table gauges unavailable"]
        # The server's own limit stopped the query (MariaDB 1969, MySQL 3024), or else the
        # client's read timeout gave up on it (2013).
        assert len(warnings) == 1, warnings
        assert any(code in warnings[0]["cause"] for code in ("1969", "3024", "2013")), warnings
    finally:
        locker.close()  # releases the lock
    assert value(scrape(api), "batch_rows_unpredicted") == 0
