"""Settings for the proxy and the worker, read once from the environment at start-up."""

import os
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _path(name: str, default: str) -> Path:
    """A path from the environment; relative defaults are relative to this chapter."""
    value = os.environ.get(name)
    return Path(value) if value else HERE / default


@dataclass(frozen=True)
class Settings:
    host: str
    port: int
    max_concurrency: int
    body_timeout: float
    api_key: str | None = field(repr=False)
    # A password comes in REDIS_URL or, better, in REDIS_PASSWORD; neither is ever shown (repr).
    redis_url: str = field(repr=False)
    redis_password: str | None = field(repr=False)
    redis_timeout: float
    queue_name: str
    sync_model_path: Path
    async_model_path: Path
    labels_path: Path
    sample_image_path: Path
    max_image_bytes: int
    max_image_pixels: int
    decode_threads: int
    result_ttl: int
    max_queue_length: int
    num_workers: int
    visibility_timeout: float
    max_attempts: int
    worker_nice: int
    metrics_port: int
    # prometheus-client's multiprocess directory; None: the supervisor makes a temporary one.
    metrics_dir: Path | None
    metrics: bool  # METRICS=0 leaves the proxy's HTTP middleware out (to measure its cost)
    log_level: str

    @classmethod
    def from_env(cls) -> "Settings":
        env = os.environ.get
        metrics_dir = env("PROMETHEUS_MULTIPROC_DIR")
        return cls(
            host=env("HOST", "127.0.0.1"),  # 0.0.0.0 only in a container (compose.yaml)
            port=int(env("PORT", "8000")),
            max_concurrency=int(env("MAX_CONCURRENCY", "32")),
            body_timeout=float(env("BODY_TIMEOUT", "60")),
            api_key=env("API_KEY") or None,
            redis_url=env("REDIS_URL", "redis://127.0.0.1:6379/5"),
            redis_password=env("REDIS_PASSWORD") or None,
            redis_timeout=float(env("REDIS_TIMEOUT", "2")),
            queue_name=env("QUEUE_NAME", "queue:jobs"),
            sync_model_path=_path("SYNC_MODEL_PATH", "../models/imagenet/efficientnet_lite0.onnx"),
            async_model_path=_path("ASYNC_MODEL_PATH", "../models/imagenet/resnet50.onnx"),
            labels_path=_path("LABELS_PATH", "../models/imagenet/labels.json"),
            sample_image_path=_path("SAMPLE_IMAGE_PATH", "samples/chelsea.jpg"),
            max_image_bytes=int(env("MAX_IMAGE_BYTES", str(5 * 1024 * 1024))),
            max_image_pixels=int(env("MAX_IMAGE_PIXELS", str(10_000_000))),
            decode_threads=int(env("DECODE_THREADS", "2")),
            result_ttl=int(env("RESULT_TTL", "3600")),
            max_queue_length=int(env("MAX_QUEUE_LENGTH", "1000")),
            num_workers=int(env("NUM_WORKERS", "2")),
            visibility_timeout=float(env("VISIBILITY_TIMEOUT", "30")),
            max_attempts=int(env("MAX_ATTEMPTS", "3")),
            worker_nice=int(env("WORKER_NICE", "10")),
            metrics_port=int(env("METRICS_PORT", "8001")),
            metrics_dir=Path(metrics_dir) if metrics_dir else None,
            metrics=env("METRICS", "1") != "0",
            log_level=env("LOG_LEVEL", "INFO").upper(),
        )
