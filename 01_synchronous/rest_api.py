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

import grpc
import numpy as np
from batching import Scheduler
from servable import Servable, ServingError, invalid
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

PREDICT_PATH = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)",
    re.IGNORECASE,
)
STATUS_PATH = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?",
    re.IGNORECASE,
)
_FLOAT32 = struct.Struct("f")  # rounds a Python float to float32, to test a round-trip
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.UNIMPLEMENTED: 501,
}


# ---- JSON <-> tensors ------------------------------------------------------------------------


def to_array(value, where: str) -> np.ndarray:
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


def load_body(body: bytes) -> tuple[dict, str]:
    """The request object and its signature_name, with json_tensor.cc's checks."""
    if not body:
        raise invalid("JSON Parse error: The document is empty")
    try:
        doc = json.loads(body)  # Python's json accepts NaN and Infinity, as TF Serving does
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid(f"JSON Parse error: {exc}") from None
    if not isinstance(doc, dict):
        raise invalid("JSON Value: request body Is not object")
    signature_name = doc.get("signature_name", "")
    if not isinstance(signature_name, str):
        raise invalid("'signature_name' key must be a string value.")
    return doc, signature_name


def parse_inputs(doc: dict, input_names: list[str]) -> tuple[dict[str, np.ndarray], bool]:
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
        if isinstance(inputs, dict):
            return {k: to_array(v, f"inputs.{k}") for k, v in inputs.items()}, False
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


def _json_value(value) -> str:
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


def pretty(document: dict) -> Response:
    """Status and metadata indented as TensorFlow Serving prints them (one space per level)."""
    return Response(json.dumps(document, indent=1), media_type="application/json")


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
            if label:
                raise ServingError(grpc.StatusCode.UNIMPLEMENTED, "version labels are not served")
            version = int(version) if version else None
            if sub:
                return pretty(servable.metadata(name, version))
            return pretty(servable.status(name, version))
        if method == "POST" and (m := PREDICT_PATH.fullmatch(path)):
            name, version, label, verb = m.groups()
            if verb.lower() != "predict" or label:
                raise ServingError(
                    grpc.StatusCode.UNIMPLEMENTED, f"{verb} is not served by this stand-in"
                )
            return await predict(request, servable, name, int(version) if version else None)
        raise invalid(f"Malformed request: {method} {path}")
    except ServingError as exc:
        return error_response(exc)


async def predict(request: Request, servable: Servable, name: str, version: int | None):
    servable.check_spec(name, version)
    doc, signature_name = load_body(await request.body())
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


def create_app(servable: Servable, scheduler: Scheduler) -> Starlette:
    """The caller owns the model and the scheduler (one of each for REST and gRPC together)."""
    app = Starlette(routes=[Route("/v1/{rest:path}", handle, methods=["GET", "POST"])])
    app.state.servable = servable
    app.state.scheduler = scheduler
    return app
