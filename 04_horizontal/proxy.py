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
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
from payload import INPUT_SCHEMA, SAMPLE, one_or_many, parse_rows, per_row
from serving import ServerSettings, serve, web_app
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
    services = {}
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
    server: ServerSettings

    @classmethod
    def from_env(cls) -> "Settings":
        return cls(
            services=parse_services(os.environ.get("SERVICES", DEFAULT_SERVICES)),
            timeout_s=float(os.environ.get("SERVICE_TIMEOUT_S", "1.0")),
            server=ServerSettings.from_env(default_port=9000),
        )


@dataclass(frozen=True)
class Answer:
    """What one service said: its JSON body, or why there is none."""

    body: dict | None = None
    error: str | None = None


def class_probabilities(answer: Answer, rows: int) -> list[float] | None:
    """P(the service's own class) for each row, or None when the service gave no usable answer."""
    try:
        probabilities = [float(pair[0]) for pair in per_row(answer.body["prediction"], rows)]
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    return probabilities if len(probabilities) == rows else None


class FanOut:
    """Sends one request to every service concurrently over a single, long-lived HTTP session."""

    def __init__(self, settings: Settings):
        self.services = settings.services
        self.timeout = aiohttp.ClientTimeout(total=settings.timeout_s)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=0,  # no global cap: each service gets up to limit_per_host connections
                limit_per_host=100,
                # Shorter than the services' own idle timeout (30 s), so an idle connection is
                # always dropped by us first and never reused just as the server closes it.
                keepalive_timeout=4,
            ),
            timeout=self.timeout,
            # A proxy shared by many users must not keep one service's cookies for everyone.
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        await self.session.close()

    async def all(self, method: str, path: str, body: bytes | None = None) -> dict[str, Answer]:
        answers = await asyncio.gather(
            *(self.one(url, method, path, body) for url in self.services.values())
        )
        return dict(zip(self.services, answers, strict=True))

    async def one(self, url: str, method: str, path: str, body: bytes | None) -> Answer:
        headers = {"Content-Type": "application/json"} if body is not None else None
        try:
            async with self.session.request(method, url + path, data=body, headers=headers) as r:
                raw = await r.read()
                if r.status != 200:
                    return Answer(error=f"HTTP {r.status}: {raw[:200].decode(errors='replace')}")
                return Answer(body=json.loads(raw))
        except TimeoutError:
            error = f"no answer within {self.timeout.total} s"
        except aiohttp.ClientError as exc:
            error = f"{type(exc).__name__}: {exc}"
        except ValueError:
            error = "answered with invalid JSON"
        log.warning("%s%s failed: %s", url, path, error)
        return Answer(error=error)


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: Starlette):
        # One session (one connection pool) for the life of the app, never one per request.
        app.state.fan_out = FanOut(settings)
        log.info("services: %s", settings.services)
        yield
        await app.state.fan_out.close()

    def fan_out(request: Request) -> FanOut:
        return request.app.state.fan_out

    def no_answer(missing: dict[str, str]) -> JSONResponse:
        return JSONResponse({"error": "no service answered", "missing": missing}, status_code=502)

    def all_predictions(answers: dict[str, Answer]) -> JSONResponse:
        """Every service's answer keyed by name; a service that failed says why, in its place."""
        if all(answer.error for answer in answers.values()):
            return no_answer({name: answer.error for name, answer in answers.items()})
        return JSONResponse(
            {name: a.body if a.error is None else {"error": a.error} for name, a in answers.items()}
        )

    async def health_all(request: Request) -> JSONResponse:
        # Always 200: this is a report on the services, and a down one is part of the report.
        answers = await fan_out(request).all("GET", "/health")
        return JSONResponse(
            {
                name: a.body if a.error is None else {"health": "down", "error": a.error}
                for name, a in answers.items()
            }
        )

    async def metadata(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "input": INPUT_SCHEMA,
                "services": settings.services,
                "service_timeout_s": settings.timeout_s,
                "output": {
                    "/predict": "{name: {prediction: [P(name), P(not name)]} or {error}}",
                    "/predict/label": "{prediction: {proba, label}}, plus missing: {name: error}",
                },
            }
        )

    async def ask_all(request: Request) -> tuple[list[list[float]], dict[str, Answer]]:
        rows = parse_rows(await request.body())  # BadInput -> 422 before any service is called
        body = json.dumps({"data": rows}).encode()  # encoded once, sent to every service
        return rows, await fan_out(request).all("POST", "/predict", body)

    async def predict(request: Request) -> JSONResponse:
        _, answers = await ask_all(request)
        return all_predictions(answers)

    async def predict_label(request: Request) -> JSONResponse:
        rows, answers = await ask_all(request)
        votes, missing = {}, {}
        for name, answer in answers.items():
            probabilities = class_probabilities(answer, len(rows))
            if probabilities is None:
                missing[name] = answer.error or "answered without one prediction per row"
            else:
                votes[name] = probabilities
        if not votes:
            return no_answer(missing)
        labels = []
        for i in range(len(rows)):
            # Each service gives P(its class); the label is the service most sure of its own class.
            best = max(votes, key=lambda name: votes[name][i])
            labels.append({"proba": votes[best][i], "label": best})
        result = {"prediction": one_or_many(labels)}
        if missing:
            result["missing"] = missing
        return JSONResponse(result)

    async def predict_get_test(request: Request) -> JSONResponse:
        return all_predictions(await fan_out(request).all("GET", "/predict/test"))

    async def predict_post_test(request: Request) -> JSONResponse:
        body = json.dumps({"data": SAMPLE}).encode()
        return all_predictions(await fan_out(request).all("POST", "/predict", body))

    routes = [
        Route("/health/all", health_all),
        Route("/metadata", metadata),
        Route("/predict", predict, methods=["POST"]),
        Route("/predict/label", predict_label, methods=["POST"]),
        Route("/predict/get/test", predict_get_test),
        Route("/predict/post/test", predict_post_test, methods=["POST"]),
    ]
    return web_app(routes, lifespan)


if __name__ == "__main__":
    serve(create_app, Settings.from_env())
