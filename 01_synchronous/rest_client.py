"""A small client for TensorFlow Serving's REST API (standard library only).

    python rest_client.py status
    python rest_client.py metadata
    python rest_client.py predict --rows '[[5.1, 3.5, 1.4, 0.2]]' [--columnar]

Host and port come from --host/--port or TF_SERVING_HOST / TF_SERVING_REST_PORT.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from typing import Any

from cli import client_parser


class ServingError(Exception):
    """A non-2xx answer: the HTTP status and TensorFlow Serving's `error` message."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


Json = dict[str, Any]  # a JSON object as json.loads returns it


class RestClient:
    def __init__(self, host: str, port: int, model: str = "iris", timeout: float = 10.0):
        self.base = f"http://{host}:{port}/v1/models/{model}"
        self.timeout = timeout

    def _url(self, version: int | None, suffix: str = "") -> str:
        return self.base + (f"/versions/{version}" if version is not None else "") + suffix

    def _call(self, url: str, body: Json | None = None) -> Json:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer: Json = json.loads(response.read())
                return answer
        except urllib.error.HTTPError as exc:
            payload = exc.read()
            try:
                message = json.loads(payload)["error"]
            except (ValueError, KeyError, TypeError):
                message = payload.decode(errors="replace")
            raise ServingError(exc.code, message) from None

    def status(self, version: int | None = None) -> Json:
        return self._call(self._url(version))

    def metadata(self, version: int | None = None) -> Json:
        return self._call(self._url(version, "/metadata"))

    def predict_raw(self, body: Json, version: int | None = None) -> Json:
        return self._call(self._url(version, ":predict"), body)

    def predict(
        self,
        rows: list[Any],
        version: int | None = None,
        columnar: bool = False,
        signature_name: str | None = None,
    ) -> list[Any]:
        """Row format (`instances` -> `predictions`) or columnar (`inputs` -> `outputs`)."""
        body: Json = {"inputs": {"input": rows}} if columnar else {"instances": rows}
        if signature_name:
            body["signature_name"] = signature_name
        answer = self.predict_raw(body, version)
        values: list[Any] = answer["outputs"] if columnar else answer["predictions"]
        return values


def main(argv: list[str] | None = None) -> int:
    parser = client_parser("TensorFlow Serving REST client", "TF_SERVING_REST_PORT", 8501)
    parser.add_argument("--columnar", action="store_true", help="send `inputs`, not `instances`")
    args = parser.parse_args(argv)
    client = RestClient(args.host, args.port, args.model)
    try:
        if args.command == "status":
            result = client.status(args.version)
        elif args.command == "metadata":
            result = client.metadata(args.version)
        else:
            key = "outputs" if args.columnar else "predictions"
            result = {key: client.predict(args.rows, args.version, args.columnar)}
    except ServingError as exc:
        print(json.dumps({"status": exc.status, "error": exc.message}), file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"cannot reach {client.base}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=None if args.command == "predict" else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
