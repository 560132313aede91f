"""What Prometheus sees: the API's HTTP metrics and table gauges, and the job's counters.

The API: http_requests_total / http_request_duration_seconds by route template (HttpMetrics,
one pure ASGI middleware), rows registered, and, read from the database at each scrape, the rows
still waiting and how long the oldest has waited. Those gauges live in the API because the API
is always up and scrapeable; the job may be a one-shot `--once` that is gone between runs.
The job (loop mode): rows predicted and quarantined, chunk durations, retried chunks, runs, and
the time of the last successful run, on METRICS_PORT.
"""

import logging
import time
from collections.abc import Iterator

import db
import pymysql
from config import METRICS_QUERY_TIMEOUT_S, Settings
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from pymysql.connections import Connection
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("metrics")

# Seconds. A POST /data/list of 10,000 rows takes a few hundred ms; a single row a few ms.
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# Seconds. A chunk of 5,000 rows takes about 0.1-0.5 s; one waiting on a lock up to LOCK_WAIT_S.
CHUNK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# The method label takes these values or "other": a client must not be able to add series.
METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))


class HttpMetrics:
    """Counts and times every HTTP request by method, route template and status (pure ASGI).

    The label is the route's template ("/data/{item_id}"), never the raw path: the router leaves
    the endpoint it chose in the scope, and each endpoint has one template. A request answered
    before routing (the API key's 401: this middleware is outermost) is matched here as the
    router would; a path no route matches is "unmatched", so no client can create a series.
    """

    def __init__(self, app: ASGIApp, registry: CollectorRegistry, routes: list[Route]) -> None:
        self.app, self.routes = app, routes
        self.templates: dict[object, str] = {route.endpoint: route.path_format for route in routes}
        self.requests = Counter(
            "http_requests_total",
            "HTTP requests answered, by method, route template and status",
            ["method", "route", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "http_request_duration_seconds",
            "From a request's arrival to its last response byte, by method and route template",
            ["method", "route"],
            registry=registry,
            buckets=HTTP_BUCKETS,
        )

    def route_of(self, scope: Scope) -> str:
        template = self.templates.get(scope.get("endpoint"))
        if template is not None:
            return template
        # Not routed: a full match, else a partial one (a 405), as the router.
        partial: str | None = None
        for route in self.routes:
            match = route.matches(scope)[0]
            if match == Match.FULL:
                return route.path_format
            if match == Match.PARTIAL and partial is None:
                partial = route.path_format
        return partial or "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status, counted = 500, False  # 500: what the client gets if the app raises

        def count() -> None:
            nonlocal counted
            counted = True
            method = scope["method"] if scope["method"] in METHODS else "other"
            route = self.route_of(scope)
            self.duration.labels(method, route).observe(time.perf_counter() - started)
            self.requests.labels(method, route, str(status)).inc()

        async def send_and_count(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                count()  # before the last byte leaves: whoever has the answer finds it counted
            await send(message)

        try:
            await self.app(scope, receive, send_and_count)
        finally:
            if not counted:  # the app raised, or the client went away before the end
                count()


def bounded(conn: Connection, sql: str) -> str:
    """sql with a server-side time limit of METRICS_QUERY_TIMEOUT_S, in each server's dialect
    (the client's read timeout alone would leave the query running on the server)."""
    if "MariaDB" in conn.get_server_info():
        return f"SET STATEMENT max_statement_time = {METRICS_QUERY_TIMEOUT_S} FOR {sql}"
    ms = int(METRICS_QUERY_TIMEOUT_S * 1000)  # MySQL: an optimizer hint, SELECT only
    return sql.replace("SELECT", f"SELECT /*+ MAX_EXECUTION_TIME({ms}) */", 1)


WAITING = "SELECT COUNT(*), MIN(id) FROM items FORCE INDEX (idx_items_state) WHERE state = 0"
AGE = "SELECT TIMESTAMPDIFF(SECOND, created_datetime, NOW()) FROM items WHERE id = %s"


class TableGauges:
    """Read at each scrape from the table itself (a value kept in memory would be stale the
    moment a job committed a chunk): rows waiting for the job, and the age of the oldest.

    Both queries walk idx_items_state (the count is a range scan of the waiting rows only) on a
    connection of its own, each bounded by METRICS_QUERY_TIMEOUT_S on the client and on the
    server; when the database is slow or away the gauges are left out (`absent()` sees it) and
    the rest of /metrics is still served."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def describe(self) -> list[GaugeMetricFamily]:  # so registering never queries the database
        return [self.unpredicted(None), self.age(None)]

    @staticmethod
    def unpredicted(value: float | None) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "batch_rows_unpredicted",
            "Rows waiting for the job (state 0), counted in the database at scrape time",
            value=value,
        )

    @staticmethod
    def age(value: float | None) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "batch_oldest_unpredicted_age_seconds",
            "How long the oldest waiting row has waited (0: none waits), read at scrape time",
            value=value,
        )

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            conn = db.connect(self.settings, timeout=METRICS_QUERY_TIMEOUT_S)
            try:
                with conn.cursor() as cur:
                    cur.execute(bounded(conn, WAITING))
                    row = cur.fetchone()
                    assert row is not None  # COUNT(*) always answers one row
                    waiting, oldest = row
                    age = 0
                    if oldest is not None:
                        cur.execute(bounded(conn, AGE), (oldest,))
                        age = max(0, (cur.fetchone() or (0,))[0] or 0)
            finally:
                conn.close()
        except pymysql.err.MySQLError as exc:
            log.warning("table gauges unavailable", extra={"cause": repr(exc)})
            return
        yield self.unpredicted(waiting)
        yield self.age(age)


class ApiMetrics:
    """The API's own metrics, on the app's registry (HttpMetrics adds the HTTP ones)."""

    def __init__(self, registry: CollectorRegistry, settings: Settings) -> None:
        self.registered = Counter(
            "batch_rows_registered_total",
            "Rows stored by POST /data and /data/list, for the job to predict",
            registry=registry,
        )
        registry.register(TableGauges(settings))


class JobMetrics:
    """One job process's metrics: all its threads count into the same registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.predicted = Counter(
            "batch_rows_predicted_total",
            "Rows predicted and committed by this job process",
            registry=registry,
        )
        self.quarantined = Counter(
            "batch_rows_quarantined_total",
            "Rows the model could not score, marked and committed (never tried again)",
            registry=registry,
        )
        self.chunk_duration = Histogram(
            "batch_chunk_duration_seconds",
            "Claim, predict, write and commit of one chunk (committed chunks only)",
            registry=registry,
            buckets=CHUNK_BUCKETS,
        )
        self.retries = Counter(
            "batch_chunk_retries_total",
            "Chunks rolled back after a transient database error and tried again, by reason",
            ["reason"],
            registry=registry,
        )
        self.runs = Counter(
            "batch_runs_total",
            "Runs over every waiting row, by result (success or failure)",
            ["result"],
            registry=registry,
        )
        for result in ("success", "failure"):
            self.runs.labels(result)  # both series exist from the start, at 0
        self.last_success = Gauge(
            "batch_last_success_timestamp_seconds",
            "Unix time at which the last successful run ended (0: none yet)",
            registry=registry,
        )

    def chunk_done(self, rows: int, quarantined: int, seconds: float) -> None:
        self.predicted.inc(rows - quarantined)
        self.quarantined.inc(quarantined)
        self.chunk_duration.observe(seconds)
