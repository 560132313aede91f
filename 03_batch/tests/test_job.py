"""The batch job against a real database: right answers, exactly once, crash-safe, loud when
the database is gone."""

import csv
import json
import signal
import subprocess
import time
from collections.abc import Sequence
from typing import Any

import db
import numpy as np
import onnxruntime as ort
from config import CHUNK_ATTEMPTS, MODELS_DIR, Settings
from conftest import (
    Process,
    Processes,
    env_for,
    free_port,
    http,
    insert_rows,
    log_lines,
    query,
    read_log,
    run_job,
    start_api,
    wait_for,
)
from pymysql.connections import Connection


def iris() -> tuple[list[list[float]], list[int]]:
    with open(MODELS_DIR / "iris.csv") as f:
        rows = list(csv.DictReader(f))
    values = [[float(r[k]) for k in list(r)[:4]] for r in rows]
    return values, [int(r["target"]) for r in rows]


def predictions(settings: Settings) -> dict[int, dict[str, float]]:
    rows = query(settings, "SELECT id, prediction FROM items WHERE prediction IS NOT NULL")
    return {item_id: json.loads(p) for item_id, p in rows}


def messages(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_job_predicts_iris_rows_with_the_right_labels(api: str, settings: Settings) -> None:
    values, targets = iris()
    _, items = http("POST", api + "/data/list", {"items": [{"values": v} for v in values]})
    done = run_job(settings, CHUNK_SIZE=16)  # several chunks, on several threads
    assert done.returncode == 0, done.stdout + done.stderr
    logs = messages(done.stdout)
    assert [m["message"] for m in logs][:2] == ["batch start", "rows found"]
    assert logs[1]["rows"] == 150
    assert logs[-1]["message"] == "batch end" and logs[-1]["rows"] == 150

    # The model's own answers for these rows, computed here without the job: row i must have
    # got row i's probabilities (stored with 6 significant digits).
    session = ort.InferenceSession(str(MODELS_DIR / "iris_svc.onnx"))
    expected = session.run(["probabilities"], {"input": np.array(values, dtype=np.float32)})[0]
    stored = predictions(settings)
    for item, proba in zip(items, expected, strict=True):
        p = stored[item["id"]]
        assert list(p) == ["0", "1", "2"]
        assert np.allclose([p["0"], p["1"], p["2"]], proba, rtol=1e-5, atol=1e-6)
    accuracy = np.mean(
        [int(max(p, key=p.__getitem__)) for p in stored.values()] == np.array(targets)
    )
    assert accuracy > 0.9

    _, page = http("GET", api + "/data/predicted?limit=1000")
    assert len(page) == 150 and page[0]["prediction"] == stored[page[0]["id"]]
    assert http("GET", api + "/data/unpredicted")[1] == []

    again = run_job(settings)  # nothing left: a second run predicts nothing
    assert again.returncode == 0 and messages(again.stdout)[-1]["rows"] == 0


def test_three_jobs_predict_every_row_exactly_once(
    settings: Settings, processes: Processes
) -> None:
    n = 20_000
    insert_rows(settings, [[5.9, 3.0, 5.1, 1.8]] * n)
    # Hold the table so the three jobs block on their first query, then let them go together.
    holder = db.connect(settings)
    with holder.cursor() as cur:
        cur.execute("LOCK TABLES items WRITE")
    env = env_for(settings, CHUNK_SIZE=250)
    jobs = [processes.start(["job.py", "--once"], env, f"job{i}") for i in range(3)]
    wait_for(
        lambda: all(any(m["message"] == "batch start" for m in log_lines(j)) for j in jobs),
        what="three jobs to start",
    )
    time.sleep(0.5)  # let all three reach the lock
    with holder.cursor() as cur:
        cur.execute("UNLOCK TABLES")
    holder.close()
    for job in jobs:
        assert job.wait(timeout=300) == 0, read_log(job)

    per_job = [[m for m in log_lines(j) if m["message"] == "batch end"][0]["rows"] for j in jobs]
    assert sum(per_job) == n  # a row predicted twice would make this larger
    assert sum(1 for rows in per_job if rows) >= 2, per_job  # they really shared the work
    assert query(settings, "SELECT COUNT(*) FROM items WHERE prediction IS NULL")[0][0] == 0
    chunk_rows = [m["rows"] for j in jobs for m in log_lines(j) if m["message"] == "chunk"]
    assert sum(chunk_rows) == n


def test_sigkill_mid_run_leaves_whole_chunks_and_the_next_run_finishes(
    settings: Settings, processes: Processes
) -> None:
    n, chunk = 20_000, 100
    ids = insert_rows(settings, [[6.7, 3.1, 4.4, 1.4]] * n)
    env = env_for(settings, CHUNK_SIZE=chunk, THREADS=1)
    job = processes.start(["job.py", "--once"], env, "job")
    wait_for(
        lambda: sum(m["message"] == "chunk" for m in log_lines(job)) >= 3,
        what="three chunks committed",
    )
    job.send_signal(signal.SIGKILL)
    job.wait()

    done = sorted(predictions(settings))
    assert 0 < len(done) < n, "the job should have been killed mid-run"
    assert len(done) % chunk == 0  # whole chunks only: nothing half written
    assert done == ids[: len(done)]  # one thread, so the chunks are the first rows in id order

    rest = run_job(settings)
    assert rest.returncode == 0, rest.stdout + rest.stderr
    assert messages(rest.stdout)[-1]["rows"] == n - len(done)  # no row predicted twice
    assert len(predictions(settings)) == n


def test_loop_mode_waits_an_interval_then_repeats(settings: Settings, processes: Processes) -> None:
    ids = insert_rows(settings, [[5.1, 3.5, 1.4, 0.2]] * 10)
    job = processes.start(["job.py"], env_for(settings, INTERVAL=1), "loop")
    wait_for(lambda: len(predictions(settings)) == 10, what="the first run")
    more = insert_rows(settings, [[6.3, 3.3, 6.0, 2.5]] * 5)
    wait_for(lambda: len(predictions(settings)) == 15, what="the next run")
    assert sorted(predictions(settings)) == ids + more
    job.send_signal(signal.SIGTERM)  # docker stop: ends the wait at once
    assert job.wait(timeout=30) == 0
    logs = log_lines(job)
    assert logs[0]["message"] == "waiting for the first batch" and logs[0]["seconds"] == 1


def test_once_with_database_unreachable_exits_nonzero(settings: Settings) -> None:
    done = run_job(settings, MYSQL_PORT=free_port())  # nothing listens there
    assert done.returncode == 1
    failure = messages(done.stdout)[-1]
    assert failure["level"] == "error" and failure["message"] == "batch failed"
    assert "Can't connect" in failure["error"]


def test_loop_mode_with_database_unreachable_logs_and_retries(
    settings: Settings, processes: Processes
) -> None:
    job = processes.start(
        ["job.py"], env_for(settings, MYSQL_PORT=free_port(), INTERVAL=0.2), "loop"
    )
    wait_for(
        lambda: sum(m["message"].startswith("batch failed") for m in log_lines(job)) >= 2,
        what="two failed runs",
    )
    assert job.poll() is None  # still running, will retry


def test_database_stopped_health_503_and_job_fails(
    private_mysql: tuple[Settings, subprocess.Popen[bytes]], processes: Processes
) -> None:
    settings, server = private_mysql
    api = start_api(processes, settings)
    assert http("POST", api + "/data", {"values": [5.1, 3.5, 1.4, 0.2]})[0] == 201

    server.send_signal(signal.SIGKILL)  # the database dies
    server.wait()
    # A stable answer: the driver's error text (server address, port, errno) stays in the log.
    unavailable = (503, {"detail": "database unavailable"})
    assert http("GET", api + "/health") == unavailable
    assert http("POST", api + "/data", {"values": [5.1, 3.5, 1.4, 0.2]}) == unavailable
    assert http("GET", api + "/data/1") == unavailable
    logged = [m for m in log_lines(processes.started[-1]) if m["message"] == "database unavailable"]
    assert "Can't connect" in logged[0]["cause"]

    done = run_job(settings)
    assert done.returncode == 1
    assert messages(done.stdout)[-1]["message"] == "batch failed"


# Transient database errors and rows that cannot be scored.


def test_unscorable_rows_are_quarantined_and_never_retried(api: str, settings: Settings) -> None:
    good = insert_rows(settings, [[5.1, 3.5, 1.4, 0.2]] * 10)
    # Rows another writer put there, bypassing the API's checks (the column only demands JSON).
    bad_values = ["[1, 2, 3]", '"abc"', '{"a": 1}', "[1, 2, 3, 1e39]", "[1, 2, 3, null]",
                  '[1, 2, "x", 4]', "[[1, 2, 3, 4]]"]  # fmt: skip
    bad = []
    for v in bad_values:
        query(settings, "INSERT INTO items (`values`) VALUES (%s)", (v,))
        bad.append(query(settings, "SELECT MAX(id) FROM items")[0][0])
    good += insert_rows(settings, [[6.3, 3.3, 6.0, 2.5]] * 10)

    done = run_job(settings, CHUNK_SIZE=4)  # bad rows share chunks with good ones
    assert done.returncode == 0, done.stdout + done.stderr
    logs = messages(done.stdout)
    assert sorted(m["id"] for m in logs if m["message"] == "row quarantined") == bad
    assert logs[-1]["message"] == "batch end" and logs[-1]["quarantined"] == len(bad)
    assert sorted(predictions(settings)) == good  # every good row, whatever chunk it was in
    marked = query(settings, "SELECT id, error, state FROM items WHERE error IS NOT NULL")
    assert [(i, s) for i, _, s in marked] == [(i, 2) for i in bad]
    assert all("4 finite float32 numbers" in e for _, e, _ in marked)

    again = run_job(settings)  # quarantined rows are not tried again
    assert messages(again.stdout)[1]["rows"] == 0 and messages(again.stdout)[-1]["rows"] == 0
    assert http("GET", api + "/data/unpredicted")[1] == []
    assert len(http("GET", api + "/data/all")[1]) == len(good) + len(bad)


def hold_gap_lock(settings: Settings) -> Connection:
    """A second connection whose locking read (REPEATABLE READ) holds the gap every predicted
    row's index entry goes into: the job's write-back waits for it, as behind any long
    transaction of another client."""
    conn = db.connect(settings)
    with conn.cursor() as cur:
        cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        cur.execute("BEGIN")
        cur.execute("SELECT id FROM items FORCE INDEX (idx_items_state) WHERE state = 1 FOR UPDATE")
    return conn


def waiting_job_connection(settings: Settings, killed: Sequence[int] = ()) -> int:
    """The connection id of the job's transaction waiting for a lock, once there is one (not
    one of those already killed, which may linger for a moment)."""
    # While the gap lock is held every write-back waits, so a write-back in progress is one.
    sql = (
        "SELECT ID FROM information_schema.PROCESSLIST"
        " WHERE DB = %s AND INFO LIKE 'INSERT INTO items (id, `values`, prediction)%%'"
    )

    def waiting() -> list[int]:
        ids = [r[0] for r in query(settings, sql, (settings.mysql_database,))]
        return [i for i in ids if i not in killed]

    return wait_for(waiting, what="the job to wait for a lock")[0]


def retries(job: Process) -> list[dict[str, Any]]:
    return [m for m in log_lines(job) if m["message"] == "chunk failed; retrying"]


def finished_exactly_once(job: Process, settings: Settings, n: int) -> None:
    assert job.wait(timeout=120) == 0, read_log(job)
    assert [m for m in log_lines(job) if m["message"] == "batch end"][0]["rows"] == n
    assert len(predictions(settings)) == n


def test_lock_wait_timeout_is_retried(settings: Settings, processes: Processes) -> None:
    n = 30
    insert_rows(settings, [[5.1, 3.5, 1.4, 0.2]] * n)
    holder = hold_gap_lock(settings)
    job = processes.start(["job.py", "--once"], env_for(settings, CHUNK_SIZE=10), "job")
    wait_for(lambda: retries(job), timeout=60, what="a retry after the lock wait timeout")
    holder.rollback()
    holder.close()
    finished_exactly_once(job, settings, n)
    assert "1205" in retries(job)[0]["error"]


def test_deadlock_victim_chunk_is_retried(settings: Settings, processes: Processes) -> None:
    n = 30
    ids = insert_rows(settings, [[5.1, 3.5, 1.4, 0.2]] * n)
    query(settings, "CREATE TABLE ballast (n INT)")
    holder = hold_gap_lock(settings)
    with holder.cursor() as cur:
        # Weight: InnoDB rolls back the transaction that changed less, which must be the job.
        cur.executemany("INSERT INTO ballast VALUES (%s)", [(i,) for i in range(5000)])
    env = env_for(settings, CHUNK_SIZE=10, THREADS=1)
    job = processes.start(["job.py", "--once"], env, "job")
    waiting_job_connection(settings)  # the job holds rows 1-10 and waits for our gap
    with holder.cursor() as cur:
        cur.execute("SELECT id FROM items WHERE id = %s FOR UPDATE", (ids[0],))  # a cycle
    holder.rollback()
    holder.close()
    finished_exactly_once(job, settings, n)
    assert "1213" in retries(job)[0]["error"]


def test_killed_connection_is_retried(settings: Settings, processes: Processes) -> None:
    n = 30
    insert_rows(settings, [[5.1, 3.5, 1.4, 0.2]] * n)
    holder = hold_gap_lock(settings)
    job = processes.start(["job.py", "--once"], env_for(settings, CHUNK_SIZE=10), "job")
    query(settings, "KILL %s", (waiting_job_connection(settings),))
    holder.rollback()
    holder.close()
    finished_exactly_once(job, settings, n)
    assert any(code in retries(job)[0]["error"] for code in ("2013", "1927", "2006"))


def test_retries_are_bounded(settings: Settings, processes: Processes) -> None:
    insert_rows(settings, [[5.1, 3.5, 1.4, 0.2]] * 10)
    holder = hold_gap_lock(settings)
    env = env_for(settings, CHUNK_SIZE=10, THREADS=1)
    job = processes.start(["job.py", "--once"], env, "job")
    try:
        killed: list[int] = []
        for _ in range(CHUNK_ATTEMPTS):  # every attempt is killed
            killed.append(waiting_job_connection(settings, killed))
            query(settings, "KILL %s", (killed[-1],))
        assert job.wait(timeout=60) == 1
    finally:
        holder.rollback()
        holder.close()
    assert len(retries(job)) == CHUNK_ATTEMPTS - 1
    assert log_lines(job)[-1]["message"] == "batch failed"
    assert predictions(settings) == {}
