"""The HTTP side of the batch pattern: register rows now, read their predictions later.

The API never predicts: it stores `values` with `prediction: null`, and job.py fills the
predictions in on its schedule. pymysql blocks, so every query runs in Starlette's thread pool.
"""

import hmac
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import db
import uvicorn
from config import (
    BACKLOG,
    KEEP_ALIVE_S,
    MAX_BODY,
    MAX_CONNECTIONS,
    MAX_HEADER_BYTES,
    MAX_ITEMS,
    PAGE_DEFAULT,
    PAGE_MAX,
    Settings,
)
from jsonlog import LOG_CONFIG
from metrics import ApiMetrics, HttpMetrics
from model import IrisModel
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    disable_created_metrics,
    generate_latest,
)
from pymysql.connections import Connection
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.schemas import SchemaGenerator
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger("api")
T = TypeVar("T")

N_FEATURES = 4
FLOAT32_MAX = 3.4028234663852886e38  # the model takes float32: larger values would become inf


class BadRequest(Exception):
    """Input we refuse; nothing is written."""


def parse_values(item: object) -> list[float]:
    """{"values": [4 finite numbers]} -> the 4 numbers as floats."""
    if not isinstance(item, dict) or set(item) != {"values"}:
        raise BadRequest('expected an object {"values": [4 numbers]}')
    values = item["values"]
    if not isinstance(values, list) or len(values) != N_FEATURES:
        raise BadRequest(f"values must be a list of {N_FEATURES} numbers")
    if any(isinstance(v, bool) or not isinstance(v, int | float) for v in values):
        raise BadRequest("values must be numbers")
    try:
        floats = [float(v) for v in values]
    except OverflowError:  # an integer too large for a float
        floats = [math.inf]
    if not all(math.isfinite(v) and abs(v) <= FLOAT32_MAX for v in floats):
        raise BadRequest("values must be finite float32 numbers (no NaN or Infinity)")
    return floats


async def read_json(request: Request) -> object:
    """The body as JSON, read only up to MAX_BODY bytes: a larger one is refused as it arrives."""
    too_large = HTTPException(413, f"request body larger than {MAX_BODY} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise too_large  # before reading any of it
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise too_large
    try:
        return json.loads(body)
    except RecursionError:  # deeply nested arrays or objects
        raise BadRequest("malformed JSON: nested too deeply") from None
    except ValueError as e:
        raise BadRequest(f"malformed JSON: {e}") from None


def query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer") from None
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low} and {high}")
    return value


async def with_db(request: Request, fn: Callable[..., T], *args: object) -> T:
    """Run fn(connection, *args) in the thread pool on a pooled connection; commit on success."""

    def call() -> T:
        with request.app.state.pool.connection() as conn:
            return fn(conn, *args)

    return await run_in_threadpool(call)


async def post_data(request: Request) -> JSONResponse:
    """Store one row, unpredicted.
    ---
    summary: Register one row; the job predicts it later
    requestBody:
      required: true
      content:
        application/json:
          schema: {$ref: "#/components/schemas/NewItem"}
    responses:
      201:
        description: The row as stored
        content: {application/json: {schema: {$ref: "#/components/schemas/Item"}}}
      400: {$ref: "#/components/responses/Error"}
      413: {$ref: "#/components/responses/Error"}
      503: {$ref: "#/components/responses/Error"}
    """
    values = parse_values(await read_json(request))
    items = await with_db(request, db.insert_items, [values])
    request.app.state.metrics.registered.inc()
    return JSONResponse(items[0], status_code=201)


async def post_data_list(request: Request) -> JSONResponse:
    """Store up to MAX_ITEMS rows in one transaction: all of them or, on any bad item, none.
    ---
    summary: Register 1 to 10,000 rows at once
    requestBody:
      required: true
      content:
        application/json:
          schema:
            type: object
            additionalProperties: false
            required: [items]
            properties:
              items:
                type: array
                minItems: 1
                maxItems: 10000
                items: {$ref: "#/components/schemas/NewItem"}
    responses:
      201:
        description: The rows as stored, in order
        content:
          application/json:
            schema: {type: array, items: {$ref: "#/components/schemas/Item"}}
      400: {$ref: "#/components/responses/Error"}
      413: {$ref: "#/components/responses/Error"}
      503: {$ref: "#/components/responses/Error"}
    """
    body = await read_json(request)
    if not isinstance(body, dict) or set(body) != {"items"} or not isinstance(body["items"], list):
        raise BadRequest('expected an object {"items": [{"values": [...]}, ...]}')
    if not 1 <= len(body["items"]) <= MAX_ITEMS:
        raise BadRequest(f"items must hold between 1 and {MAX_ITEMS} entries")
    # Validate everything first: one bad item rejects the request and nothing is written.
    values_list = []
    for i, item in enumerate(body["items"]):
        try:
            values_list.append(parse_values(item))
        except BadRequest as e:
            raise BadRequest(f"items[{i}]: {e}") from None
    items = await with_db(request, db.insert_items, values_list)
    request.app.state.metrics.registered.inc(len(items))
    return JSONResponse(items, status_code=201)


LISTING_DOC = """One page of rows in id order.
    ---
    summary: A page of {which} rows, in id order (an empty page is the end)
    parameters:
      - name: limit
        in: query
        schema: {{type: integer, minimum: 1, maximum: 1000, default: 100}}
      - {{name: after_id, in: query, description: the last id of the previous page,
         schema: {{type: integer, minimum: 0, maximum: 9223372036854775807, default: 0}}}}
    responses:
      200:
        description: The page
        content:
          application/json:
            schema: {{type: array, items: {{$ref: "#/components/schemas/Item"}}}}
      400: {{$ref: "#/components/responses/Error"}}
      503: {{$ref: "#/components/responses/Error"}}
    """


def listing(which: str) -> Callable[[Request], Awaitable[JSONResponse]]:
    async def endpoint(request: Request) -> JSONResponse:
        limit = query_int(request, "limit", PAGE_DEFAULT, 1, PAGE_MAX)
        after_id = query_int(request, "after_id", 0, 0, 2**63 - 1)
        return JSONResponse(await with_db(request, db.list_items, which, after_id, limit))

    endpoint.__doc__ = LISTING_DOC.format(which=which)
    return endpoint


async def get_data(request: Request) -> JSONResponse:
    """One row by id.
    ---
    summary: One row, with its prediction once the job has run
    parameters:
      - {name: item_id, in: path, required: true, schema: {type: integer, minimum: 0}}
    responses:
      200:
        description: The row
        content: {application/json: {schema: {$ref: "#/components/schemas/Item"}}}
      404: {$ref: "#/components/responses/Error"}
      503: {$ref: "#/components/responses/Error"}
    """
    item = await with_db(request, db.get_item, request.path_params["item_id"])
    if item is None:
        raise HTTPException(404, "Item not found")
    return JSONResponse(item)


async def health(request: Request) -> JSONResponse:
    """The database answers.
    ---
    summary: 200 when the database answers a SELECT 1, else 503
    responses:
      200:
        description: Healthy
        content:
          application/json:
            schema:
              type: object
              required: [status]
              properties: {status: {type: string, enum: [ok]}}
      503: {$ref: "#/components/responses/Error"}
    """

    def ping(conn: Connection) -> None:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")

    await with_db(request, ping)  # raises -> 503 below
    return JSONResponse({"status": "ok"})


async def metadata(request: Request) -> JSONResponse:
    """The model's input, output and labels.
    ---
    summary: The model's input and output (from the ONNX file) and its label names
    responses:
      200:
        description: Metadata
        content:
          application/json:
            schema:
              type: object
              required: [model, input, output, labels]
              properties:
                model: {type: string}
                input: {type: array, items: {type: object}}
                output: {type: array, items: {type: object}}
                labels: {type: object, additionalProperties: {type: string}}
    """
    return JSONResponse(request.app.state.model.metadata())


# The OpenAPI document is generated from the routes and their docstrings, so it cannot drift.
SCHEMAS = SchemaGenerator(
    {
        "openapi": "3.0.3",
        "info": {"title": "03 batch: register rows now, predict them later", "version": "1"},
        "components": {
            "schemas": {
                "NewItem": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["values"],
                    "properties": {
                        "values": {
                            "type": "array",
                            "minItems": N_FEATURES,
                            "maxItems": N_FEATURES,
                            "items": {
                                "type": "number",
                                "minimum": -FLOAT32_MAX,
                                "maximum": FLOAT32_MAX,
                            },
                        }
                    },
                },
                "Item": {
                    "type": "object",
                    "required": ["id", "values", "prediction", "created_datetime"],
                    "properties": {
                        "id": {"type": "integer", "minimum": 1},
                        "values": {"type": "array", "items": {"type": "number"}},
                        "prediction": {
                            "type": "object",
                            "nullable": True,
                            "description": "probability of each label of /metadata",
                            "additionalProperties": {"type": "number"},
                        },
                        "created_datetime": {"type": "string"},
                    },
                },
            },
            "responses": {
                "Error": {
                    "description": "The request is refused or cannot be served",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["detail"],
                                "properties": {"detail": {"type": "string"}},
                            }
                        }
                    },
                }
            },
        },
    }
)


async def metrics(request: Request) -> Response:
    # Prometheus's text format. In the thread pool: the table gauges query the database.
    # Left out of the OpenAPI document, as /openapi.json is (it is not part of the API).
    body = await run_in_threadpool(generate_latest, request.app.state.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


async def openapi(request: Request) -> JSONResponse:
    # JSON, not Starlette's YAML response: its integer status keys make schemathesis refuse it.
    return JSONResponse(SCHEMAS.get_schema(routes=request.app.routes))


# One error shape, {"detail": "..."}, as in the specification.
async def bad_request(request: Request, exc: BadRequest) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=400)


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


# The driver's text (server address, user, SQL) goes to the log only; callers get a stable message.
async def db_unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.error("database unavailable", extra={"path": request.url.path, "cause": repr(exc)})
    return JSONResponse({"detail": "database unavailable"}, status_code=503)


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("internal error", extra={"path": request.url.path, "cause": repr(exc)})
    return JSONResponse({"detail": "internal error"}, status_code=500)


class RequireApiKey:
    """With API_KEY set, every path but OPEN needs `Authorization: Bearer <key>`, else 401."""

    OPEN = {"/health", "/openapi.json"}  # a liveness probe and the description of the routes

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.OPEN:
            given = Headers(scope=scope).get("authorization", "").encode()
            if not hmac.compare_digest(given, self.expected):  # constant time
                answer = JSONResponse({"detail": "missing or wrong API key"}, status_code=401)
                answer.headers["WWW-Authenticate"] = "Bearer"
                return await answer(scope, receive, send)
        await self.app(scope, receive, send)


class IdConvertor(Convertor):
    """An id in a URL: ids are BIGINT UNSIGNED, at most 20 digits. (Starlette's int convertor
    takes any number of digits, and int() of 5,000 of them raises: a 500.)"""

    regex = "[0-9]{1,20}"

    def convert(self, value: str) -> int:
        return int(value)

    def to_string(self, value: int) -> str:
        return str(value)


def create_app(settings: Settings) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        db.apply_schema(settings)  # the table is created if missing, before we serve
        app.state.model = IrisModel(settings.model_filepath, settings.label_filepath)
        app.state.pool = db.Pool(settings)
        yield
        app.state.pool.close()

    register_url_convertor("id", IdConvertor())
    # Callable[..., ...]: each handler takes the exception class it is registered for.
    handlers: dict[Any, Callable[..., Awaitable[Response]]] = {
        BadRequest: bad_request,
        HTTPException: http_error,
        Exception: internal_error,
    }
    handlers.update(dict.fromkeys(db.UNAVAILABLE, db_unavailable))
    routes = [
        Route("/data", post_data, methods=["POST"]),
        Route("/data/list", post_data_list, methods=["POST"]),
        Route("/data/all", listing("all")),
        Route("/data/unpredicted", listing("unpredicted")),
        Route("/data/predicted", listing("predicted")),
        Route("/data/{item_id:id}", get_data),
        Route("/health", health),
        Route("/metadata", metadata),
        Route("/openapi.json", openapi, include_in_schema=False),
        Route("/metrics", metrics, include_in_schema=False),
    ]
    # One registry per app, not the process-wide default: tests build several apps in one process.
    registry = CollectorRegistry()
    # Outermost first: the HTTP metrics see every answer, the API key's 401s included.
    # (METRICS=0 leaves them out, for bench.py's comparison; /metrics still answers.)
    http_metrics = Middleware(HttpMetrics, registry=registry, routes=routes)
    middleware = [http_metrics] if settings.metrics else []
    if settings.api_key:
        middleware.append(Middleware(RequireApiKey, api_key=settings.api_key))
    app = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers=handlers, middleware=middleware
    )
    app.state.registry = registry
    app.state.metrics = ApiMetrics(registry, settings)
    return app


def main() -> None:
    settings = Settings.from_env()
    disable_created_metrics()  # no *_created series: a third more lines, and nothing reads them
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=LOG_CONFIG,
        http="h11",  # the implementation with a bound on the request line and headers
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        timeout_keep_alive=KEEP_ALIVE_S,
        limit_concurrency=MAX_CONNECTIONS,
        backlog=BACKLOG,
    )


if __name__ == "__main__":
    main()
