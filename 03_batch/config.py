"""Settings for the API and the job: read from the environment once, at start-up, in one place.

The limits below are constants, not settings: each one is documented in the README's failure table.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

# Without Docker the models sit next to the chapter; compose mounts them at /models instead.
MODELS_DIR = Path(__file__).resolve().parent.parent / "models"

# API: what one request may ask for.
MAX_ITEMS = 10_000  # rows in one POST /data/list
# 10,000 items of 4 full-precision float32 numbers are about 1.1 MB of JSON; the body is cut off
# while it streams in past this size, so json.loads never sees more than ~1 million tokens.
MAX_BODY = 2 * 1024 * 1024  # bytes
PAGE_DEFAULT, PAGE_MAX = 100, 1_000  # rows per listing page

# API server (uvicorn): slow or idle clients cannot hold the server.
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this many seconds
MAX_HEADER_BYTES = 16 * 1024  # the request line and headers, bounded by h11 while they arrive
MAX_CONNECTIONS = 200  # open connections plus requests in flight; past it uvicorn answers 503
BACKLOG = 128  # connections the kernel queues before uvicorn accepts them

# Job: a chunk that meets a transient database error (deadlock, lock wait timeout, lost
# connection) is rolled back and tried again, at most this many times in a row; then the run fails.
CHUNK_ATTEMPTS = 5
RETRY_DELAY_S = 0.2  # doubled after each failed attempt: 0.2, 0.4, 0.8, 1.6 s
LOCK_WAIT_S = 5  # a chunk waits this long for a lock held by someone else, then is retried

# Metrics: a scrape of the API's /metrics waits at most this long for each of its two table
# queries (connect, and the query on the server); past it the table gauges are left out.
METRICS_QUERY_TIMEOUT_S = 2


@dataclass(frozen=True)
class Settings:
    mysql_host: str = "127.0.0.1"
    mysql_port: int = 3306
    mysql_user: str = "root"
    mysql_password: str = field(default="", repr=False)  # never in a log line or traceback
    mysql_database: str = "sample_db"
    model_filepath: str = str(MODELS_DIR / "iris_svc.onnx")
    label_filepath: str = str(MODELS_DIR / "label.json")
    host: str = "127.0.0.1"  # API; the image sets 0.0.0.0 (every address of its container)
    port: int = 8000  # API
    # API: when set, every endpoint but /health and /openapi.json needs "Bearer <api_key>".
    api_key: str = field(default="", repr=False)
    interval: float = 60.0  # job: seconds between runs (the first run waits one interval too)
    chunk_size: int = 5000  # job: rows claimed, predicted and written per transaction
    threads: int = 4  # job: chunks in flight at once in one process
    # job, loop mode: its Prometheus metrics on this port (0: none; never with --once)
    metrics_port: int = 8001
    metrics: bool = True  # API: METRICS=0 leaves out the HTTP middleware (bench.py compares)

    @classmethod
    def from_env(cls) -> "Settings":
        env = os.environ
        d = cls()
        return cls(
            mysql_host=env.get("MYSQL_HOST", d.mysql_host),
            mysql_port=int(env.get("MYSQL_PORT", d.mysql_port)),
            mysql_user=env.get("MYSQL_USER", d.mysql_user),
            mysql_password=env.get("MYSQL_PASSWORD", d.mysql_password),
            mysql_database=env.get("MYSQL_DATABASE", d.mysql_database),
            model_filepath=env.get("MODEL_FILEPATH", d.model_filepath),
            label_filepath=env.get("LABEL_FILEPATH", d.label_filepath),
            host=env.get("HOST", d.host),
            port=int(env.get("PORT", d.port)),
            api_key=env.get("API_KEY", d.api_key),
            interval=float(env.get("INTERVAL", d.interval)),
            chunk_size=int(env.get("CHUNK_SIZE", d.chunk_size)),
            threads=int(env.get("THREADS", d.threads)),
            metrics_port=int(env.get("METRICS_PORT", d.metrics_port)),
            metrics=env.get("METRICS", "1") != "0",
        )
