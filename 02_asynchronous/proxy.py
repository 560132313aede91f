"""The HTTP side: accept a job, answer with its id at once, report on it later.

    python proxy.py             # Starlette on HOST:PORT (127.0.0.1:8000)

The proxy never runs the model. POST /predict validates the rows, writes the job to Redis in
one atomic step and returns; a worker (worker.py) does the inference in the background.
GET /metrics: Prometheus text, with the queue's length read from Redis at each scrape.
"""

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import uvicorn
from config import (
    BACKLOG,
    HEADER_TIMEOUT,
    KEEP_ALIVE_TIMEOUT,
    LIMIT_CONCURRENCY,
    MAX_HEADER_BYTES,
    REDIS_MAX_CONNECTIONS,
    Settings,
    log_config,
)
from jobs import (
    FEATURES,
    MAX_RECENT,
    MAX_ROWS,
    IdCollision,
    InvalidInput,
    JobStore,
    QueueFull,
    validate_rows,
)
from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route
from starlette.schemas import SchemaGenerator
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("proxy")

SAMPLE = [[5.1, 3.5, 1.4, 0.2]]  # the first Iris row, a setosa: for POST /predict/test
PRIORITIES = ("normal", "high")
RETRY_AFTER = 5  # seconds a client is told to wait when the queue is full
# Need no API key: probes, and the API's description. Not /metrics: it tells anyone the traffic;
# Prometheus sends the key (`authorization` in its scrape config).
OPEN_PATHS = ("/health", "/ready", "/openapi.json")
METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}  # others: "other"

ROW = {
    "type": "array",
    "minItems": FEATURES,
    "maxItems": FEATURES,
    "items": {
        "type": "number",
        "minimum": 0,
        "exclusiveMinimum": True,
        "maximum": 10,
        "exclusiveMaximum": True,
    },
}
SCHEMAS = SchemaGenerator(
    {
        "openapi": "3.0.3",
        "info": {"title": "02 asynchronous: Iris jobs over a Redis queue", "version": "1"},
        "components": {
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["detail"],
                    "properties": {"detail": {"type": "string"}},
                },
                "Submit": {
                    "type": "object",
                    "required": ["data"],
                    "properties": {
                        "data": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": MAX_ROWS,
                            "items": ROW,
                        },
                        "priority": {"type": "string", "enum": list(PRIORITIES)},
                    },
                },
                "Accepted": {
                    "type": "object",
                    "required": ["job_id"],
                    "properties": {"job_id": {"type": "string"}},
                },
                "Status": {
                    "type": "string",
                    "enum": ["pending", "processing", "completed", "failed", "cancelled"],
                },
                "Job": {
                    "type": "object",
                    "required": ["job_id", "status"],
                    "properties": {
                        "job_id": {"type": "string"},
                        "status": {"$ref": "#/components/schemas/Status"},
                        "error": {"type": "string"},
                        "result": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["prediction", "class_name", "probabilities"],
                                "properties": {
                                    "prediction": {"type": "integer"},
                                    "class_name": {"type": "string"},
                                    "probabilities": {"type": "array", "items": {"type": "number"}},
                                },
                            },
                        },
                    },
                },
                "Page": {
                    "type": "object",
                    "required": ["total", "offset", "limit", "jobs"],
                    "properties": {
                        "total": {"type": "integer"},
                        "offset": {"type": "integer"},
                        "limit": {"type": "integer"},
                        "jobs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["job_id", "status", "submitted_at"],
                                "properties": {
                                    "job_id": {"type": "string"},
                                    "status": {"$ref": "#/components/schemas/Status"},
                                    "submitted_at": {"type": "string"},
                                },
                            },
                        },
                    },
                },
                "Health": {
                    "type": "object",
                    "required": ["status", "components"],
                    "properties": {
                        "status": {"type": "string", "enum": ["healthy", "unhealthy"]},
                        "components": {
                            "type": "object",
                            "properties": {
                                "redis": {"type": "string"},
                                "tensorflow_serving": {"type": "string"},
                            },
                        },
                    },
                },
            },
        },
    }
)


class Metrics:
    """The proxy's metrics, in a registry of the app's own (so one process can hold several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "http_requests_total",
            "HTTP requests answered",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "http_request_duration_seconds",
            "Time from the request's arrival to the end of its answer",
            ["method", "route"],
            registry=self.registry,
        )
        self.submitted = Counter(
            "jobs_submitted_total", "Jobs queued", ["priority"], registry=self.registry
        )
        for priority in PRIORITIES:
            self.submitted.labels(priority)
        self.queue = Gauge(
            "job_queue_length",
            "Jobs waiting in the queue (waiting) or held by a worker (claimed), read at scrape",
            ["state"],
            registry=self.registry,
        )


class HttpMetrics:
    """Pure ASGI middleware: counts and times every request by its route's template
    (`/job/{job_id}`, never the id itself); a path no route matches is "unmatched"."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: list[Route]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    def route(self, scope: Scope) -> str:
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is not Match.NONE:  # PARTIAL: the path's route, another method (405)
                return route.path
        return "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status, counted = time.perf_counter(), 500, False  # 500: failed before answering
        method = scope["method"] if scope["method"] in METHODS else "other"

        def count() -> None:
            nonlocal counted
            if not counted:
                counted, route = True, self.route(scope)
                self.metrics.requests.labels(method, route, str(status)).inc()
                self.metrics.duration.labels(method, route).observe(time.perf_counter() - started)

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                count()  # before the last bytes go out: whoever got the answer sees it counted
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            count()


def create_app(settings: Settings) -> ASGIApp:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # One pool for the whole app. Short timeouts and a single retry (for a connection that
        # went stale while Redis restarted): when Redis is down or hangs we answer 503 within
        # about 2 s. The retry is safe for SUBMIT too: it finds its own job (jobs.py).
        redis = Redis.from_url(
            settings.redis_url,
            password=settings.redis_password,
            decode_responses=True,
            socket_connect_timeout=0.5,
            socket_timeout=1.0,
            retry=Retry(NoBackoff(), 1),
            max_connections=REDIS_MAX_CONNECTIONS,
        )
        app.state.store = JobStore(
            redis, settings.queue, settings.job_ttl, max_queue=settings.max_queue
        )
        app.state.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2))
        app.state.tf_url = (
            f"http://{settings.tf_serving_host}:{settings.tf_serving_rest_port}"
            f"/v1/models/{settings.model_name}"
        )
        yield
        await app.state.http.close()
        await redis.aclose()

    routes = [
        Route("/predict", predict, methods=["POST"]),
        Route("/predict/test", predict_test, methods=["POST"]),
        Route("/job/{job_id}", get_job, methods=["GET"]),
        Route("/job/{job_id}", cancel_job, methods=["DELETE"]),
        Route("/jobs", list_jobs, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/metadata", metadata, methods=["GET"]),
        # Neither is part of the API the document describes (nor fuzzed as such).
        Route("/openapi.json", openapi, methods=["GET"], include_in_schema=False),
        Route("/metrics", metrics, methods=["GET"], include_in_schema=False),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={
            HTTPException: http_error,
            InvalidInput: invalid_input,
            QueueFull: queue_full,
            RedisError: redis_down,
            IdCollision: no_free_id,
        },
        lifespan=lifespan,
        max_body_size=1 << 20,  # 1,000 rows of 4 numbers fit many times over
    )
    app.state.metrics = measured = Metrics()
    served: ASGIApp = RequireApiKey(app, settings.api_key) if settings.api_key else app
    if not settings.metrics:  # METRICS=0: without the middleware, to measure what it costs
        return served
    return HttpMetrics(served, measured, routes)  # outermost: a 401 is counted too


class RequireApiKey:
    """ASGI wrapper: every path but OPEN_PATHS needs `Authorization: Bearer <API_KEY>`."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self.expected = f"Bearer {key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):  # constant time: no timing hints
                response = JSONResponse(
                    {"detail": "missing or wrong API key"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BoundedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with the two bounds it lacks: a request's line and headers
    must arrive within HEADER_TIMEOUT seconds (else the connection is closed) and fit in
    MAX_HEADER_BYTES (else 400). Without them one client can hold a connection forever by
    sending a byte now and then, or make the server buffer gigabytes of headers."""

    _deadline = None
    _header_bytes = 0

    def _start_clock(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(HEADER_TIMEOUT, self.transport.close)

    def _stop_clock(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _count(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > MAX_HEADER_BYTES:
            raise ValueError("headers too large")  # httptools turns it into a parser error: 400

    def connection_made(  # type: ignore[override]  # uvicorn's own narrowing of asyncio's type
        self, transport: asyncio.Transport
    ) -> None:
        super().connection_made(transport)
        self._start_clock()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        self._start_clock()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._stop_clock()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_clock()
        super().connection_lost(exc)


async def predict(request: Request) -> JSONResponse:
    """
    summary: Queue a job; answers with its id at once
    requestBody:
      required: true
      content:
        application/json:
          schema: {$ref: "#/components/schemas/Submit"}
    responses:
      202:
        description: queued; poll GET /job/{job_id}
        content: {application/json: {schema: {$ref: "#/components/schemas/Accepted"}}}
      401: {description: API key missing or wrong (only when API_KEY is set)}
      413: {description: body over 1 MiB}
      422:
        description: invalid input; nothing queued
        content: {application/json: {schema: {$ref: "#/components/schemas/Error"}}}
      429:
        description: the queue is full; retry after Retry-After seconds
        content: {application/json: {schema: {$ref: "#/components/schemas/Error"}}}
      503:
        description: Redis unavailable
        content: {application/json: {schema: {$ref: "#/components/schemas/Error"}}}
    """
    try:
        body = await request.json()
    except json.JSONDecodeError as e:
        raise InvalidInput(f"body is not valid JSON: {e}") from e
    except (ValueError, RecursionError) as e:  # bad UTF-8, a 4,300+ digit integer, deep nesting
        raise InvalidInput("body is not valid JSON: bad encoding, number or nesting") from e
    if not isinstance(body, dict) or "data" not in body:
        raise InvalidInput('body must be a JSON object with a "data" key')
    # Inline on the event loop: ~5 us for one row, ~1.5 ms for the largest body (1,000 rows).
    # A thread would not check Python faster (GIL); it would only add a hop to every request.
    rows = validate_rows(body["data"])
    priority = body.get("priority", "normal")
    if priority not in PRIORITIES:
        raise InvalidInput(f"priority must be one of {list(PRIORITIES)}")
    return await accepted(request, rows, priority)


async def predict_test(request: Request) -> JSONResponse:
    """
    summary: Queue the fixed sample [[5.1, 3.5, 1.4, 0.2]]
    responses:
      202:
        description: queued
        content: {application/json: {schema: {$ref: "#/components/schemas/Accepted"}}}
      401: {description: API key missing or wrong (only when API_KEY is set)}
      429:
        description: the queue is full
        content: {application/json: {schema: {$ref: "#/components/schemas/Error"}}}
      503:
        description: Redis unavailable
        content: {application/json: {schema: {$ref: "#/components/schemas/Error"}}}
    """
    return await accepted(request, SAMPLE, "normal")


async def accepted(request: Request, rows: list[list[float]], priority: str) -> JSONResponse:
    job_id = await request.app.state.store.submit(rows, priority)
    request.app.state.metrics.submitted.labels(priority).inc()
    # 202: accepted, not done yet; Location tells where the answer will be.
    return JSONResponse({"job_id": job_id}, status_code=202, headers={"Location": f"/job/{job_id}"})


async def get_job(request: Request) -> JSONResponse:
    """
    summary: A job's status; its result once completed, its error once failed
    parameters:
      - {name: job_id, in: path, required: true, schema: {type: string}}
    responses:
      200:
        description: the job
        content: {application/json: {schema: {$ref: "#/components/schemas/Job"}}}
      401: {description: API key missing or wrong (only when API_KEY is set)}
      404:
        description: no such job (or expired)
        content: {application/json: {schema: {$ref: "#/components/schemas/Error"}}}
      503:
        description: Redis unavailable
        content: {application/json: {schema: {$ref: "#/components/schemas/Error"}}}
    """
    job_id = request.path_params["job_id"]
    job = await request.app.state.store.get(job_id)
    if job is None:
        raise HTTPException(404, f"job {job_id} not found")
    return JSONResponse(job)


async def cancel_job(request: Request) -> JSONResponse:
    """
    summary: Cancel a pending job
    parameters:
      - {name: job_id, in: path, required: true, schema: {type: string}}
    responses:
      200:
        description: cancelled
        content: {application/json: {schema: {$ref: "#/components/schemas/Job"}}}
      401: {description: API key missing or wrong (only when API_KEY is set)}
      404:
        description: no such job
        content: {application/json: {schema: {$ref: "#/components/schemas/Error"}}}
      409:
        description: a worker has started it (or it is over)
        content: {application/json: {schema: {$ref: "#/components/schemas/Error"}}}
      503:
        description: Redis unavailable
        content: {application/json: {schema: {$ref: "#/components/schemas/Error"}}}
    """
    job_id = request.path_params["job_id"]
    status = await request.app.state.store.cancel(job_id)
    if status is None:
        raise HTTPException(404, f"job {job_id} not found")
    if status != "cancelled":
        raise HTTPException(409, f"job {job_id} is {status}; only pending jobs can be cancelled")
    return JSONResponse({"job_id": job_id, "status": status})


async def list_jobs(request: Request) -> JSONResponse:
    """
    summary: Recent jobs, newest first
    parameters:
      - {name: offset, in: query, schema: {type: integer, minimum: 0, maximum: 10000, default: 0}}
      - {name: limit, in: query, schema: {type: integer, minimum: 1, maximum: 100, default: 20}}
    responses:
      200:
        description: one page
        content: {application/json: {schema: {$ref: "#/components/schemas/Page"}}}
      401: {description: API key missing or wrong (only when API_KEY is set)}
      422:
        description: bad offset or limit
        content: {application/json: {schema: {$ref: "#/components/schemas/Error"}}}
      503:
        description: Redis unavailable
        content: {application/json: {schema: {$ref: "#/components/schemas/Error"}}}
    """
    try:
        offset = int(request.query_params.get("offset", "0"))
        limit = int(request.query_params.get("limit", "20"))
    except ValueError as e:
        raise InvalidInput("offset and limit must be integers") from e
    # jobs:recent holds MAX_RECENT ids; a larger offset would only reach Redis's own range error.
    if not 0 <= offset <= MAX_RECENT or not 1 <= limit <= 100:
        raise InvalidInput(f"offset must be between 0 and {MAX_RECENT}, limit between 1 and 100")
    total, jobs = await request.app.state.store.recent_jobs(offset, limit)
    return JSONResponse({"total": total, "offset": offset, "limit": limit, "jobs": jobs})


async def redis_component(request: Request) -> str:
    try:
        await request.app.state.store.redis.ping()
    except RedisError as e:
        log.warning("health: redis unavailable", extra={"error": str(e)})
        return "error: unavailable"
    return "ok"


async def tf_serving_component(request: Request) -> str:
    try:
        async with request.app.state.http.get(request.app.state.tf_url) as response:
            states = [v["state"] for v in (await response.json())["model_version_status"]]
    except (aiohttp.ClientError, TimeoutError, KeyError, TypeError, ValueError) as e:
        log.warning("health: tensorflow serving unavailable", extra={"error": repr(e)})
        return "error: unavailable"
    return "ok" if "AVAILABLE" in states else f"error: model state {states}"


def health_answer(components: dict[str, str]) -> JSONResponse:
    healthy = all(v == "ok" for v in components.values())
    return JSONResponse(
        {"status": "healthy" if healthy else "unhealthy", "components": components},
        status_code=200 if healthy else 503,
    )


async def health(request: Request) -> JSONResponse:
    """
    summary: Redis and TensorFlow Serving reachable, the model AVAILABLE
    responses:
      200:
        description: healthy
        content: {application/json: {schema: {$ref: "#/components/schemas/Health"}}}
      503:
        description: a component is failing; it is named
        content: {application/json: {schema: {$ref: "#/components/schemas/Health"}}}
    """
    return health_answer(
        {
            "redis": await redis_component(request),
            "tensorflow_serving": await tf_serving_component(request),
        }
    )


async def ready(request: Request) -> JSONResponse:
    """
    summary: this proxy can accept jobs (Redis answers); the readiness probe
    description: >
      A submit needs Redis only. While TensorFlow Serving is down, jobs wait in the queue and
      complete when it returns, so an outage of it must not take the proxies out of service.
    responses:
      200:
        description: ready
        content: {application/json: {schema: {$ref: "#/components/schemas/Health"}}}
      503:
        description: Redis is not answering
        content: {application/json: {schema: {$ref: "#/components/schemas/Health"}}}
    """
    return health_answer({"redis": await redis_component(request)})


async def metadata(request: Request) -> JSONResponse:
    """
    summary: TensorFlow Serving's GET /v1/models/{model}/metadata, as is
    responses:
      200:
        description: the model's signature
        content: {application/json: {schema: {type: object}}}
      401: {description: API key missing or wrong (only when API_KEY is set)}
      503:
        description: TensorFlow Serving unavailable
        content: {application/json: {schema: {$ref: "#/components/schemas/Error"}}}
    """
    try:
        async with request.app.state.http.get(f"{request.app.state.tf_url}/metadata") as response:
            response.raise_for_status()
            return JSONResponse(await response.json())
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        log.warning("metadata: tensorflow serving unavailable", extra={"error": repr(e)})
        raise HTTPException(503, "tensorflow serving unavailable") from e


async def openapi(request: Request) -> JSONResponse:
    # JSON, not Starlette's OpenAPIResponse: its YAML has integer status codes as keys.
    return JSONResponse(SCHEMAS.get_schema(routes=request.app.routes))


async def metrics(request: Request) -> Response:
    measured = request.app.state.metrics
    try:  # bounded by the pool's timeouts (0.5 s to connect, 1 s to answer, one retry)
        waiting, claimed = await request.app.state.store.queue_lengths()
        measured.queue.labels("waiting").set(waiting)
        measured.queue.labels("claimed").set(claimed)
    except RedisError as e:  # no value rather than a stale one: `absent()` sees it
        log.warning("queue length unavailable", extra={"error": str(e)})
        measured.queue.clear()
    # The classic text format (0.0.4), which every Prometheus version reads.
    return Response(generate_latest(measured.registry), media_type=CONTENT_TYPE_PLAIN_0_0_4)


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)  # registered for HTTPException only (create_app)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)


async def invalid_input(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=422)


async def queue_full(request: Request, exc: Exception) -> JSONResponse:
    log.warning("queue full, submit refused", extra={"error": str(exc)})
    return JSONResponse(
        {"detail": f"{exc}; try again later"},
        status_code=429,
        headers={"Retry-After": str(RETRY_AFTER)},
    )


async def redis_down(request: Request, exc: Exception) -> JSONResponse:
    # The detail stays in the log: Redis's own text can name hosts, ports and commands.
    log.warning("redis unavailable", extra={"error": str(exc), "path": request.url.path})
    return JSONResponse({"detail": "redis unavailable"}, status_code=503)


async def no_free_id(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": f"{exc}; try again"}, status_code=503)


def main() -> None:
    settings = Settings.from_env()
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=log_config(settings.log_level),
        access_log=settings.access_log,
        # uvloop and httptools (what `uvicorn[standard]` installs): about 2.5x the requests/s
        # of the pure-Python defaults on this machine.
        loop="uvloop",
        http=BoundedHttpTools,
        timeout_keep_alive=KEEP_ALIVE_TIMEOUT,
        limit_concurrency=LIMIT_CONCURRENCY,
        backlog=BACKLOG,
    )


if __name__ == "__main__":
    main()
