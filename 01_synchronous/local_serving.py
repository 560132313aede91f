"""A stand-in for tensorflow_model_server: the same flags, REST and gRPC APIs, one process.

TensorFlow Serving's binary is not on PyPI, apt or npm, so without Docker this file serves the
same SavedModel with TensorFlow itself:

    python local_serving.py --port=8500 --rest_api_port=8501 \\
        --model_name=iris --model_base_path=../models/iris [--enable_batching]

It is ready when `GET /v1/models/iris` reports state AVAILABLE. Flags default to environment
variables, read once here: PORT (gRPC), REST_API_PORT, and as in the tensorflow/serving image
MODEL_NAME and MODEL_BASE_PATH (the directory holding the model's directory; the image's
entrypoint turns its GRPC_PORT and PORT, for REST, into flags). HOST (default 127.0.0.1) is the
address both servers bind; containers pass 0.0.0.0.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import logging.config
import os
import signal
import sys
import time

import uvicorn
from batching import BatchingParameters, Scheduler
from grpc_api import create_server
from monitoring import ServingMetrics, metrics_path
from rest_api import create_app
from servable import Servable
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("local_serving")

# uvicorn's bounds for the REST server. A connection idle after an answer is closed after
# KEEP_ALIVE_SECONDS (uvicorn's default 5, long enough for a client's next request). At most
# MAX_CONNECTIONS connections or running requests at once: past that uvicorn answers 503 at
# once, so slow or idle clients cannot pile up (the bench uses 50; 200 leaves four times that).
KEEP_ALIVE_SECONDS = 5
MAX_CONNECTIONS = 200
BACKLOG = 256  # connections the kernel queues before accept(); uvicorn's default is 2048
# A request's line and headers must arrive within this many seconds of the connection opening
# (or of the request's first byte). uvicorn has no such timeout of its own, so a client sending
# one header byte every few seconds would hold its connection forever.
HEADER_TIMEOUT_SECONDS = 10
# Bytes received before a request's headers are complete. httptools keeps every header byte
# (uvicorn's h11_max_incomplete_event_size bounds only the h11 parser). Above asyncio's 256 KiB
# read, so a first read holding headers and the start of a body is never mistaken for it.
MAX_HEADER_BYTES = 1024 * 1024


class BoundedHeadersProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, closing a connection whose headers take too long or too
    many bytes (the headers' phase is when the deadline is armed)."""

    _header_deadline: asyncio.TimerHandle | None = None
    _header_bytes = 0

    def data_received(self, data: bytes) -> None:
        if self._header_deadline is not None:
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES:
                self.transport.close()
                return
        super().data_received(data)

    def _arm(self) -> None:
        if self._header_deadline is None:
            self._header_bytes = 0
            self._header_deadline = self.loop.call_later(
                HEADER_TIMEOUT_SECONDS,
                self.timeout_keep_alive_handler,  # closes the transport
            )

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def connection_made(  # type: ignore[override]  # uvicorn's own narrowing to a Transport
        self, transport: asyncio.Transport
    ) -> None:
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: {"time", "level", "logger", "message"}."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


LOG_CONFIG = {
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
    "root": {"handlers": ["stdout"], "level": "INFO"},
    "loggers": {
        "uvicorn": {"handlers": [], "propagate": True},
        "uvicorn.error": {"handlers": [], "propagate": True},
        # One line per request at 1,500 requests/s would cost more than the request itself.
        "uvicorn.access": {"handlers": [], "propagate": False},
    },
}


def flag_bool(text: str) -> bool:
    return text.lower() in ("1", "true", "yes", "")


def parse_flags(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--host", default=env.get("HOST", "127.0.0.1"), help="address both servers bind"
    )
    parser.add_argument(
        "--port", type=int, default=int(env.get("PORT", "8500")), help="port for the gRPC API"
    )
    parser.add_argument(
        "--rest_api_port",
        type=int,
        default=int(env.get("REST_API_PORT", "8501")),
        help="port for the HTTP/REST API (0 disables it)",
    )
    model_name = env.get("MODEL_NAME", "iris")
    parser.add_argument("--model_name", default=model_name)
    parser.add_argument(
        "--model_base_path",
        # As in the tensorflow/serving image: $MODEL_BASE_PATH/$MODEL_NAME.
        default=os.path.join(env.get("MODEL_BASE_PATH", "../models"), model_name),
        help="directory holding numbered version directories",
    )
    parser.add_argument(
        "--enable_batching",
        type=flag_bool,
        nargs="?",
        const=True,
        default=False,
        help="merge concurrent requests into one model call",
    )
    parser.add_argument(
        "--batching_parameters_file",
        default="",
        help="ascii BatchingParameters proto, e.g. max_batch_size { value: 64 }",
    )
    parser.add_argument(
        "--monitoring_config_file",
        default="",
        help='ascii MonitoringConfig proto: prometheus_config { enable: true, path: "..." }',
    )
    return parser.parse_args(argv)


async def serve(flags: argparse.Namespace) -> None:
    # Read before the model loads: a wrong file stops the server at once.
    path = metrics_path(flags.monitoring_config_file) if flags.monitoring_config_file else None
    servable = Servable.load(flags.model_name, flags.model_base_path)
    # TensorFlow leaves millions of long-lived objects; a full garbage collection walking them
    # stalls every request for tens of ms. Freezing them keeps collections short (p99 latency).
    gc.freeze()
    params = None
    if flags.enable_batching:
        params = (
            BatchingParameters.from_file(flags.batching_parameters_file)
            if flags.batching_parameters_file
            else BatchingParameters()
        )
    log.info(
        "loaded model %s version %d from %s; batching %s",
        servable.name,
        servable.version,
        flags.model_base_path,
        params or "off",
    )
    # Recorded whether or not they are exported, as TensorFlow Serving does.
    metrics = ServingMetrics(servable.name)
    scheduler = Scheduler(servable.run, params, metrics)
    await scheduler.start()
    grpc_server = create_server(servable, scheduler, metrics, flags.host, flags.port)
    await grpc_server.start()
    log.info("gRPC API on %s:%d", flags.host, flags.port)
    if path and flags.rest_api_port:
        log.info("Prometheus metrics on the REST port at %s", path)
    rest_server = None
    if flags.rest_api_port:
        config = uvicorn.Config(
            create_app(servable, scheduler, metrics, path),
            host=flags.host,
            port=flags.rest_api_port,
            log_config=LOG_CONFIG,
            # The compiled parser (httptools): h11, pure Python, halves the throughput.
            http=BoundedHeadersProtocol,
            access_log=False,
            lifespan="off",
            timeout_keep_alive=KEEP_ALIVE_SECONDS,
            limit_concurrency=MAX_CONNECTIONS,
            backlog=BACKLOG,
        )
        rest_server = uvicorn.Server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if rest_server:
            rest_task = asyncio.create_task(rest_server.serve())
            await asyncio.wait(
                [rest_task, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED
            )
            rest_server.should_exit = True
            await rest_task
        else:
            await stop.wait()
    finally:
        await grpc_server.stop(grace=1)
        await scheduler.stop()
        if scheduler.batches:
            log.info(
                "batching: %d requests in %d model calls (%.1f per call)",
                scheduler.batched_requests, scheduler.batches,
                scheduler.batched_requests / scheduler.batches,
            )  # fmt: skip
        log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    logging.config.dictConfig(LOG_CONFIG)
    flags = parse_flags(argv)
    try:
        # Plain asyncio, not uvloop: grpc.aio shares this loop and measured slower on uvloop.
        asyncio.run(serve(flags))
    except (FileNotFoundError, ValueError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
