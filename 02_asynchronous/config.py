"""Settings from the environment (read once, in main) and one-JSON-object-per-line logging."""

import json
import logging
import logging.config
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

# The proxy's HTTP server (uvicorn with httptools, bounds added in proxy.BoundedHttpTools).
KEEP_ALIVE_TIMEOUT = 5  # seconds an idle keep-alive connection is kept open
HEADER_TIMEOUT = 10  # seconds for a request's line and headers to arrive, from its first byte
MAX_HEADER_BYTES = 64 * 1024  # request line and headers together; past it, 400
LIMIT_CONCURRENCY = 200  # connections + requests in progress; past it, uvicorn answers 503
BACKLOG = 2048  # connections the kernel queues before the server accepts them
REDIS_MAX_CONNECTIONS = LIMIT_CONCURRENCY  # one per request in progress: the pool never runs dry


@dataclass(frozen=True)
class Settings:
    # repr=False: a password in REDIS_URL, REDIS_PASSWORD or API_KEY never reaches a log line.
    redis_url: str = field(repr=False)
    redis_password: str | None = field(repr=False)  # if set, overrides one in REDIS_URL
    queue: str  # Redis key of the job queue; the worker's lists are named after it
    job_ttl: int  # seconds every job key lives after it is written
    tf_serving_host: str
    tf_serving_grpc_port: int  # the worker predicts over gRPC
    tf_serving_rest_port: int  # the proxy only asks for status and metadata, over REST
    model_name: str
    labels_path: str
    host: str
    port: int
    access_log: bool
    num_workers: int
    batch_size: int  # jobs sent to TensorFlow Serving in one Predict call
    visibility_timeout: float  # seconds a claimed job may stay unfinished before it is requeued
    predict_timeout: float  # gRPC deadline of one Predict call
    max_attempts: int  # inference attempts per job before it is marked failed
    retry_backoff: float  # first retry delay in seconds; doubles per attempt
    max_queue: int  # jobs waiting in the queue past which POST /predict answers 429
    max_claims: int  # times a job may be taken by a worker that dies or hangs, then it fails
    api_key: str | None = field(repr=False)  # if set, every endpoint but /health needs it
    log_level: str
    metrics_port: int  # the worker's Prometheus page (the proxy serves GET /metrics on PORT)
    # prometheus-client's multiprocess directory (NUM_WORKERS > 1); None: a temporary one.
    metrics_dir: Path | None
    metrics: bool  # METRICS=0 leaves the proxy's HTTP middleware out (to measure its cost)

    @classmethod
    def from_env(cls) -> "Settings":
        env = os.environ.get
        default_redis = (
            f"redis://{env('REDIS_HOST', '127.0.0.1')}:{env('REDIS_PORT', '6379')}"
            f"/{env('REDIS_DB', '0')}"
        )
        return cls(
            redis_url=env("REDIS_URL", default_redis),
            redis_password=env("REDIS_PASSWORD") or None,
            queue=env("QUEUE_NAME", "queue:predict"),
            job_ttl=int(env("JOB_TTL", "86400")),
            tf_serving_host=env("TF_SERVING_HOST", "127.0.0.1"),
            tf_serving_grpc_port=int(env("TF_SERVING_GRPC_PORT", "8500")),
            tf_serving_rest_port=int(env("TF_SERVING_REST_PORT", "8501")),
            model_name=env("MODEL_NAME", "iris"),
            labels_path=env("LABELS_PATH", "../models/label.json"),
            host=env("HOST", "127.0.0.1"),
            port=int(env("PORT", "8000")),
            access_log=env("ACCESS_LOG", "1") not in ("0", "false", "no"),
            num_workers=int(env("NUM_WORKERS", "1")),
            batch_size=int(env("BATCH_SIZE", "32")),
            visibility_timeout=float(env("VISIBILITY_TIMEOUT", "30")),
            predict_timeout=float(env("PREDICT_TIMEOUT", "5")),
            max_attempts=int(env("MAX_ATTEMPTS", "3")),
            retry_backoff=float(env("RETRY_BACKOFF", "0.2")),
            max_queue=int(env("MAX_QUEUE", "10000")),
            max_claims=int(env("MAX_CLAIMS", "3")),
            api_key=env("API_KEY") or None,
            log_level=env("LOG_LEVEL", "INFO").upper(),
            metrics_port=int(env("METRICS_PORT", "8001")),
            metrics_dir=Path(directory) if (directory := env("PROMETHEUS_MULTIPROC_DIR")) else None,
            metrics=env("METRICS", "1") != "0",
        )


# Attributes every LogRecord has; anything else came from `extra=` and goes into the JSON.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    converter = staticmethod(time.gmtime)  # timestamps in UTC, as the trailing Z says

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def log_config(level: str) -> dict:
    """dictConfig for our loggers and uvicorn's: JSON lines on stdout."""
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
        "root": {"handlers": ["stdout"], "level": level},
        "loggers": {
            "uvicorn": {"level": level},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"level": level},
        },
    }


def setup_logging(level: str) -> None:
    logging.config.dictConfig(log_config(level))
