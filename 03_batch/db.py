"""MySQL access for the API and the job: connections, the schema, and the API's queries.

Raw SQL with pymysql's %s placeholders (the driver escapes every value); no ORM.
"""

import json
import queue
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pymysql
from config import Settings
from pymysql.connections import Connection

SCHEMA = Path(__file__).resolve().parent / "schema.sql"

# Errors meaning "the database is not there", as opposed to a bug in our SQL.
UNAVAILABLE = (pymysql.err.OperationalError, pymysql.err.InterfaceError)


def connect(
    settings: Settings, database: bool = True, timeout: float = 60
) -> pymysql.connections.Connection:
    """timeout: seconds a query may wait for the server (connecting: at most 5)."""
    return pymysql.connect(
        host=settings.mysql_host,
        port=settings.mysql_port,
        user=settings.mysql_user,
        password=settings.mysql_password,
        database=settings.mysql_database if database else None,
        charset="utf8mb4",
        autocommit=False,
        connect_timeout=min(5, timeout),
        read_timeout=timeout,  # a hung server fails the request instead of holding it forever
        write_timeout=timeout,
    )


def apply_schema(settings: Settings) -> None:
    """Create the database and the table if they are missing (idempotent)."""
    conn = connect(settings, database=False)
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE IF NOT EXISTS `{settings.mysql_database}`")
            cur.execute(f"USE `{settings.mysql_database}`")
            cur.execute(SCHEMA.read_text())
        conn.commit()
    finally:
        conn.close()


def drop_database(settings: Settings) -> None:
    """For tests, the bench and the demo, which each work in a database of their own."""
    conn = connect(settings, database=False)
    try:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{settings.mysql_database}`")
    finally:
        conn.close()


class Pool:
    """A few reusable connections for the API's worker threads (a pymysql connection is not
    thread-safe, so each request borrows one for its duration)."""

    def __init__(self, settings: Settings, max_idle: int = 8) -> None:
        self._settings = settings
        self._idle: queue.LifoQueue[Connection] = queue.LifoQueue(max_idle)

    @contextmanager
    def connection(self) -> Iterator[pymysql.connections.Connection]:
        try:
            conn = self._idle.get_nowait()
            conn.ping(reconnect=True)  # the server may have closed an idle connection
        except queue.Empty:
            conn = connect(self._settings)
        try:
            yield conn
            conn.commit()
        except BaseException:
            conn.close()  # its state is unknown: never hand it to the next request
            raise
        try:
            self._idle.put_nowait(conn)
        except queue.Full:
            conn.close()

    def close(self) -> None:
        while not self._idle.empty():
            self._idle.get_nowait().close()


COLUMNS = "id, `values`, prediction, created_datetime"


def _item(row: tuple[Any, ...]) -> dict[str, Any]:
    item_id, values, prediction, created = row
    return {
        "id": item_id,
        "values": json.loads(values),
        "prediction": None if prediction is None else json.loads(prediction),
        "created_datetime": created.isoformat(),
    }


def insert_items(conn: Connection, values_list: list[list[float]]) -> list[dict[str, Any]]:
    """Insert rows in one statement and one transaction; return them as stored."""
    with conn.cursor() as cur:
        placeholders = ",".join(["(%s)"] * len(values_list))
        cur.execute(
            f"INSERT INTO items (`values`) VALUES {placeholders}",
            [json.dumps(v) for v in values_list],
        )
        # One multi-row INSERT gets consecutive ids (InnoDB reserves them at once for a
        # "simple insert"); lastrowid is the first of them.
        first = cur.lastrowid
        cur.execute(
            f"SELECT {COLUMNS} FROM items WHERE id BETWEEN %s AND %s ORDER BY id",
            (first, first + len(values_list) - 1),
        )
        rows = cur.fetchall()
    if len(rows) != len(values_list):
        raise RuntimeError("inserted ids are not consecutive")
    return [_item(r) for r in rows]


def get_item(conn: Connection, item_id: int) -> dict[str, Any] | None:
    with conn.cursor() as cur:
        cur.execute(f"SELECT {COLUMNS} FROM items WHERE id = %s", (item_id,))
        row = cur.fetchone()
    return None if row is None else _item(row)


# Which rows each listing shows. The predicted/unpredicted filters walk idx_items_state
# (quarantined rows, state 2, are in neither: only in "all").
FILTERS = {
    "all": "",
    "predicted": "FORCE INDEX (idx_items_state) WHERE state = 1 AND",
    "unpredicted": "FORCE INDEX (idx_items_state) WHERE state = 0 AND",
}


def list_items(conn: Connection, which: str, after_id: int, limit: int) -> list[dict[str, Any]]:
    """One page in id order; the next page starts after the last id of this one."""
    where = FILTERS[which] or "WHERE"
    with conn.cursor() as cur:
        cur.execute(
            f"SELECT {COLUMNS} FROM items {where} id > %s ORDER BY id LIMIT %s",
            (after_id, limit),
        )
        return [_item(r) for r in cur.fetchall()]
