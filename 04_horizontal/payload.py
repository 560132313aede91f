"""What a prediction request carries, checked in one place: {"data": [[4 finite numbers], ...]}.

The proxy validates once, before any fan-out; a service validates too, because it can be called
on its own. Both answer 422 {"error": "..."} for a body this module rejects.
"""

import json
import math
from typing import TypeVar

T = TypeVar("T")

FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")
SAMPLE = [[5.1, 3.5, 1.4, 0.2]]  # a setosa flower, for the */test endpoints and the docs
MAX_ROWS = 1_000  # bounds the work one request can ask for
# Any JSON body this chapter reads (a request, or a service's answer) is refused past this size,
# while it streams in: json.loads then never builds more than a few hundred thousand objects.
# 256 bytes a row is room for 4 numbers at full float precision, spaces and indentation.
MAX_BODY_BYTES = MAX_ROWS * 256
FLOAT32_MAX = 3.4028234663852886e38  # the models take float32: larger values would become inf

INPUT_SCHEMA = {
    "data_type": "float32",
    "data_structure": "(rows, 4)",
    "features": list(FEATURES),
    "data_sample": SAMPLE,
    "max_rows": MAX_ROWS,
}


# The same rules as parse_rows, for the OpenAPI documents of both apps (serving.web_app).
NUMBER = {"type": "number", "minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX}
PAIR = {"type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "number"}}
OPENAPI_SCHEMAS = {
    "Rows": {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "type": "array",
                "minItems": 1,
                "maxItems": MAX_ROWS,
                "items": {"type": "array", "minItems": 4, "maxItems": 4, "items": NUMBER},
            }
        },
    },
    # [P(class), P(not class)] for one row, a list of them for several.
    "Prediction": {"oneOf": [PAIR, {"type": "array", "items": PAIR}]},
}


class BadInput(ValueError):
    """The request body is not {"data": [[4 finite numbers], ...]}."""


def parse_rows(body: bytes) -> list[list[float]]:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than Python's stack
        raise BadInput('body must be JSON: {"data": [[4 numbers], ...]}') from None
    if not isinstance(payload, dict) or "data" not in payload:
        raise BadInput('expected {"data": [[4 numbers], ...]}')
    rows = payload["data"]
    if not isinstance(rows, list) or not rows:
        raise BadInput('"data" must be a non-empty list of rows')
    if len(rows) > MAX_ROWS:
        raise BadInput(f'"data" has {len(rows)} rows; at most {MAX_ROWS} per request')
    return [_row(i, row) for i, row in enumerate(rows)]


def _row(index: int, row: object) -> list[float]:
    if not isinstance(row, list) or len(row) != len(FEATURES):
        raise BadInput(f"row {index}: expected a list of {len(FEATURES)} numbers")
    values = []
    for value in row:
        # bool is an int in Python, and json.loads accepts NaN and Infinity: refuse all three.
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BadInput(f"row {index}: {json.dumps(value)} is not a number")
        try:
            number = float(value)
        except OverflowError:  # an integer too large for a float
            number = math.inf
        if not math.isfinite(number) or abs(number) > FLOAT32_MAX:
            raise BadInput(f"row {index}: {json.dumps(value)} is not a finite float32")
        values.append(number)
    return values


def one_or_many(per_row: list[T]) -> T | list[T]:
    """The specification's shape: a single row answers with its value, several rows with a list."""
    return per_row[0] if len(per_row) == 1 else per_row


def per_row(answer: object, rows: int) -> list[object]:
    """The inverse of one_or_many, for a caller that knows how many rows it sent; TypeError if
    several rows were sent and the answer is not a list."""
    if rows == 1:
        return [answer]
    if not isinstance(answer, list):
        raise TypeError(f"expected a list of {rows} rows, got {type(answer).__name__}")
    return answer
