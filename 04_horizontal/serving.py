"""What the service and the proxy share: settings, JSON logs on stdout, the app shell, uvicorn."""

import asyncio
import hmac
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import uvicorn
from payload import MAX_BODY_BYTES, OPENAPI_SCHEMAS, BadInput
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route
from starlette.schemas import SchemaGenerator
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# Slow or greedy clients (the README's "Limits" table says why these numbers).
# uvicorn's own: an idle kept-alive connection is closed after KEEP_ALIVE_S, and past
# LIMIT_CONCURRENCY open connections plus requests in progress it answers 503 at once.
KEEP_ALIVE_S = 30  # longer than the proxy's 4 s idle time (see proxy.py)
# The proxy opens up to 100 connections to each service, so 256 leaves room for direct callers.
DEFAULT_LIMIT_CONCURRENCY = 256
# What uvicorn lacks with httptools (BoundedHttpToolsProtocol below):
REQUEST_READ_TIMEOUT_S = 10  # from a connection's or a request's first byte to its body's last
MAX_HEADER_BYTES = 16 * 1024  # request line and headers; h11's default bound

OPEN_PATHS = ("/health", "/openapi.json")  # answered without the API key; /metrics needs it

# Histogram buckets in seconds, for HTTP requests and the proxy's service calls: a direct service
# call takes under a millisecond, a proxied one a few, a timed-out service call SERVICE_TIMEOUT_S.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# The method label takes these values or "other": a client must not be able to add series.
METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))


@dataclass(frozen=True)
class ServerSettings:
    host: str
    port: int
    log_level: str
    access_log: bool
    limit_concurrency: int
    api_key: str | None  # None: no key needed; set: "Authorization: Bearer <key>" on every call
    metrics: bool  # METRICS=0 leaves out the HTTP metrics middleware (for bench.py's comparison)

    @classmethod
    def from_env(cls, default_port: int) -> "ServerSettings":
        return cls(
            host=os.environ.get("HOST", "127.0.0.1"),
            port=int(os.environ.get("PORT", default_port)),
            log_level=os.environ.get("LOG_LEVEL", "info").lower(),
            access_log=os.environ.get("ACCESS_LOG", "1") not in ("0", "false", "no"),
            limit_concurrency=int(os.environ.get("LIMIT_CONCURRENCY", DEFAULT_LIMIT_CONCURRENCY)),
            api_key=os.environ.get("API_KEY") or None,
            metrics=os.environ.get("METRICS", "1") not in ("0", "false", "no"),
        )


class JsonFormatter(logging.Formatter):
    """One JSON object per line, so logs can be read by a collector as well as by a person."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.name == "uvicorn.access" and isinstance(record.args, tuple):
            client, method, path, _, status = record.args
            entry.update(client=client, method=method, path=path, status=status)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def log_config(level: str) -> dict[str, Any]:  # the shape logging.config.dictConfig takes
    """A logging.config dict for uvicorn: its own loggers and ours all go to stdout as JSON."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {
            "stdout": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "stream": "ext://sys.stdout",
            }
        },
        "loggers": {
            "uvicorn": {"handlers": ["stdout"], "level": level.upper(), "propagate": False},
            "uvicorn.access": {"handlers": ["stdout"], "level": "INFO", "propagate": False},
        },
        "root": {"handlers": ["stdout"], "level": level.upper()},
    }


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus two bounds it lacks: request time and header size.

    uvicorn arms its idle timer only after a response and stores headers without a size limit,
    so a client that connects and sends nothing, drips its headers or body, or sends megabytes
    of headers would keep a connection (and memory) forever. Here the whole request, headers and
    body, must arrive within REQUEST_READ_TIMEOUT_S, and headers within MAX_HEADER_BYTES.
    """

    header_bytes: int
    read_timer: asyncio.TimerHandle | None

    def connection_made(  # type: ignore[override]  # uvicorn's own narrowing of asyncio's type
        self, transport: asyncio.Transport
    ) -> None:
        super().connection_made(transport)
        self.header_bytes = 0
        self.read_timer = self.loop.call_later(REQUEST_READ_TIMEOUT_S, self.transport.close)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.header_bytes = 0
        if self.read_timer is None:  # a new request on a kept-alive connection
            self.read_timer = self.loop.call_later(REQUEST_READ_TIMEOUT_S, self.transport.close)

    def on_url(self, url: bytes) -> None:
        self.count_header_bytes(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.count_header_bytes(len(name) + len(value))
        super().on_header(name, value)

    def count_header_bytes(self, size: int) -> None:
        self.header_bytes += size
        if self.header_bytes > MAX_HEADER_BYTES:
            # Raised inside the parser's callback: uvicorn answers 400 and closes the connection.
            raise ValueError("request headers too large")

    def on_message_complete(self) -> None:
        self.stop_read_timer()
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_read_timer()
        super().connection_lost(exc)

    def stop_read_timer(self) -> None:
        if self.read_timer is not None:
            self.read_timer.cancel()
            self.read_timer = None


class HasServerSettings(Protocol):
    @property
    def server(self) -> ServerSettings: ...


AppSettings = TypeVar("AppSettings", bound=HasServerSettings)


def serve(create_app: Callable[[AppSettings], Starlette], settings: AppSettings) -> None:
    """Run create_app(settings) under uvicorn; settings.server says where and how to log."""
    server = settings.server
    # No *_created series: a third more lines per scrape, and nothing here reads them.
    disable_created_metrics()
    uvicorn.run(
        create_app(settings),
        host=server.host,
        port=server.port,
        log_config=log_config(server.log_level),
        log_level=server.log_level,
        access_log=server.access_log,
        # The same compiled parser and loop in the venv, in Docker and in the bench.
        http=BoundedHttpToolsProtocol,
        loop="uvloop",
        timeout_keep_alive=KEEP_ALIVE_S,
        limit_concurrency=server.limit_concurrency,
    )


async def read_body(request: Request) -> bytes:
    """The request body, refused with a 413 as soon as it passes MAX_BODY_BYTES: counted while
    it streams in, so a huge or endless body is never held in memory. (Starlette's own
    max_body_size answers in plain text whenever Content-Length is too large.)"""
    too_large = HTTPException(413, f"body larger than {MAX_BODY_BYTES} bytes")
    if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def error(status_code: int, message: str) -> JSONResponse:
    """This chapter's one error shape."""
    return JSONResponse({"error": message}, status_code=status_code)


async def bad_input(request: Request, exc: Exception) -> JSONResponse:
    """Starlette exception handler for payload.BadInput: a clear 422, never a 500."""
    return error(422, str(exc))


async def server_error(request: Request, exc: Exception) -> JSONResponse:
    """A bug is still answered in the chapter's error shape (uvicorn logs the traceback)."""
    return error(500, "internal error")


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    """404, 405 and 413, in the same shape as every other error."""
    assert isinstance(exc, HTTPException)  # registered for HTTPException only (web_app)
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)


class RequireApiKey:
    """When API_KEY is set, every path but OPEN_PATHS needs "Authorization: Bearer <key>"."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not hmac.compare_digest(given, self.expected):  # constant time: leaks no prefix
                response = error(401, "missing or wrong API key")
                response.headers["WWW-Authenticate"] = "Bearer"
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class HttpMetrics:
    """Counts and times every HTTP request by method, route template and status (pure ASGI).

    The label is the route's template ("/predict"), never the raw path: the router leaves the
    matched route in the scope. A request refused before routing (a 401) is matched here; a path
    no route matches is "unmatched", so no client can create a series.
    """

    def __init__(self, app: ASGIApp, registry: CollectorRegistry, routes: Sequence[Route]):
        self.app = app
        self.routes = routes
        self.requests = Counter(
            "http_requests_total",
            "HTTP requests answered, by method, route template and status",
            ["method", "route", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "http_request_duration_seconds",
            "Time from a request's arrival to its last response byte, by method and route template",
            ["method", "route"],
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status, counted = 500, False  # 500: what the client gets if the app raises first

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
            if not counted:  # the app raised, or the client left before the end
                count()

    def route_of(self, scope: Scope) -> str:
        route: Route | None = scope.get("route")  # the router's match: one of self.routes
        if route is None:
            route = next((r for r in self.routes if r.matches(scope)[0] != Match.NONE), None)
        return route.path if route is not None else "unmatched"


async def health(request: Request) -> JSONResponse:
    """Is this process up?
    ---
    responses:
      "200":
        description: '{"health": "ok"} while the process serves'
        content:
          application/json:
            schema:
              type: object
              required: [health]
              properties:
                health: {type: string, enum: [ok]}
    """
    return JSONResponse({"health": "ok"})


def web_app(
    routes: list[Route],
    lifespan: Callable[[Starlette], AbstractAsyncContextManager[None]],
    server: ServerSettings,
    info: dict[str, str],
    components: Mapping[str, Mapping[str, object]],
    registry: CollectorRegistry,
) -> Starlette:
    """A Starlette app with /health, /openapi.json, /metrics, the optional API key and this
    chapter's one error shape. info and components go into the OpenAPI document; registry holds
    the app's own metrics (one per app, not the process-wide default: tests run several)."""
    generator = SchemaGenerator(
        {
            "openapi": "3.0.3",
            "info": info,
            "components": {
                "schemas": {
                    **OPENAPI_SCHEMAS,
                    "Error": ERROR_SCHEMA,
                    **components.get("schemas", {}),
                },
                "responses": {**ERROR_RESPONSES, **components.get("responses", {})},
            },
        }
    )

    async def openapi(request: Request) -> JSONResponse:
        # JSON, generated from the routes' docstrings, so it cannot drift from the code.
        return JSONResponse(generator.get_schema(routes=request.app.routes))

    async def metrics(request: Request) -> Response:
        # Prometheus's text format; left out of the OpenAPI document, as /openapi.json is.
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    routes = [
        Route("/health", health),
        Route("/openapi.json", openapi, include_in_schema=False),
        Route("/metrics", metrics, include_in_schema=False),
        *routes,
    ]
    # Outermost first: the metrics see every answer, the API key's 401s included.
    middleware = (
        [Middleware(HttpMetrics, registry=registry, routes=routes)] if server.metrics else []
    )
    if server.api_key:
        middleware.append(Middleware(RequireApiKey, api_key=server.api_key))
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=middleware,
        exception_handlers={
            BadInput: bad_input,
            HTTPException: http_error,
            Exception: server_error,
        },
    )


ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}},
}
ERROR_RESPONSES = {
    name: {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    for name, description in {
        "BadInput": 'not {"data": [[4 finite float32 numbers], ...]}, 1 to MAX_ROWS rows',
        "TooLarge": "the body is larger than MAX_BODY_BYTES",
        "Unauthorized": "API_KEY is set and the request does not carry it",
    }.items()
}
