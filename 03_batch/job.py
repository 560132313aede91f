"""The batch job: predict every row that has no prediction yet, then exit (--once) or repeat.

Per chunk, in one transaction on one connection:
  claim   SELECT ... FOR UPDATE SKIP LOCKED   rows locked by another job are skipped, not waited for
  predict one onnxruntime call for the whole chunk
  write   one multi-row INSERT ... ON DUPLICATE KEY UPDATE
  commit  (any failure rolls the whole chunk back; its rows stay unpredicted for the next run)
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
from concurrent.futures import ThreadPoolExecutor

import db
import jsonlog
import numpy as np
import pymysql
from config import Settings
from model import IrisModel

log = logging.getLogger("job")

# The index is forced: for "predicted = 0 AND id > ?" MariaDB was seen choosing a poor plan on
# every chunk until it was. READ COMMITTED (set per connection below)
# keeps the locking read from taking gap locks that would block the API's inserts.
CLAIM = (
    "SELECT id, `values` FROM items FORCE INDEX (idx_items_predicted)"
    " WHERE predicted = 0 AND id > %s ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED"
)
COUNT = "SELECT COUNT(*) FROM items FORCE INDEX (idx_items_predicted) WHERE predicted = 0"
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


class Claims:
    """The id after which this process claims next, shared by its threads, so they take
    consecutive chunks instead of stepping over each other's locked rows."""

    def __init__(self) -> None:
        self._after = 0
        self._lock = threading.Lock()

    def claim(self, cur, size: int) -> list[tuple]:
        with self._lock:
            cur.execute(CLAIM, (self._after, size))
            rows = cur.fetchall()
            if rows:
                self._after = rows[-1][0]
            return rows


def predict_chunk(model: IrisModel, rows: list[tuple]) -> str:
    """Claimed (id, values) rows -> the VALUES list of the write-back statement."""
    ids = [r[0] for r in rows]
    # All values parsed in one call, not one json.loads per row.
    x = np.array(json.loads("[" + ",".join(r[1] for r in rows) + "]"), dtype=np.float32)
    proba = model.predict_proba(x)
    if not np.isfinite(proba).all():
        raise ValueError("model returned a non-finite probability")
    p0, p1, p2 = proba.T.tolist()
    return ",".join(map(ROW.__mod__, zip(ids, p0, p1, p2, strict=True)))


def worker(settings: Settings, model: IrisModel, claims: Claims, stop: threading.Event) -> int:
    """Claim, predict, write and commit chunks until none is left; returns rows predicted."""
    done = 0
    conn = db.connect(settings)
    try:
        with conn.cursor() as cur:
            cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    rows = claims.claim(cur, settings.chunk_size)
                    if not rows:
                        conn.rollback()
                        return done
                    cur.execute(WRITE.format(rows=predict_chunk(model, rows)))
                    conn.commit()
                except BaseException:
                    stop.set()  # the other threads finish their chunk and stop
                    # Undo the whole chunk. If the connection itself is gone, the server has
                    # already rolled it back and released the row locks.
                    with contextlib.suppress(pymysql.err.Error):
                        conn.rollback()
                    raise
                done += len(rows)
                log.info(
                    "chunk",
                    extra={
                        "rows": len(rows),
                        "first_id": rows[0][0],
                        "last_id": rows[-1][0],
                        "seconds": round(time.perf_counter() - started, 3),
                    },
                )
    finally:
        conn.close()
    return done


def run(settings: Settings, model: IrisModel) -> int:
    """One pass over every unpredicted row; returns the number of rows predicted."""
    started = time.perf_counter()
    log.info("batch start", extra={"threads": settings.threads, "chunk_size": settings.chunk_size})
    conn = db.connect(settings)
    try:
        with conn.cursor() as cur:
            cur.execute(COUNT)
            log.info("rows found", extra={"rows": cur.fetchone()[0]})
    finally:
        conn.close()
    claims, stop = Claims(), threading.Event()
    with ThreadPoolExecutor(settings.threads, thread_name_prefix="chunk") as pool:
        futures = [
            pool.submit(worker, settings, model, claims, stop) for _ in range(settings.threads)
        ]
    rows = sum(f.result() for f in futures)  # re-raises the first failure, if any
    seconds = time.perf_counter() - started
    log.info(
        "batch end",
        extra={
            "rows": rows,
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
    if args.once:
        try:
            run(settings, model)
        except Exception:
            log.exception("batch failed")
            return 1
        return 0

    # Loop mode: wait one interval, run, repeat. SIGTERM (docker stop) or Ctrl-C ends the wait
    # at once; a run under way is finished first.
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    log.info("waiting for the first batch", extra={"seconds": settings.interval})
    while not stopping.wait(settings.interval):
        try:
            run(settings, model)
        except Exception:
            log.exception("batch failed; retrying at the next interval")
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
