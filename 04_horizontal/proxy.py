"""The proxy: one request in, the same request to every specialised service at once, one answer out.

    SERVICES="setosa=http://127.0.0.1:8000,versicolor=http://127.0.0.1:8001,..." python proxy.py

The services come from configuration, so a fourth class is a setting, not code. Each call has its
own timeout; a service that is down, slow or failing is reported by name while the others'
answers are still returned. Input is validated here, once, before anything is sent.
"""

import asyncio
import json
import logging
import os
import time
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import NotRequired, TypedDict, TypeGuard

import aiohttp
from aiohttp.client_proto import ResponseHandler
from payload import INPUT_SCHEMA, MAX_BODY_BYTES, SAMPLE, one_or_many, parse_rows, per_row
from prometheus_client import CollectorRegistry, Counter, Histogram
from serving import LATENCY_BUCKETS, ServerSettings, read_body, serve, web_app
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

log = logging.getLogger("proxy")

DEFAULT_SERVICES = (
    "setosa=http://127.0.0.1:8000,versicolor=http://127.0.0.1:8001,virginica=http://127.0.0.1:8002"
)


def parse_services(text: str) -> dict[str, str]:
    """Parse SERVICES, "name=url,name=url", into {name: url}; the name is the label it votes for."""
    services: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, url = item.partition("=")
        if not sep or not name.strip() or not url.strip().startswith(("http://", "https://")):
            raise ValueError(f"SERVICES: expected name=http://host:port, got {item!r}")
        if name.strip() in services:
            raise ValueError(f"SERVICES: {name.strip()!r} is listed twice")
        services[name.strip()] = url.strip().rstrip("/")
    if not services:
        raise ValueError("SERVICES: at least one name=url is needed")
    return services


@dataclass(frozen=True)
class Settings:
    services: dict[str, str]
    timeout_s: float  # for each service call on its own: one slow service delays nobody else
    # A connection to a service is used for at most this long, then closed and made anew, so new
    # connections (spread over every replica the service's name resolves to) replace old ones.
    connection_lifetime_s: float
    server: ServerSettings

    @classmethod
    def from_env(cls) -> "Settings":
        return cls(
            services=parse_services(os.environ.get("SERVICES", DEFAULT_SERVICES)),
            timeout_s=float(os.environ.get("SERVICE_TIMEOUT_S", "1.0")),
            connection_lifetime_s=float(os.environ.get("CONNECTION_LIFETIME_S", "5")),
            server=ServerSettings.from_env(default_port=9000),
        )


@dataclass(frozen=True)
class Answer:
    """What one service said: its JSON object, or why there is none (a stable, short reason for
    the caller, and one of REASONS for the metrics)."""

    body: dict[str, object] | None = None  # a JSON object
    error: str | None = None
    reason: str | None = None


# Why a call gave no usable answer: the reason label of fanout_service_call_failures_total.
REASONS = ("timeout", "connect", "http_status", "too_large", "invalid_answer", "request_failed")
INVALID_JSON = "answered with invalid JSON"


class FanOutMetrics:
    """The fan-out as Prometheus sees it, labelled by the configured service names only."""

    def __init__(self, registry: CollectorRegistry, services: dict[str, str]):
        self.call_duration = Histogram(
            "fanout_service_call_duration_seconds",
            "Time of one call to one service, answered or not, by service name",
            ["service"],
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        self.failures = Counter(
            "fanout_service_call_failures_total",
            "Service calls without a usable answer, by service name and reason",
            ["service", "reason"],
            registry=registry,
        )
        self.partial_answers = Counter(
            "fanout_partial_answers_total",
            "Answers given (200) with at least one service missing",
            registry=registry,
        )
        # Every series exists from the start at 0, so increase() sees a service's first failure.
        for name in services:
            self.call_duration.labels(name)
            for reason in REASONS:
                self.failures.labels(name, reason)


class TooLarge(Exception):
    """A service's answer is larger than MAX_BODY_BYTES."""


def is_probability(value: object) -> bool:
    # NaN and infinities fail the comparison; bool is an int in Python, and no probability.
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1


def is_pair(value: object) -> TypeGuard[list[float]]:
    return isinstance(value, list) and len(value) == 2 and all(map(is_probability, value))


def predictions(answer: Answer, rows: int) -> list[list[float]] | None:
    """[P(class), P(not class)] for each row, or None when the service gave no usable answer."""
    if answer.body is None:
        return None
    try:
        answered = per_row(answer.body["prediction"], rows)
    except (KeyError, TypeError):
        return None
    pairs = [pair for pair in answered if is_pair(pair)]
    return pairs if len(pairs) == len(answered) == rows else None


async def read_capped(response: aiohttp.ClientResponse) -> bytes:
    """The body, refused as soon as it passes MAX_BODY_BYTES (counted after decompression)."""
    if (response.content_length or 0) > MAX_BODY_BYTES:
        raise TooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise TooLarge  # leaving unread bytes makes aiohttp close, not reuse, the connection
        chunks.append(chunk)
    return b"".join(chunks)


class FanOut:
    """Sends one request to every service concurrently over a single, long-lived HTTP session."""

    def __init__(self, settings: Settings, metrics: FanOutMetrics):
        self.services = settings.services
        self.metrics = metrics
        self.timeout = aiohttp.ClientTimeout(total=settings.timeout_s)
        self.lifetime_s = settings.connection_lifetime_s
        # A connection's first use, by time.monotonic().
        self.first_used: weakref.WeakKeyDictionary[ResponseHandler, float] = (
            weakref.WeakKeyDictionary()
        )
        # The proxy's own API_KEY, if set, is what it shows every service (never the caller's).
        api_key = settings.server.api_key
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=0,  # no global cap: each service gets up to limit_per_host connections
                limit_per_host=100,
                # Shorter than the services' own idle timeout (30 s), so an idle connection is
                # always dropped by us first and never reused just as the server closes it.
                keepalive_timeout=4,
                # Each new connection goes to the next address the name resolved to (aiohttp
                # takes them in turn); the answer is kept this long, so a replica added or
                # removed is seen within it.
                # A float is what aiohttp's DNS cache keeps and compares (_DNSCacheTable(ttl:
                # float)); only TCPConnector's annotation says int. Tests use 0.3 s.
                ttl_dns_cache=settings.connection_lifetime_s,  # type: ignore[arg-type]
            ),
            timeout=self.timeout,
            headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
            # A proxy shared by many users must not keep one service's cookies for everyone.
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        await self.session.close()

    def retire_if_old(self, response: aiohttp.ClientResponse) -> None:
        """Have the connection closed, not pooled, once this answer is read if it is older than
        the lifetime. Without this, a busy proxy keeps its first connections for ever: requests
        stick to the replicas that existed then, and a replica added later gets none."""
        connection = response.connection  # None when the answer had no body and is done already
        if connection is None or connection.protocol is None:
            return
        now = time.monotonic()
        if now - self.first_used.setdefault(connection.protocol, now) > self.lifetime_s:
            connection.protocol.force_close()  # aiohttp's connector then closes it on release

    async def all(self, method: str, path: str, body: bytes | None = None) -> dict[str, Answer]:
        answers = await asyncio.gather(
            *(self.one(name, method, path, body) for name in self.services)
        )
        return dict(zip(self.services, answers, strict=True))

    async def one(self, name: str, method: str, path: str, body: bytes | None) -> Answer:
        """One service's answer, timed, and counted by reason when there is none."""
        started = time.perf_counter()
        answer = await self.ask(name, method, path, body)
        self.metrics.call_duration.labels(name).observe(time.perf_counter() - started)
        if answer.reason:
            self.metrics.failures.labels(name, answer.reason).inc()
        return answer

    async def ask(self, name: str, method: str, path: str, body: bytes | None) -> Answer:
        """The caller gets a stable reason; the log gets the detail, with the service's address,
        which callers never see."""
        url = self.services[name] + path
        headers = {"Content-Type": "application/json"} if body is not None else None
        try:
            async with self.session.request(method, url, data=body, headers=headers) as r:
                self.retire_if_old(r)
                raw = await read_capped(r)
                if r.status != 200:
                    reason, error = "http_status", f"HTTP {r.status}"
                    detail = raw[:200].decode(errors="replace")
                else:
                    answer = json.loads(raw)
                    if isinstance(answer, dict):
                        return Answer(body=answer)
                    reason, error, detail = "invalid_answer", INVALID_JSON, "not an object"
        except TimeoutError:
            reason, error, detail = "timeout", f"no answer within {self.timeout.total} s", ""
        except aiohttp.ClientConnectorError as exc:
            reason, error, detail = "connect", "cannot connect", str(exc)
        except aiohttp.ClientError as exc:
            reason, error = "request_failed", f"request failed: {type(exc).__name__}"
            detail = str(exc)
        except TooLarge:
            reason, error, detail = "too_large", f"answer larger than {MAX_BODY_BYTES} bytes", ""
        except (ValueError, RecursionError) as exc:  # not JSON, or nested deeper than the stack
            reason, error, detail = "invalid_answer", INVALID_JSON, type(exc).__name__
        log.warning("%s %s %s failed: %s (%s)", name, method, url, error, detail or "-")
        return Answer(error=error, reason=reason)


class Label(TypedDict):
    """One row's answer from /predict/label."""

    proba: float
    label: str


class LabelAnswer(TypedDict):
    prediction: Label | list[Label]  # one row, or several
    missing: NotRequired[dict[str, str]]  # service name -> why it gave no answer


def sort_out(
    answers: dict[str, Answer], rows: int, metrics: FanOutMetrics
) -> tuple[dict[str, list[list[float]]], dict[str, str]]:
    """Split the answers into usable predictions by name and the reasons of the services without
    one. Only checked numbers go back to the caller, never a service's body as it came. A JSON
    object without one prediction per row is counted as invalid_answer here."""
    usable: dict[str, list[list[float]]] = {}
    missing: dict[str, str] = {}
    for name, answer in answers.items():
        pairs = predictions(answer, rows)
        if pairs is not None:
            usable[name] = pairs
        elif answer.error:
            missing[name] = answer.error
        else:
            missing[name] = "answered without one prediction per row"
            metrics.failures.labels(name, "invalid_answer").inc()
    if usable and missing:
        metrics.partial_answers.inc()
    return usable, missing


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or Settings.from_env()
    registry = CollectorRegistry()
    metrics = FanOutMetrics(registry, settings.services)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # One session (one connection pool) for the life of the app, never one per request.
        app.state.fan_out = FanOut(settings, metrics)
        log.info("services: %s", settings.services)
        yield
        await app.state.fan_out.close()

    def fan_out(request: Request) -> FanOut:
        fan_out: FanOut = request.app.state.fan_out  # set by lifespan
        return fan_out

    def no_answer(missing: dict[str, str]) -> JSONResponse:
        return JSONResponse({"error": "no service answered", "missing": missing}, status_code=502)

    def all_predictions(answers: dict[str, Answer], rows: int) -> JSONResponse:
        """Every service's prediction by name; a service without one says why, in its place."""
        usable, missing = sort_out(answers, rows, metrics)
        if not usable:
            return no_answer(missing)
        return JSONResponse(
            {
                name: {"prediction": one_or_many(usable[name])}
                if name in usable
                else {"error": missing[name]}
                for name in answers
            }
        )

    async def health_all(request: Request) -> JSONResponse:
        """The health of every service, by name; always 200, a down service is part of the report.
        ---
        responses:
          "200":
            description: one entry per service
            content:
              application/json:
                schema:
                  type: object
                  additionalProperties:
                    type: object
                    required: [health]
                    properties:
                      health: {type: string, enum: [ok, down]}
                      error: {type: string}
          "401": {$ref: "#/components/responses/Unauthorized"}
        """
        answers = await fan_out(request).all("GET", "/health")
        report: dict[str, dict[str, str]] = {}
        for name, a in answers.items():
            if a.body is not None and a.body.get("health") == "ok":
                report[name] = {"health": "ok"}
            elif a.error:
                report[name] = {"health": "down", "error": a.error}
            else:
                report[name] = {"health": "down", "error": 'answered without "ok"'}
                metrics.failures.labels(name, "invalid_answer").inc()
        return JSONResponse(report)

    async def metadata(request: Request) -> JSONResponse:
        """The input this proxy takes, the services it asks (by name only) and their timeout.
        ---
        responses:
          "200":
            description: input schema, service names, timeout, output shapes
            content:
              application/json:
                schema:
                  type: object
                  required: [input, services, service_timeout_s, output]
                  properties:
                    input: {type: object}
                    services: {type: array, items: {type: string}}
                    service_timeout_s: {type: number}
                    output: {type: object}
          "401": {$ref: "#/components/responses/Unauthorized"}
        """
        return JSONResponse(
            {
                "input": INPUT_SCHEMA,
                # Names, not URLs: a caller has no business knowing the services' addresses.
                "services": list(settings.services),
                "service_timeout_s": settings.timeout_s,
                "output": {
                    "/predict": "{name: {prediction: [P(name), P(not name)]} or {error}}",
                    "/predict/label": "{prediction: {proba, label}}, plus missing: {name: error}",
                },
            }
        )

    async def ask_all(request: Request) -> tuple[list[list[float]], dict[str, Answer]]:
        rows = parse_rows(await read_body(request))  # BadInput -> 422 before any service is called
        body = json.dumps({"data": rows}).encode()  # encoded once, sent to every service
        return rows, await fan_out(request).all("POST", "/predict", body)

    async def predict(request: Request) -> JSONResponse:
        """Every service's prediction for the rows, keyed by service name.
        ---
        requestBody:
          required: true
          content:
            application/json:
              schema: {$ref: "#/components/schemas/Rows"}
        responses:
          "200": {$ref: "#/components/responses/AllPredictions"}
          "401": {$ref: "#/components/responses/Unauthorized"}
          "413": {$ref: "#/components/responses/TooLarge"}
          "422": {$ref: "#/components/responses/BadInput"}
          "502": {$ref: "#/components/responses/NoServiceAnswered"}
        """
        rows, answers = await ask_all(request)
        return all_predictions(answers, len(rows))

    async def predict_label(request: Request) -> JSONResponse:
        """For each row, the label whose service is most sure of its own class.
        ---
        requestBody:
          required: true
          content:
            application/json:
              schema: {$ref: "#/components/schemas/Rows"}
        responses:
          "200":
            description: one {proba, label} for one row, a list for several; missing names the
              services without an answer
            content:
              application/json:
                schema:
                  type: object
                  required: [prediction]
                  properties:
                    prediction:
                      oneOf:
                        - {$ref: "#/components/schemas/Label"}
                        - {type: array, items: {$ref: "#/components/schemas/Label"}}
                    missing: {type: object, additionalProperties: {type: string}}
          "401": {$ref: "#/components/responses/Unauthorized"}
          "413": {$ref: "#/components/responses/TooLarge"}
          "422": {$ref: "#/components/responses/BadInput"}
          "502": {$ref: "#/components/responses/NoServiceAnswered"}
        """
        rows, answers = await ask_all(request)
        votes, missing = sort_out(answers, len(rows), metrics)
        if not votes:
            return no_answer(missing)
        labels: list[Label] = []
        for i in range(len(rows)):
            # Each service gives P(its class); the label is the service most sure of its own class.
            best = max(votes, key=lambda name: votes[name][i][0])
            labels.append({"proba": votes[best][i][0], "label": best})
        result: LabelAnswer = {"prediction": one_or_many(labels)}
        if missing:
            result["missing"] = missing
        return JSONResponse(result)

    async def predict_get_test(request: Request) -> JSONResponse:
        """Every service's prediction for its own fixed sample row (GET /predict/test on each).
        ---
        responses:
          "200": {$ref: "#/components/responses/AllPredictions"}
          "401": {$ref: "#/components/responses/Unauthorized"}
          "502": {$ref: "#/components/responses/NoServiceAnswered"}
        """
        return all_predictions(await fan_out(request).all("GET", "/predict/test"), len(SAMPLE))

    async def predict_post_test(request: Request) -> JSONResponse:
        """Every service's prediction for the sample row, posted to each service's /predict.
        ---
        responses:
          "200": {$ref: "#/components/responses/AllPredictions"}
          "401": {$ref: "#/components/responses/Unauthorized"}
          "502": {$ref: "#/components/responses/NoServiceAnswered"}
        """
        body = json.dumps({"data": SAMPLE}).encode()
        answers = await fan_out(request).all("POST", "/predict", body)
        return all_predictions(answers, len(SAMPLE))

    routes = [
        Route("/health/all", health_all),
        Route("/metadata", metadata),
        Route("/predict", predict, methods=["POST"]),
        Route("/predict/label", predict_label, methods=["POST"]),
        Route("/predict/get/test", predict_get_test),
        Route("/predict/post/test", predict_post_test, methods=["POST"]),
    ]
    return web_app(routes, lifespan, settings.server, OPENAPI_INFO, OPENAPI_COMPONENTS, registry)


OPENAPI_INFO = {"title": "04_horizontal proxy", "version": "1"}
OPENAPI_COMPONENTS = {
    "schemas": {
        "Label": {
            "type": "object",
            "required": ["proba", "label"],
            "properties": {"proba": {"type": "number"}, "label": {"type": "string"}},
        },
    },
    "responses": {
        "AllPredictions": {
            "description": "{name: {prediction}} or {name: {error}} for each service",
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "additionalProperties": {
                            "oneOf": [
                                {
                                    "type": "object",
                                    "required": ["prediction"],
                                    "properties": {
                                        "prediction": {"$ref": "#/components/schemas/Prediction"}
                                    },
                                },
                                {"$ref": "#/components/schemas/Error"},
                            ]
                        },
                    }
                }
            },
        },
        "NoServiceAnswered": {
            "description": "no service gave a usable answer; missing says why, by name",
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["error", "missing"],
                        "properties": {
                            "error": {"type": "string"},
                            "missing": {
                                "type": "object",
                                "additionalProperties": {"type": "string"},
                            },
                        },
                    }
                }
            },
        },
    },
}


if __name__ == "__main__":
    serve(create_app, Settings.from_env())
