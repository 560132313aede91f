"""A small client for TensorFlow Serving's gRPC API, with the protos from tensorflow-serving-api.

    python grpc_client.py status
    python grpc_client.py metadata
    python grpc_client.py predict --rows '[[5.1, 3.5, 1.4, 0.2]]'

Host and port come from --host/--port or TF_SERVING_HOST / TF_SERVING_GRPC_PORT. Requests are
built with tf.make_tensor_proto, as TensorFlow Serving's users do.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads: quiet C++ logs

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402
import tensorflow as tf  # noqa: E402
from cli import client_parser  # noqa: E402
from google.protobuf import json_format  # noqa: E402
from google.protobuf.message import Message  # noqa: E402
from tensorflow_serving.apis import (  # noqa: E402
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)


def as_dict(message: Message) -> dict[str, Any]:
    """A proto as TensorFlow Serving's REST API would print it (field names as in the .proto)."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def predict_request(
    model: str,
    rows: npt.ArrayLike,
    version: int | None = None,
    signature_name: str = "serving_default",
) -> predict_pb2.PredictRequest:
    """A PredictRequest for rows [n, 4], built with tf.make_tensor_proto."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature_name
    if version is not None:
        request.model_spec.version.value = version
    request.inputs["input"].CopyFrom(tf.make_tensor_proto(rows, dtype=tf.float32))
    return request


class GrpcClient:
    """One channel for the client's life (channels are expensive; stubs are cheap)."""

    def __init__(self, host: str, port: int, model: str = "iris", timeout: float = 10.0):
        self.target = f"{host}:{port}"
        self.model = model
        self.timeout = timeout
        self.channel = grpc.insecure_channel(self.target)
        self.predictions = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _spec(self, spec: model_pb2.ModelSpec, version: int | None) -> None:
        spec.name = self.model
        if version is not None:
            spec.version.value = version

    def status(self, version: int | None = None) -> get_model_status_pb2.GetModelStatusResponse:
        request = get_model_status_pb2.GetModelStatusRequest()
        self._spec(request.model_spec, version)
        return self.models.GetModelStatus(request, timeout=self.timeout)

    def metadata(
        self, version: int | None = None
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        self._spec(request.model_spec, version)
        return self.predictions.GetModelMetadata(request, timeout=self.timeout)

    def predict(
        self,
        rows: npt.ArrayLike,
        version: int | None = None,
        signature_name: str = "serving_default",
    ) -> np.ndarray:
        """Rows [n, 4] -> probabilities [n, 3] as a numpy array."""
        request = predict_request(self.model, rows, version, signature_name)
        response = self.predictions.Predict(request, timeout=self.timeout)
        probabilities: np.ndarray = tf.make_ndarray(response.outputs["output"])
        return probabilities


def main(argv: list[str] | None = None) -> int:
    parser = client_parser("TensorFlow Serving gRPC client", "TF_SERVING_GRPC_PORT", 8500)
    args = parser.parse_args(argv)
    with GrpcClient(args.host, args.port, args.model) as client:
        try:
            if args.command == "status":
                print(json.dumps(as_dict(client.status(args.version)), indent=2))
            elif args.command == "metadata":
                response = client.metadata(args.version)
                signatures = get_model_metadata_pb2.SignatureDefMap()
                response.metadata["signature_def"].Unpack(signatures)
                document = {  # the shape of the REST answer, from the gRPC one
                    "model_spec": as_dict(response.model_spec),
                    "metadata": {"signature_def": as_dict(signatures)},
                }
                print(json.dumps(document, indent=2))
            else:
                probabilities = client.predict(np.asarray(args.rows, np.float32), args.version)
                print(json.dumps({"output": probabilities.tolist()}))
        except grpc.RpcError as exc:
            print(json.dumps({"code": exc.code().name, "details": exc.details()}), file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
