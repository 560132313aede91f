"""TensorFlow Serving's REST API (port 8501) over a Servable, as a Starlette app.

URLs are matched with TensorFlow Serving's own regular expressions, so the same paths succeed
and fail here as there. Every error is `{"error": "..."}` with the HTTP status TensorFlow Serving
maps the gRPC code to (INVALID_ARGUMENT and FAILED_PRECONDITION 400, NOT_FOUND 404).
"""

from __future__ import annotations

import json
import math
import re
import struct
import zlib
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
from batching import Scheduler
from monitoring import HttpMetrics, ServingMetrics, metrics_endpoint
from prometheus_client import CollectorRegistry
from servable import Servable, ServingError, invalid
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.schemas import SchemaGenerator

PREDICT_PATH = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)",
    re.IGNORECASE,
)
STATUS_PATH = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?",
    re.IGNORECASE,
)
_FLOAT32 = struct.Struct("f")  # rounds a Python float to float32, to test a round-trip
# A request body, as sent and after gzip decoding, is refused past this while it streams in.
# Room for 500,000 rows at float32's full precision (66 bytes a row), 1.5 million as short
# decimals; json.loads turns 29 MiB of such rows into ~320 MB of Python objects, which is why
# the cap is not higher. TensorFlow Serving caps only gzip bodies (kMaxUncompressedBytes, 100 MiB).
MAX_BODY_BYTES = 32 * 1024 * 1024
INT64_MAX = 2**63 - 1
Json = dict[str, Any]  # a JSON object as json.loads returns it
Nested = float | list["Nested"]  # a tensor's values as ndarray.tolist() returns them
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 413,  # only for a body over MAX_BODY_BYTES
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.UNIMPLEMENTED: 501,
}


# ---- JSON <-> tensors ------------------------------------------------------------------------


def to_array(value: object, where: str) -> np.ndarray:
    """A nested JSON list of numbers -> ndarray; ragged lists, strings, bools and null fail."""
    try:
        array = np.array(value)
    except ValueError as exc:  # ragged nesting
        raise invalid(f"{where}: lists of unequal length ({exc})") from None
    if array.dtype.kind not in "iuf":
        raise invalid(
            f"{where}: JSON Value: {json.dumps(value)[:80]} is not of expected type: float"
        )
    return array


def load_body(body: bytes) -> tuple[Json, str]:
    """The request object and its signature_name, with json_tensor.cc's checks."""
    if not body:
        raise invalid("JSON Parse error: The document is empty")
    try:
        doc = json.loads(body)  # Python's json accepts NaN and Infinity, as TF Serving does
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid(f"JSON Parse error: {exc}") from None
    except RecursionError:  # thousands of nested lists: refused, not a crash
        raise invalid("JSON Parse error: nested too deeply") from None
    if not isinstance(doc, dict):
        raise invalid("JSON Value: request body Is not object")
    signature_name = doc.get("signature_name", "")
    if not isinstance(signature_name, str):
        raise invalid("'signature_name' key must be a string value.")
    return doc, signature_name


def parse_inputs(doc: Json, input_names: list[str]) -> tuple[dict[str, np.ndarray], bool]:
    """Row (`instances`) or columnar (`inputs`) format -> ({name: array}, row_format)."""
    if "instances" in doc and "inputs" in doc:
        raise invalid("Not formatted correctly expecting only one of 'inputs' or 'instances' keys")
    if "instances" in doc:
        instances = doc["instances"]
        if not isinstance(instances, list):
            raise invalid("Excepting 'instances' to be an list/array")
        if not instances:
            raise invalid("No values in 'instances' array")
        if all(isinstance(i, dict) for i in instances):  # one object per row, one key per input
            names = set(instances[0])
            if any(set(i) != names for i in instances):
                raise invalid("every object in 'instances' must have the same keys")
            columns = {n: to_array([i[n] for i in instances], f"instances.{n}") for n in names}
            return columns, True
        if len(input_names) != 1:
            raise invalid("instances is a plain list, but expecting list of objects")
        return {input_names[0]: to_array(instances, "instances")}, True
    if "inputs" in doc:
        inputs = doc["inputs"]
        if isinstance(inputs, dict):  # other names are ignored, as json_tensor.cc does
            missing = next((n for n in input_names if n not in inputs), None)
            if missing:
                raise invalid(f"Missing named input: {missing} in 'inputs' object.")
            return {n: to_array(inputs[n], f"inputs.{n}") for n in input_names}, False
        if len(input_names) != 1:
            raise invalid("inputs is a plain value/list, but expecting an object")
        return {input_names[0]: to_array(inputs, "inputs")}, False
    raise invalid("Missing 'inputs' or 'instances' key")


def float_json(value: float) -> str:
    """Floats as TensorFlow Serving writes them: 6 significant digits, 9 if 6 do not round-trip."""
    if not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    text = f"{value:g}"
    if _FLOAT32.unpack(_FLOAT32.pack(float(text)))[0] != value:
        text = f"{value:.9g}"
    return text if ("." in text or "e" in text) else text + ".0"


def _json_value(value: Nested) -> str:
    if isinstance(value, list):
        return "[" + ",".join(map(_json_value, value)) + "]"
    return float_json(value)


def tensor_json(array: np.ndarray) -> str:
    """A tensor as nested JSON lists; float32 values exactly as TensorFlow Serving prints them."""
    if array.dtype.kind == "f":
        return _json_value(array.astype(np.float32).tolist())
    return json.dumps(array.tolist())


def predict_json(outputs: dict[str, np.ndarray], row_format: bool) -> str:
    """One output: its tensor. Several: objects per row (row format) or per name (columnar)."""
    if len(outputs) == 1:
        return tensor_json(next(iter(outputs.values())))
    if row_format:
        rows = len(next(iter(outputs.values())))
        objects = (
            "{" + ",".join(f"{json.dumps(k)}:{tensor_json(v[i])}" for k, v in outputs.items()) + "}"
            for i in range(rows)
        )
        return "[" + ",".join(objects) + "]"
    return "{" + ",".join(f"{json.dumps(k)}:{tensor_json(v)}" for k, v in outputs.items()) + "}"


# ---- endpoints -------------------------------------------------------------------------------


def pretty(document: Json) -> Response:
    """Status and metadata indented as TensorFlow Serving prints them (one space per level)."""
    return Response(json.dumps(document, indent=1), media_type="application/json")


def version_number(text: str | None) -> int | None:
    """A URL's version as int64, refused with TensorFlow Serving's wording (absl::SimpleAtoi)."""
    if text is None:
        return None
    if len(text) > 19 or int(text) > INT64_MAX:  # int() of 5,000 digits would raise
        raise invalid(f"Failed to convert version: {text} to numeric.")
    return int(text)


async def read_body(request: Request) -> bytes:
    """The body, gunzipped if Content-Encoding says gzip (as TensorFlow Serving does), refused
    as soon as it passes MAX_BODY_BYTES, sent or decoded: a gzip bomb stops at the limit too."""
    too_large = ServingError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, f"request body larger than {MAX_BODY_BYTES} bytes"
    )
    length = request.headers.get("content-length", "")
    if length.isdigit() and (len(length) > 12 or int(length) > MAX_BODY_BYTES):
        raise too_large  # refused before a byte of the body is read
    gunzip = None
    if "gzip" in request.headers.get("content-encoding", ""):
        gunzip = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            if gunzip:  # at most one byte past the limit is ever decoded
                chunk = gunzip.decompress(chunk, MAX_BODY_BYTES - size + 1)
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise too_large
            chunks.append(chunk)
    except zlib.error as exc:
        raise invalid(f"gzip body cannot be decoded: {exc}") from None
    if gunzip and not gunzip.eof:
        raise invalid("gzip body is truncated")
    return b"".join(chunks)


def error_response(exc: ServingError) -> JSONResponse:
    return JSONResponse({"error": exc.message}, status_code=HTTP_STATUS.get(exc.code, 500))


async def handle(request: Request) -> Response:
    """Every /v1/... request: status, metadata or predict, routed as TensorFlow Serving does."""
    servable: Servable = request.app.state.servable
    path, method = request.scope["path"], request.method
    try:
        if method == "GET" and (m := STATUS_PATH.fullmatch(path)):
            name, version, label, sub = m.groups()
            if not name:
                raise invalid("Missing model name in request.")
            if label and sub:  # metadata looks the label up, as gRPC's GetModelMetadata does
                raise invalid(f"Unrecognized servable version label: {label}")
            if label:
                raise ServingError(grpc.StatusCode.UNIMPLEMENTED, "status by label is not served")
            version = version_number(version)
            if sub:
                return pretty(servable.metadata(name, version))
            return pretty(servable.status(name, version))
        if method == "POST" and (m := PREDICT_PATH.fullmatch(path)):
            name, version, label, verb = m.groups()
            metrics: ServingMetrics = request.app.state.metrics
            with metrics.request(name, verb.lower(), "REST"):  # TensorFlow Serving's labels
                version = version_number(version)
                if label:  # no labels are configured: every label is unknown, as in ServerCore
                    raise invalid(f"Unrecognized servable version label: {label}")
                if verb.lower() != "predict":
                    raise ServingError(
                        grpc.StatusCode.UNIMPLEMENTED, f"{verb} is not served by this stand-in"
                    )
                return await predict(request, servable, name, version)
        raise invalid(f"Malformed request: {method} {path}")
    except ServingError as exc:
        return error_response(exc)


async def predict(request: Request, servable: Servable, name: str, version: int | None) -> Response:
    servable.check_spec(name, version)
    doc, signature_name = load_body(await read_body(request))
    try:
        key, sig = servable.signature(signature_name)
    except ServingError:  # REST words it differently from gRPC, and says 400
        name = signature_name or "serving_default"
        raise invalid(f'Serving signature name: "{name}" not found in signature def') from None
    inputs, row_format = parse_inputs(doc, list(sig.inputs))
    inputs = servable.validate(key, inputs)
    scheduler: Scheduler = request.app.state.scheduler
    outputs = await scheduler.predict(key, inputs)
    field = "predictions" if row_format else "outputs"
    return Response(
        f'{{"{field}":{predict_json(outputs, row_format)}}}', media_type="application/json"
    )


# ---- the documented doors and the OpenAPI description ----------------------------------------
# Every route in ROUTES ends in handle(), which parses the path with TensorFlow Serving's own
# regular expressions; the routes exist so that /openapi.json describes the API from the code.

ERROR = {
    "description": "error",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["error"],
                "properties": {"error": {"type": "string"}},
            }
        }
    },
}
OBJECT = {"content": {"application/json": {"schema": {"type": "object"}}}}
ERRORS = {status: ERROR for status in (400, 404, 413, 501, 503)}
ANY_METHOD = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"]  # libevent's list
PATH_PARAMETERS = {  # what TensorFlow Serving's path regular expressions accept
    "model_name": {"type": "string", "pattern": "^[^/:]+$"},
    "version": {"type": "string", "pattern": "^[0-9]{1,18}$"},
}


async def status(request: Request) -> Response:
    """Model status: GetModelStatusResponse as JSON."""
    return await handle(request)


async def metadata(request: Request) -> Response:
    """Model metadata: the SavedModel's signature_def map."""
    return await handle(request)


async def predict_route(request: Request) -> Response:
    """Predict: `instances` (rows) -> `predictions`, or `inputs` (columns) -> `outputs`."""
    return await handle(request)


PREDICT_BODY = {"required": True, "content": {"application/json": {"schema": {
    "type": "object",
    "properties": {
        "signature_name": {"type": "string"},
        "instances": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
        "inputs": {"type": "object"},
    },
}}}}  # fmt: skip


def operation(endpoint: Callable[..., Any], path: str) -> Json:
    """One OpenAPI operation: its summary from the docstring, path parameters from the path."""
    names = re.findall(r"{(\w+)}", path)
    operation = {
        "summary": (endpoint.__doc__ or "").split("\n")[0],
        "parameters": [
            {"name": n, "in": "path", "required": True, "schema": PATH_PARAMETERS[n]} for n in names
        ],
        "responses": {200: {"description": "the answer", **OBJECT}, **ERRORS},
    }
    if endpoint is predict_route:
        operation["requestBody"] = PREDICT_BODY
    return operation


SCHEMAS = SchemaGenerator({"openapi": "3.0.3", "info": {
    "title": "TensorFlow Serving REST API (local stand-in)", "version": "1"}})  # fmt: skip


def openapi_schema(routes: list[BaseRoute]) -> Json:
    """The OpenAPI 3 description of the app's own routes (Starlette's SchemaGenerator)."""
    paths: dict[str, Json] = {}
    for endpoint in SCHEMAS.get_endpoints(routes):
        paths.setdefault(endpoint.path, {})[endpoint.http_method] = operation(
            endpoint.func, endpoint.path
        )
    return {**SCHEMAS.base_schema, "paths": paths}


async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(openapi_schema(request.app.routes))


ROUTES: list[BaseRoute] = [
    Route("/v1/models/{model_name}", status, methods=["GET"]),
    Route("/v1/models/{model_name}/versions/{version}", status, methods=["GET"]),
    Route("/v1/models/{model_name}/metadata", metadata, methods=["GET"]),
    Route("/v1/models/{model_name}/versions/{version}/metadata", metadata, methods=["GET"]),
    Route("/v1/models/{model_name}:predict", predict_route, methods=["POST"]),
    Route("/v1/models/{model_name}/versions/{version}:predict", predict_route, methods=["POST"]),
    Route("/openapi.json", openapi, include_in_schema=False),
    # Anything else under /v1, any method, gets TensorFlow Serving's own answer (400
    # "Malformed request: OPTIONS /v1/..."), not Starlette's 404 or 405.
    Route("/v1/{rest:path}", handle, methods=ANY_METHOD, include_in_schema=False),
]


def create_app(
    servable: Servable,
    scheduler: Scheduler,
    metrics: ServingMetrics | None = None,
    metrics_path: str | None = None,
) -> Starlette:
    """The caller owns the model, the scheduler and the metrics (one of each for REST and gRPC
    together). With metrics_path (from --monitoring_config_file) the app serves the metrics
    there, TensorFlow Serving's and its own HTTP ones, from a registry made for this app."""
    routes = list(ROUTES)
    middleware = []
    if metrics is not None and metrics_path:
        registry = CollectorRegistry()
        registry.register(metrics)
        middleware.append(Middleware(HttpMetrics, registry=registry))
        # First, as TensorFlow Serving registers it before its /v1 dispatcher; not in
        # /openapi.json, which describes TensorFlow Serving's REST API.
        page = metrics_endpoint(registry)
        routes.insert(0, Route(metrics_path, page, methods=ANY_METHOD, include_in_schema=False))
    app = Starlette(routes=routes, middleware=middleware)
    app.state.servable = servable
    app.state.scheduler = scheduler
    app.state.metrics = metrics or ServingMetrics(servable.name)
    return app
