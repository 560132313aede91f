"""What the service and the proxy share: settings, JSON logs on stdout, the app shell, uvicorn."""

import json
import logging
import os
from dataclasses import dataclass

import uvicorn
from payload import BadInput
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route


@dataclass(frozen=True)
class ServerSettings:
    host: str
    port: int
    log_level: str
    access_log: bool

    @classmethod
    def from_env(cls, default_port: int) -> "ServerSettings":
        return cls(
            host=os.environ.get("HOST", "127.0.0.1"),
            port=int(os.environ.get("PORT", default_port)),
            log_level=os.environ.get("LOG_LEVEL", "info").lower(),
            access_log=os.environ.get("ACCESS_LOG", "1") not in ("0", "false", "no"),
        )


class JsonFormatter(logging.Formatter):
    """One JSON object per line, so logs can be read by a collector as well as by a person."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
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


def log_config(level: str) -> dict:
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


def serve(create_app, settings) -> None:
    """Run create_app(settings) under uvicorn; settings.server says where and how to log."""
    server = settings.server
    uvicorn.run(
        create_app(settings),
        host=server.host,
        port=server.port,
        log_config=log_config(server.log_level),
        log_level=server.log_level,
        access_log=server.access_log,
        # Named, not "auto": the same parser and loop in the venv, in Docker and in the bench.
        http="httptools",
        loop="uvloop",
        # Longer than the proxy's idle keep-alive (4 s), so the proxy never reuses a connection
        # that the service is closing at that very moment.
        timeout_keep_alive=30,
    )


async def bad_input(request, exc: Exception) -> JSONResponse:
    """Starlette exception handler for payload.BadInput: a clear 422, never a 500."""
    return JSONResponse({"error": str(exc)}, status_code=422)


async def health(request) -> JSONResponse:
    return JSONResponse({"health": "ok"})


def web_app(routes: list, lifespan) -> Starlette:
    """A Starlette app with /health and this chapter's one error shape for bad input."""
    return Starlette(
        routes=[Route("/health", health), *routes],
        lifespan=lifespan,
        exception_handlers={BadInput: bad_input},
    )
