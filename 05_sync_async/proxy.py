"""The proxy: answers with the fast model inside the request and queues the accurate one.

POST /predict {"image_data": "<base64>"} -> {"job_id", "result_sync", "top5"}
GET  /job/{job_id}                       -> {"<job_id>": {"prediction", "status", ...}}
GET  /predict/test | /health | /metadata | /openapi.json (generated from the docstrings below)
GET  /metrics                            -> Prometheus text format
"""

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import redis.asyncio as aioredis
import uvicorn
from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Match, Route
from starlette.schemas import SchemaGenerator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import jobs
from classifier import (
    Classifier,
    Guess,
    InvalidImage,
    decode_image,
    efficientnet_input,
    load_labels,
)
from config import HERE, Settings
from logs import log_config

log = logging.getLogger("proxy")
# What a Redis call can raise: its own errors, and the deadline of `redis_deadline` passing.
REDIS_DOWN = (aioredis.RedisError, TimeoutError)
RETRY_AFTER = 5  # seconds a client is asked to wait when the queue is full (about 75 jobs' work)
JOB_ID = re.compile(rf"[0-9a-f]{{{2 * jobs.ID_BYTES}}}")
KEEP_ALIVE_SECONDS = 5  # an idle keep-alive connection is closed after this long
MAX_HEADER_BYTES = 64 * 1024  # a request line plus headers past this are refused (400)
# Open even when API_KEY is set: probes, the API's description, and the static demo page (whose
# own requests then need the key, so the page is for a key-less local run). Not /metrics: it
# tells anyone the traffic; Prometheus sends the key (`authorization` in its scrape config).
OPEN_PATHS = {"/health", "/openapi.json", "/"}
# Label values must stay few: any other method (h11 accepts any token) is counted as "other".
METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}


def _error_response(description: str) -> dict[str, object]:
    schema = {"$ref": "#/components/schemas/Error"}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


# The OpenAPI document, built from the endpoints' docstrings (after `---`) so it cannot drift.
SCHEMA = SchemaGenerator(
    {
        "openapi": "3.0.3",
        "info": {"title": "05 sync-async proxy", "version": "1.0"},
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"type": "string"}},
                },
                "Top5": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["label", "probability"],
                        "properties": {
                            "label": {"type": "string"},
                            "probability": {"type": "number", "minimum": 0, "maximum": 1},
                        },
                    },
                },
                "Prediction": {
                    "type": "object",
                    "required": ["job_id", "result_sync", "top5"],
                    "properties": {
                        "job_id": {"type": "string", "pattern": "^[0-9a-f]{6}$"},
                        "result_sync": {"type": "string"},
                        "top5": {"$ref": "#/components/schemas/Top5"},
                    },
                },
            },
            "responses": {
                "BadRequest": _error_response("not a JSON {image_data} holding an image we accept"),
                "Unauthorized": _error_response("API_KEY is set and the request lacks it"),
                "SlowBody": _error_response("the body did not arrive within BODY_TIMEOUT"),
                "NotFound": _error_response("unknown or expired job id"),
                "QueueFull": _error_response("MAX_QUEUE_LENGTH jobs wait already; see Retry-After"),
                "RedisDown": _error_response("Redis unavailable or too slow (REDIS_TIMEOUT)"),
            },
        },
    }
)


class BadRequest(Exception):
    """The request is refused with 400 and this message; nothing has been stored."""


class SlowBody(Exception):
    """The body did not arrive within BODY_TIMEOUT: 408, nothing stored."""


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


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
        self.inference = Histogram(
            "model_inference_duration_seconds",
            "Preprocessing and inference of one image (decoding excluded)",
            ["model"],
            registry=self.registry,
        )
        self.submitted = Counter(
            "jobs_submitted_total", "Jobs queued for the accurate model", registry=self.registry
        )


class HttpMetrics:
    """Pure ASGI middleware: counts and times every request by its route's template
    (`/job/{job_id}`, never the id itself); a path no route matches is "unmatched"."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: list[Route]):
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


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    settings = app.state.settings
    labels = load_labels(settings.labels_path)
    app.state.keys = jobs.Keys(settings.queue_name)
    app.state.model = Classifier(settings.sync_model_path, labels, efficientnet_input)
    app.state.inference_timer = app.state.metrics.inference.labels(app.state.model.name)
    app.state.sample = settings.sample_image_path.read_bytes()
    app.state.page = (HERE / "index.html").read_text()
    # Decoding plus the fast model take milliseconds of CPU: they run in this pool, so the event
    # loop keeps serving other requests (onnxruntime releases the GIL). Its size bounds how many
    # images are decoded at once, so memory is bounded by the pool, not by the clients.
    app.state.decoder = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
    app.state.redis = aioredis.Redis.from_url(
        settings.redis_url,
        password=settings.redis_password,  # if the URL holds one, the URL's wins
        socket_connect_timeout=settings.redis_timeout,
        socket_timeout=settings.redis_timeout,
        # One retry, on a fresh connection: a pooled one may have died with a Redis restart.
        # Safe because SUBMIT is idempotent; `redis_deadline` still bounds the whole call.
        retry=Retry(NoBackoff(), 1),
    )
    log.info("proxy ready", extra={"fields": {"model": app.state.model.name}})
    try:
        yield
    finally:
        await app.state.redis.aclose()
        app.state.decoder.shutdown()


def redis_deadline(request: Request) -> asyncio.Timeout:
    """One time bound on a request's Redis work, retries included: a hung Redis is a fast 503."""
    settings: Settings = request.app.state.settings
    return asyncio.timeout(settings.redis_timeout)


async def require_api_key(request: Request, call_next: RequestResponseEndpoint) -> Response:
    """With API_KEY set, every path but OPEN_PATHS needs `Authorization: Bearer <API_KEY>`."""
    key = request.app.state.settings.api_key
    if key and request.url.path not in OPEN_PATHS:
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, f"Bearer {key}".encode()):  # constant time
            return error(401, "missing or wrong API key", {"WWW-Authenticate": "Bearer"})
    return await call_next(request)


async def read_image_data(request: Request, max_image_bytes: int) -> bytes:
    """The decoded `image_data` field; the body is read only up to what a valid one needs."""
    limit = 4 * (max_image_bytes // 3 + 1) + 1024  # base64 of the largest image, plus the JSON
    body = bytearray()
    # uvicorn has no read timeout: without this deadline a client sending a byte a minute would
    # hold its connection forever.
    try:
        async with asyncio.timeout(request.app.state.settings.body_timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise BadRequest(f"image over the {max_image_bytes} byte limit")
    except TimeoutError as exc:
        raise SlowBody from exc
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested thousands deep
        raise BadRequest("body is not JSON") from exc
    if not isinstance(payload, dict) or not isinstance(payload.get("image_data"), str):
        raise BadRequest('expected {"image_data": "<base64 image>"}')
    try:
        image = base64.b64decode(payload["image_data"], validate=True)
    except ValueError as exc:  # binascii.Error, or non-ASCII characters
        raise BadRequest(f"image_data is not valid base64: {exc}") from exc
    if len(image) > max_image_bytes:
        raise BadRequest(f"image over the {max_image_bytes} byte limit")
    return image


async def predict_bytes(request: Request, image: bytes) -> JSONResponse:
    state = request.app.state

    def fast_top5() -> list[Guess]:
        model: Classifier = state.model
        decoded = decode_image(image, state.settings.max_image_pixels)
        with state.inference_timer.time():
            return model.top_k(decoded)

    try:
        top5 = await asyncio.get_running_loop().run_in_executor(state.decoder, fast_top5)
    except InvalidImage as exc:
        return error(400, str(exc))
    # Queue only what the fast model could read, so a bad upload never reaches the worker.
    try:
        async with redis_deadline(request):
            job_id = await jobs.submit(
                state.redis,
                state.keys,
                image,
                state.settings.result_ttl,
                state.settings.max_queue_length,
            )
    except jobs.QueueFull:
        log.warning("queue full, job refused")
        limit = state.settings.max_queue_length
        message = f"the queue holds {limit} jobs already, try again later"
        return error(429, message, {"Retry-After": str(RETRY_AFTER)})
    except REDIS_DOWN as exc:
        log.error("cannot queue the job", extra={"fields": {"error": repr(exc)}})
        return error(503, "job queue unavailable, try again later")
    state.metrics.submitted.inc()
    label = top5[0]["label"]
    log.info("sync prediction", extra={"fields": {"job_id": job_id, "result_sync": label}})
    return JSONResponse({"job_id": job_id, "result_sync": label, "top5": top5})


async def predict(request: Request) -> JSONResponse:
    """The fast model's answer now; the same image is queued for the accurate one.
    ---
    requestBody:
      required: true
      content:
        application/json:
          schema:
            type: object
            required: [image_data]
            properties:
              image_data: {type: string, description: "base64 of a JPEG, PNG or WebP image"}
    responses:
      "200":
        description: the fast answer and the id of the queued job
        content:
          application/json:
            schema: {$ref: "#/components/schemas/Prediction"}
      "400": {$ref: "#/components/responses/BadRequest"}
      "401": {$ref: "#/components/responses/Unauthorized"}
      "408": {$ref: "#/components/responses/SlowBody"}
      "429": {$ref: "#/components/responses/QueueFull"}
      "503": {$ref: "#/components/responses/RedisDown"}
    """
    try:
        image = await read_image_data(request, request.app.state.settings.max_image_bytes)
    except BadRequest as exc:
        return error(400, str(exc))
    except SlowBody:
        timeout = request.app.state.settings.body_timeout
        return error(408, f"the body did not arrive within {timeout:g} s")
    return await predict_bytes(request, image)


async def predict_test(request: Request) -> JSONResponse:
    """POST /predict with the sample photo.
    ---
    responses:
      "200":
        description: the fast answer and the id of the queued job
        content:
          application/json:
            schema: {$ref: "#/components/schemas/Prediction"}
      "401": {$ref: "#/components/responses/Unauthorized"}
      "429": {$ref: "#/components/responses/QueueFull"}
      "503": {$ref: "#/components/responses/RedisDown"}
    """
    return await predict_bytes(request, request.app.state.sample)


async def job(request: Request) -> JSONResponse:
    """A job's state; "prediction" is "" until its status is "complete".
    ---
    parameters:
      - {name: job_id, in: path, required: true, schema: {type: string}}
    responses:
      "200":
        description: "{job_id: state}"
        content:
          application/json:
            schema:
              type: object
              minProperties: 1
              maxProperties: 1
              additionalProperties:
                type: object
                required: [status, prediction]
                properties:
                  status: {type: string, enum: [queued, in_progress, complete, failed]}
                  prediction: {type: string}
                  top5: {$ref: "#/components/schemas/Top5"}
                  model: {type: string}
                  error: {type: string}
      "401": {$ref: "#/components/responses/Unauthorized"}
      "404": {$ref: "#/components/responses/NotFound"}
      "503": {$ref: "#/components/responses/RedisDown"}
    """
    job_id = request.path_params["job_id"]
    if not JOB_ID.fullmatch(job_id):
        return error(404, f"unknown job {job_id!r}")
    try:
        async with redis_deadline(request):
            state = await jobs.lookup(request.app.state.redis, request.app.state.keys, job_id)
    except REDIS_DOWN:
        return error(503, "job store unavailable, try again later")
    if state["status"] == jobs.JobStatus.NOT_FOUND:
        return error(404, f"unknown job {job_id!r} (results are kept for one hour)")
    return JSONResponse({job_id: state})


async def health(request: Request) -> JSONResponse:
    """Whether Redis answers; open even when API_KEY is set.
    ---
    responses:
      "200":
        description: ready
        content:
          application/json:
            schema: {type: object, required: [health], properties: {health: {enum: [ok]}}}
      "503":
        description: Redis unavailable
        content:
          application/json:
            schema: {type: object, required: [health], properties: {health: {type: string}}}
    """
    try:
        async with redis_deadline(request):
            await request.app.state.redis.ping()
    except REDIS_DOWN:
        return JSONResponse({"health": "redis unavailable"}, status_code=503)
    return JSONResponse({"health": "ok"})


async def metadata(request: Request) -> JSONResponse:
    """What the API takes and returns, and the two models' names.
    ---
    responses:
      "200":
        description: the metadata
        content:
          application/json:
            schema:
              type: object
              required: [sync_model, async_model]
              properties:
                sync_model: {type: string}
                async_model: {type: string}
      "401": {$ref: "#/components/responses/Unauthorized"}
    """
    return JSONResponse(
        {
            "data_type": "str",
            "data_structure": "(1,1)",
            "data_sample": "base64 encoded image file",
            "prediction_type": "str",
            "prediction_structure": "(1,1)",
            "prediction_sample": "Egyptian cat",
            "sync_model": request.app.state.model.name,
            "async_model": request.app.state.settings.async_model_path.stem,
        }
    )


async def page(request: Request) -> HTMLResponse:
    """The one-page demo.
    ---
    responses:
      "200":
        description: the page
        content:
          text/html: {schema: {type: string}}
    """
    return HTMLResponse(request.app.state.page)


async def openapi(request: Request) -> JSONResponse:
    # JSON, not Starlette's OpenAPIResponse (YAML): schemathesis refuses YAML's integer codes.
    return JSONResponse(SCHEMA.get_schema(routes=request.app.routes))


async def metrics(request: Request) -> Response:
    # The classic text format (0.0.4), which every Prometheus version reads.
    body = generate_latest(request.app.state.metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_PLAIN_0_0_4)


def create_app(settings: Settings) -> Starlette:
    routes = [
        Route("/", page),
        Route("/predict", predict, methods=["POST"]),
        Route("/predict/test", predict_test),
        Route("/job/{job_id}", job),
        Route("/health", health),
        Route("/metadata", metadata),
        # Neither is part of the API the document describes (nor fuzzed as such).
        Route("/openapi.json", openapi, include_in_schema=False),
        Route("/metrics", metrics, include_in_schema=False),
    ]
    measured = Metrics()
    # Outermost, so a 401 is counted too. METRICS=0 leaves it out, to measure what it costs.
    timing = [Middleware(HttpMetrics, metrics=measured, routes=routes)] if settings.metrics else []
    app = Starlette(
        routes=routes,
        middleware=[*timing, Middleware(BaseHTTPMiddleware, dispatch=require_api_key)],
        lifespan=lifespan,
    )
    app.state.settings, app.state.metrics = settings, measured
    return app


def main() -> None:
    settings = Settings.from_env()
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=log_config(settings.log_level),
        # Past MAX_CONCURRENCY open connections or requests, uvicorn answers 503 at once: each
        # request in flight can hold a body of up to ~3 x MAX_IMAGE_BYTES while it is parsed.
        limit_concurrency=settings.max_concurrency,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        # h11 rather than httptools (uvicorn's default when installed): httptools takes headers
        # of any size, h11 stops at this bound. Its cost is noise next to a 20 ms inference.
        http="h11",
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
    )


if __name__ == "__main__":
    main()
