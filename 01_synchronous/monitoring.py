"""TensorFlow Serving's monitoring: its own metrics, by its names, on its own endpoint.

As in TensorFlow Serving, `--monitoring_config_file` names a text-format MonitoringConfig
(tensorflow_serving/config/monitoring_config.proto):

    prometheus_config { enable: true, path: "/monitoring/prometheus/metrics" }

and the REST port then answers that path (an empty path means that one) in Prometheus' text
format. The names, labels, units (microseconds) and bucket limits are TensorFlow Serving's, read
from its source: servables/tensorflow/util.cc (request_count, request_latency),
batching/batching_session.cc (the batching queue), util/prometheus_exporter.cc (how a name such
as /tensorflow/serving/request_count becomes :tensorflow:serving:request_count). So a dashboard
built on the stand-in works against tensorflow/serving too.

prometheus-client writes the page (a custom collector: its Counter and Histogram cannot carry
':' names without adding `_total`, nor TensorFlow's buckets). The one difference it imposes: a
counter's `# TYPE` line names `..._total` while the sample keeps TensorFlow's name; PromQL only
ever sees the samples, which are the same. Everything here runs on the server's one event loop
(REST, gRPC and the batch loop share it), so the counts need no lock.
"""

from __future__ import annotations

import re
import time
from bisect import bisect_right
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from google.protobuf.message import Message as ProtoMessage
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client import Histogram as PromHistogram
from prometheus_client.core import HistogramMetricFamily, Metric
from servable import ServingError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

DEFAULT_PATH = "/monitoring/prometheus/metrics"  # PrometheusExporter::kPrometheusPath
# http_request_duration_seconds: a predict takes about a millisecond here.
HTTP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# The method label takes these values or "other": a client must not be able to add series.
METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))


def monitoring_config_class() -> type[ProtoMessage]:
    """tensorflow.serving.MonitoringConfig, built from its two messages (tensorflow-serving-api
    does not ship monitoring_config_pb2), so the file parses exactly as TensorFlow Serving's
    ParseProtoTextFile does: protobuf's text format, unknown fields refused."""
    file = descriptor_pb2.FileDescriptorProto(
        name="tensorflow_serving/config/monitoring_config.proto",
        package="tensorflow.serving",
        syntax="proto3",
    )
    field = descriptor_pb2.FieldDescriptorProto
    prometheus = file.message_type.add(name="PrometheusConfig")
    prometheus.field.add(name="enable", number=1, type=field.TYPE_BOOL, label=field.LABEL_OPTIONAL)
    prometheus.field.add(name="path", number=2, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL)
    file.message_type.add(name="MonitoringConfig").field.add(
        name="prometheus_config",
        number=1,
        type=field.TYPE_MESSAGE,
        type_name=".tensorflow.serving.PrometheusConfig",
        label=field.LABEL_OPTIONAL,
    )
    pool = descriptor_pool.DescriptorPool()  # its own pool: nothing else named tensorflow.serving
    pool.Add(file)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("tensorflow.serving.MonitoringConfig")
    )


def metrics_path(config_file: str) -> str | None:
    """The path to serve the metrics on, or None when the file does not enable Prometheus."""
    # A class built at run time: its fields (prometheus_config...) have no static types.
    config: Any = monitoring_config_class()()
    try:
        text_format.Parse(Path(config_file).read_text(), config)
    except text_format.ParseError as exc:
        raise ValueError(f"{config_file}: {exc}") from None
    if not config.prometheus_config.enable:
        return None
    return config.prometheus_config.path or DEFAULT_PATH


def prometheus_name(name: str) -> str:
    """GetPrometheusMetricName: every character outside [a-zA-Z0-9_] becomes ':'."""
    name = re.sub(r"[^a-zA-Z0-9_]", ":", name)
    return "_" + name if name[:1].isdigit() else name


def exponential_buckets(scale: float, growth_factor: float, count: int) -> list[float]:
    """monitoring::Buckets::Exponential: scale, scale*growth, ... (count limits), then +Inf."""
    limits, bound = [], scale
    for _ in range(count):
        limits.append(bound)
        bound *= growth_factor  # multiplied step by step, as TensorFlow does: the same floats
    return limits


class Counter:
    """monitoring::Counter: an integer per combination of label values."""

    def __init__(self, name: str, description: str, *labels: str):
        self.name, self.description, self.labels = prometheus_name(name), description, labels
        self.cells: dict[tuple[str, ...], int] = {}

    def increment(self, *values: str) -> None:
        self.cells[values] = self.cells.get(values, 0) + 1

    def family(self) -> Metric:
        family = Metric(self.name, self.description, "counter")
        for values, count in self.cells.items():
            family.add_sample(self.name, dict(zip(self.labels, values, strict=True)), count)
        return family


@dataclass
class _Cell:
    """One combination of label values in a Sampler: a count per bucket, and the samples' sum."""

    counts: list[int]
    total: int = 0


class Sampler:
    """monitoring::Sampler: a histogram of integer samples. A value falls in the first bucket
    whose limit is *above* it (TensorFlow's Histogram uses upper_bound, so a value equal to a
    limit counts in the next bucket up), and each `le` is the limit as TensorFlow prints it."""

    def __init__(self, name: str, description: str, labels: tuple[str, ...], limits: list[float]):
        self.name, self.description, self.labels = prometheus_name(name), description, labels
        self.limits = limits
        self.le = [f"{limit:.6g}" for limit in limits] + ["+Inf"]  # absl::StrCat(double)
        self.cells: dict[tuple[str, ...], _Cell] = {}

    def add(self, values: tuple[str, ...], sample: int) -> None:
        cell = self.cells.get(values)
        if cell is None:
            cell = self.cells[values] = _Cell([0] * len(self.le))
        cell.counts[bisect_right(self.limits, sample)] += 1
        cell.total += sample

    def family(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.description, labels=self.labels)
        for values, cell in self.cells.items():
            cumulative, buckets = 0, []
            for le, count in zip(self.le, cell.counts, strict=True):
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric(list(values), buckets, cell.total)
        return family


def microseconds_since(started: float) -> int:
    return int((time.perf_counter() - started) * 1_000_000)


class ServingMetrics:
    """The metrics TensorFlow Serving records for a model, recorded where it records them. A
    prometheus-client collector: register it in the app's CollectorRegistry.

    Only the served model's name becomes a label value. TensorFlow Serving also counts requests
    for models it does not have, under whatever name the client sent; here those are left to
    http_requests_total (their route template), so no client can create series."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        # servables/tensorflow/util.cc
        self.request_count = Counter(
            "/tensorflow/serving/request_count",
            "The total number of requests.",
            "model_name",
            "status",
        )
        self.request_latency = Sampler(
            "/tensorflow/serving/request_latency",
            "Distribution of wall time (in microseconds) for Tensorflow Serving request.",
            ("model_name", "API", "entrypoint"),
            exponential_buckets(10, 1.8, 33),  # 10 us to ~20 minutes
        )
        # batching/batching_session.cc: TensorFlow Serving has no gauge of the queue's length;
        # the time each request waited in it is its measure of the queue.
        self.queuing_latency = Sampler(
            "/tensorflow/serving/batching_session/queuing_latency",
            "Distribution of wall time spent (in microseconds) in queuing",
            ("thread_pool_name",),
            exponential_buckets(100, 1.2, 52),  # 100 us to ~1 second
        )
        self.wrapped_run_count = Counter(
            "/tensorflow/serving/batching_session/wrapped_run_count",
            "Total count of run calls on the wrapped session",
        )

    @contextmanager
    def request(self, model_name: str, api: str, entrypoint: str) -> Iterator[None]:
        """One Predict call: counted with its final status (the gRPC code's name, OK included),
        timed only when it succeeds, as prediction_service_impl.cc does. api and entrypoint are
        TensorFlow Serving's values: "Predict"/"GRPC", or the URL's verb ("predict")/"REST"."""
        started, status = time.perf_counter(), "UNKNOWN"
        try:
            yield
            status = "OK"
        except ServingError as exc:
            status = exc.code.name
            raise
        finally:
            if model_name == self.model_name:
                self.request_count.increment(model_name, status)
                if status == "OK":
                    latency = microseconds_since(started)
                    self.request_latency.add((model_name, api, entrypoint), latency)

    def batch_ran(self, enqueued: list[float], dequeued: float) -> None:
        """A batch was taken from the queue (enqueue times of its requests, perf_counter) and run.
        The model server's batching sessions have an empty thread_pool_name."""
        for started in enqueued:
            self.queuing_latency.add(("",), int((dequeued - started) * 1_000_000))
        self.wrapped_run_count.increment()

    def collect(self) -> Iterator[Metric]:
        for metric in (
            self.request_count,
            self.request_latency,
            self.queuing_latency,
            self.wrapped_run_count,
        ):
            yield metric.family()


class HttpMetrics:
    """http_requests_total and http_request_duration_seconds for every REST request (pure ASGI),
    by method, route template ("/v1/models/{model_name}:predict", never the model name or the
    raw path) and status; a path no route matches is "unmatched". TensorFlow Serving has no
    such metrics: they are the stand-in's own, for the REST routes TensorFlow Serving's
    request_count does not cover (status, metadata, malformed paths, unknown models)."""

    def __init__(self, app: ASGIApp, registry: CollectorRegistry):
        self.app = app
        self.requests = PromCounter(
            "http_requests_total",
            "HTTP requests answered, by method, route template and status",
            ["method", "route", "status"],
            registry=registry,
        )
        self.duration = PromHistogram(
            "http_request_duration_seconds",
            "Time from a request's arrival to its last response byte, by method and route",
            ["method", "route"],
            registry=registry,
            buckets=HTTP_BUCKETS,
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
            route = route_template(scope)
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


def route_template(scope: Scope) -> str:
    """The matched route's template: Starlette's router leaves the route it chose (a full
    match, or one that matched by path only: a 405) in the scope."""
    route: Route | None = scope.get("route")  # every route of the app is a Route
    return route.path if route is not None else "unmatched"


def metrics_endpoint(registry: CollectorRegistry) -> Callable[[Request], Awaitable[Response]]:
    """The page at the configured path, for any method, as TensorFlow Serving's handler."""

    async def metrics(request: Request) -> Response:
        # On the event loop, like every metric update: the page is one consistent snapshot.
        # The classic text format (0.0.4), which every Prometheus 2 and 3 parses; TensorFlow
        # Serving sends the same format as plain "text/plain".
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_PLAIN_0_0_4)

    return metrics
