"""The batch job: predict every row that has no prediction yet, then exit (--once) or repeat.

Per chunk, in one transaction on one connection:
  claim   SELECT ... FOR UPDATE SKIP LOCKED   rows locked by another job are skipped, not waited for
  predict one onnxruntime call for the whole chunk
  write   one multi-row INSERT ... ON DUPLICATE KEY UPDATE
  commit  (any failure rolls the whole chunk back; its rows stay unpredicted for the next run)
A deadlock, lock wait timeout or lost connection rolls the chunk back and tries it again (a few
times); a row that cannot be scored is quarantined (marked, logged) instead of failing its chunk.
Several threads do this at once, and several job processes can run side by side: a row is
locked by exactly one of them until its prediction is committed, so it is predicted exactly once.
"""

import argparse
import contextlib
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import db
import jsonlog
import numpy as np
import pymysql
from config import CHUNK_ATTEMPTS, LOCK_WAIT_S, RETRY_DELAY_S, Settings
from metrics import JobMetrics
from model import IrisModel
from prometheus_client import CollectorRegistry, disable_created_metrics, start_http_server
from pymysql.connections import Connection
from pymysql.cursors import Cursor

log = logging.getLogger("job")

N_FEATURES = 4
# The index is forced: for "state = 0 AND id > ?" MariaDB was seen choosing a poor plan on
# every chunk until it was. READ COMMITTED (set per connection below)
# keeps the locking read from taking gap locks that would block the API's inserts.
CLAIM = (
    "SELECT id, `values` FROM items FORCE INDEX (idx_items_state)"
    " WHERE state = 0 AND id > %s ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED"
)
COUNT = "SELECT COUNT(*) FROM items FORCE INDEX (idx_items_state) WHERE state = 0"
# Every id exists and is locked by us, so each row takes the UPDATE branch. `values` is listed
# only because the INSERT branch needs the NOT NULL column; it is never written. (VALUES() in
# the UPDATE clause is deprecated, not removed, in MySQL 8.0; MariaDB has no newer spelling.)
WRITE = (
    "INSERT INTO items (id, `values`, prediction) VALUES {rows}"
    " ON DUPLICATE KEY UPDATE prediction = VALUES(prediction)"
)
# Only integers from the database and floats from the model go in here, so no escaping is
# needed; one template for the chunk is much faster than json.dumps and escaping per row.
ROW = '(%d,\'[]\',\'{"0": %.6g, "1": %.6g, "2": %.6g}\')'
QUARANTINE = "UPDATE items SET error = %s WHERE id = %s"

# Errors after which the same chunk may well succeed: the transaction was chosen as a deadlock
# victim or waited too long for a lock, or the connection was lost (killed, server restarted).
# The names are the `reason` label of batch_chunk_retries_total.
TRANSIENT = {
    1205: "lock_wait_timeout",
    1213: "deadlock",
    1927: "connection_killed",  # MariaDB
    2003: "cannot_connect",
    2006: "server_gone_away",
    2013: "lost_connection",
}


def transient_reason(exc: BaseException) -> str | None:
    """Why a chunk may well succeed if tried again, or None: it would fail again."""
    if isinstance(exc, pymysql.err.InterfaceError):  # the connection was already closed
        return "connection_closed"
    if isinstance(exc, pymysql.err.OperationalError):
        return TRANSIENT.get(exc.args[0])
    return None


class Claims:
    """The id after which this process claims next, shared by its threads, so they take
    consecutive chunks instead of stepping over each other's locked rows."""

    def __init__(self) -> None:
        self._after = 0
        self._lock = threading.Lock()

    def claim(self, cur: Cursor, size: int) -> tuple[int, Sequence[tuple[Any, ...]]]:
        """Lock the next chunk; returns the id it started after, and its (id, values) rows."""
        with self._lock:
            after = self._after
            cur.execute(CLAIM, (after, size))
            rows = cur.fetchall()
            if rows:
                self._after = rows[-1][0]
            return after, rows

    def give_back(self, after: int) -> None:
        """A chunk that started after `after` was rolled back: its rows are claimable again."""
        with self._lock:
            self._after = min(self._after, after)


def parse_row(values: str) -> list:
    """One row's values, or NaNs when they are not a list of 4 numbers (then quarantined)."""
    try:
        parsed = json.loads(values)
        row = np.array(parsed, dtype=np.float32)
    except (ValueError, TypeError):
        return [np.nan] * N_FEATURES
    return parsed if row.shape == (N_FEATURES,) else [np.nan] * N_FEATURES


def predict_chunk(
    model: IrisModel, rows: Sequence[tuple[Any, ...]]
) -> tuple[str, list[tuple[str, int]]]:
    """Claimed (id, values) rows -> the VALUES list of the write-back statement, and the
    (reason, id) of each row that cannot be scored."""
    ids = np.array([r[0] for r in rows])
    with np.errstate(over="ignore", invalid="ignore"):  # beyond float32 becomes inf: refused
        try:  # all values parsed in one call, not one json.loads per row
            x = np.array(json.loads("[" + ",".join(r[1] for r in rows) + "]"), dtype=np.float32)
            if x.shape != (len(rows), N_FEATURES):
                raise ValueError(x.shape)
        except (ValueError, TypeError):  # some row is not 4 numbers: look at each one
            x = np.array([parse_row(r[1]) for r in rows], dtype=np.float32)
    good_input = np.isfinite(x).all(axis=1)  # the model scores NaN rows too: check first
    proba = model.predict_proba(x)
    good = good_input & np.isfinite(proba).all(axis=1)
    bad = [("values are not 4 finite float32 numbers", int(i)) for i in ids[~good_input]]
    bad += [
        ("the model returned a non-finite probability", int(i)) for i in ids[~good & good_input]
    ]
    p0, p1, p2 = proba[good].T.tolist()
    written = ",".join(map(ROW.__mod__, zip(ids[good].tolist(), p0, p1, p2, strict=True)))
    return written, bad


def open_connection(settings: Settings) -> Connection:
    conn = db.connect(settings)
    with conn.cursor() as cur:
        cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
        # A chunk blocked by someone else's lock fails (1205) and is retried, instead of
        # waiting InnoDB's default 50 s.
        cur.execute("SET SESSION innodb_lock_wait_timeout = %s", (LOCK_WAIT_S,))
    return conn


def do_chunk(
    conn: Connection, model: IrisModel, claims: Claims, size: int, metrics: JobMetrics
) -> tuple[int, int]:
    """Claim, predict, write and commit one chunk; returns its rows (0: nothing left) and how
    many of them were quarantined."""
    started = time.perf_counter()
    after = None
    try:
        with conn.cursor() as cur:
            after, rows = claims.claim(cur, size)
            if not rows:
                conn.rollback()
                return 0, 0
            written, bad = predict_chunk(model, rows)
            if written:
                cur.execute(WRITE.format(rows=written))
            if bad:
                cur.executemany(QUARANTINE, bad)
        conn.commit()
    except BaseException:
        # Undo the whole chunk. If the connection itself is gone, the server has already
        # rolled it back and released the row locks.
        with contextlib.suppress(pymysql.err.Error):
            conn.rollback()
        if after is not None:
            claims.give_back(after)
        raise
    seconds = time.perf_counter() - started
    metrics.chunk_done(len(rows), len(bad), seconds)
    for reason, item_id in bad:  # marked in the table: never claimed again
        log.warning("row quarantined", extra={"id": item_id, "reason": reason})
    log.info(
        "chunk",
        extra={
            "rows": len(rows),
            "first_id": rows[0][0],
            "last_id": rows[-1][0],
            "quarantined": len(bad),
            "seconds": round(seconds, 3),
        },
    )
    return len(rows), len(bad)


def worker(
    settings: Settings,
    model: IrisModel,
    claims: Claims,
    stop: threading.Event,
    metrics: JobMetrics,
) -> tuple[int, int]:
    """Do chunks until none is left; returns rows done and rows quarantined. A transient
    database error rolls the chunk back and tries again (at most CHUNK_ATTEMPTS times in a row,
    with a growing delay); any other error, or the last attempt's, stops every thread and fails
    the run."""
    done, quarantined, failures, conn = 0, 0, 0, None
    try:
        while not stop.is_set():
            try:
                if conn is None:
                    conn = open_connection(settings)
                rows, bad = do_chunk(conn, model, claims, settings.chunk_size, metrics)
            except Exception as exc:
                failures += 1
                reason = transient_reason(exc)
                if reason is None or failures >= CHUNK_ATTEMPTS:
                    stop.set()  # the other threads finish their chunk and stop
                    raise
                metrics.retries.labels(reason).inc()
                delay = RETRY_DELAY_S * 2 ** (failures - 1)
                log.warning(
                    "chunk failed; retrying",
                    extra={"error": repr(exc), "attempt": failures, "delay_s": delay},
                )
                if conn is not None:
                    with contextlib.suppress(pymysql.err.Error):
                        conn.close()  # a fresh connection for the retry: this one may be dead
                conn = None
                time.sleep(delay)
                continue
            if not rows:
                break
            done, quarantined, failures = done + rows, quarantined + bad, 0
    finally:
        if conn is not None:
            with contextlib.suppress(pymysql.err.Error):
                conn.close()
    return done, quarantined


def run(settings: Settings, model: IrisModel, metrics: JobMetrics) -> int:
    """One pass over every waiting row; returns the number of rows done (predicted or
    quarantined)."""
    try:
        rows = run_once(settings, model, metrics)
    except Exception:
        metrics.runs.labels("failure").inc()
        raise
    metrics.runs.labels("success").inc()
    metrics.last_success.set_to_current_time()
    return rows


def run_once(settings: Settings, model: IrisModel, metrics: JobMetrics) -> int:
    started = time.perf_counter()
    log.info("batch start", extra={"threads": settings.threads, "chunk_size": settings.chunk_size})
    conn = db.connect(settings)
    try:
        with conn.cursor() as cur:
            cur.execute(COUNT)
            row = cur.fetchone()
            assert row is not None  # COUNT(*) always answers one row
            log.info("rows found", extra={"rows": row[0]})
    finally:
        conn.close()
    claims, stop = Claims(), threading.Event()
    with ThreadPoolExecutor(settings.threads, thread_name_prefix="chunk") as pool:
        futures = [
            pool.submit(worker, settings, model, claims, stop, metrics)
            for _ in range(settings.threads)
        ]
    results = [f.result() for f in futures]  # re-raises the first failure, if any
    rows, quarantined = sum(r[0] for r in results), sum(r[1] for r in results)
    seconds = time.perf_counter() - started
    log.info(
        "batch end",
        extra={
            "rows": rows,
            "quarantined": quarantined,
            "seconds": round(seconds, 3),
            "rows_per_s": round(rows / seconds) if seconds else 0,
        },
    )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true", help="one run now, then exit")
    args = parser.parse_args()
    jsonlog.setup()
    settings = Settings.from_env()
    model = IrisModel(settings.model_filepath, settings.label_filepath)
    disable_created_metrics()  # no *_created series: nothing reads them
    metrics = JobMetrics(CollectorRegistry())  # one registry for every thread of this process
    if args.once:
        # No metrics server: the process is gone before anyone could scrape it. The API's
        # table gauges still show the rows waiting and the oldest one's age (see README).
        try:
            run(settings, model, metrics)
        except Exception:
            log.exception("batch failed")
            return 1
        return 0

    # Loop mode: wait one interval, run, repeat. SIGTERM (docker stop) or Ctrl-C ends the wait
    # at once; a run under way is finished first.
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    if settings.metrics_port:
        start_http_server(settings.metrics_port, settings.host, registry=metrics.registry)
        log.info("metrics", extra={"port": settings.metrics_port})
    log.info("waiting for the first batch", extra={"seconds": settings.interval})
    while not stopping.wait(settings.interval):
        try:
            run(settings, model, metrics)
        except Exception:
            log.exception("batch failed; retrying at the next interval")
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
