"""The gRPC API (8500) through grpc_client.py: protos, predictions, and every error."""

from collections.abc import Callable

import grpc
import numpy as np
import pytest
import tensorflow as tf
from conftest import Iris, Server, stand_in_only
from grpc_client import GrpcClient, predict_request
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, predict_pb2

TOLERANCE = 1e-5


def test_status(grpc_client: GrpcClient) -> None:
    (version_status,) = grpc_client.status().model_version_status
    assert version_status.version == 1
    assert version_status.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert version_status.status.error_code == 0  # OK
    assert grpc_client.status(version=1).model_version_status[0].version == 1


def test_metadata(grpc_client: GrpcClient) -> None:
    response = grpc_client.metadata()
    assert response.model_spec.name == "iris" and response.model_spec.version.value == 1
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    signature = signatures.signature_def["serving_default"]
    assert [d.size for d in signature.inputs["input"].tensor_shape.dim] == [-1, 4]
    assert [d.size for d in signature.outputs["output"].tensor_shape.dim] == [-1, 3]
    assert signature.inputs["input"].dtype == tf.float32.as_datatype_enum


@pytest.mark.parametrize("size", [1, 150])
def test_predict_equals_the_saved_model(
    grpc_client: GrpcClient, iris: Iris, expected: np.ndarray, size: int
) -> None:
    got = grpc_client.predict(iris[0][:size])
    assert got.shape == (size, 3)
    np.testing.assert_allclose(got, expected[:size], atol=TOLERANCE)


def test_predict_response_carries_model_spec_and_float_val(
    grpc_client: GrpcClient, iris: Iris
) -> None:
    request = predict_request("iris", iris[0][:2], version=1)
    response = grpc_client.predictions.Predict(request, timeout=30)
    assert response.model_spec.name == "iris" and response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "serving_default"
    output = response.outputs["output"]
    assert len(output.float_val) == 6  # as TensorFlow Serving fills it, not tensor_content
    assert [d.size for d in output.tensor_shape.dim] == [2, 3]


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


ROW = np.array([[5.1, 3.5, 1.4, 0.2]], np.float32)


def test_unknown_model_is_not_found(server: Server, iris: Iris) -> None:
    from grpc_client import GrpcClient

    with GrpcClient(server.host, server.grpc_port, "nope", timeout=30) as other:
        for call in (lambda: other.predict(ROW), other.status, other.metadata):
            assert rpc_error(call).code() == grpc.StatusCode.NOT_FOUND


def test_unknown_version_is_not_found(grpc_client: GrpcClient) -> None:
    for call in (
        lambda: grpc_client.predict(ROW, version=99),
        lambda: grpc_client.status(version=99),
        lambda: grpc_client.metadata(version=99),
    ):
        assert rpc_error(call).code() == grpc.StatusCode.NOT_FOUND


def send(
    grpc_client: GrpcClient, request: predict_pb2.PredictRequest
) -> predict_pb2.PredictResponse:
    return grpc_client.predictions.Predict(request, timeout=30)


def test_wrong_shape_is_invalid_argument(grpc_client: GrpcClient) -> None:
    request = predict_request("iris", np.array([[5.1, 3.5, 1.4]], np.float32))
    error = rpc_error(lambda: send(grpc_client, request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_wrong_input_name_is_invalid_argument(grpc_client: GrpcClient) -> None:
    request = predict_request("iris", ROW)
    request.inputs["x"].CopyFrom(request.inputs.pop("input"))
    error = rpc_error(lambda: send(grpc_client, request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input" in (error.details() or "")


def test_non_numeric_values_are_invalid_argument(grpc_client: GrpcClient) -> None:
    request = predict_request("iris", ROW)
    request.inputs["input"].CopyFrom(tf.make_tensor_proto([["a", "b", "c", "d"]]))
    error = rpc_error(lambda: send(grpc_client, request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unknown_signature_is_failed_precondition(grpc_client: GrpcClient) -> None:
    # TensorFlow Serving's predict_util.cc answers FAILED_PRECONDITION here (REST says 400).
    error = rpc_error(lambda: grpc_client.predict(ROW, signature_name="nope"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_the_server_still_answers_after_errors(
    grpc_client: GrpcClient, iris: Iris, expected: np.ndarray
) -> None:
    test_wrong_shape_is_invalid_argument(grpc_client)
    np.testing.assert_allclose(grpc_client.predict(iris[0][:2]), expected[:2], atol=TOLERANCE)


# ---- hostile messages (issue 10) ----------------------------------------------------------

MAX_ROWS = 1_000_000  # servable.MAX_ROWS, stated here as the README does


def declared(rows: int, columns: int = 4) -> predict_pb2.PredictRequest:
    """A ~50-byte request declaring [rows, columns] with a single float_val."""
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

    request = predict_request("iris", ROW)
    shape = tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=n) for n in (rows, columns)]
    )
    request.inputs["input"].CopyFrom(
        tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_shape=shape, float_val=[1.0])
    )
    return request


def test_huge_declared_shape_is_refused_before_any_array_is_built(grpc_client: GrpcClient) -> None:
    # [2**40, 4]: padding that to a 17.6 TB array fails; it must be refused from the shape.
    request = declared(2**40)
    assert request.ByteSize() < 60
    error = rpc_error(lambda: send(grpc_client, request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


@stand_in_only
def test_declared_rows_over_max_rows_are_refused(grpc_client: GrpcClient) -> None:
    error = rpc_error(lambda: send(grpc_client, declared(MAX_ROWS + 1)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"more than the {MAX_ROWS} allowed" in (error.details() or "")


def test_declared_wrong_shape_is_refused_before_any_array_is_built(grpc_client: GrpcClient) -> None:
    error = rpc_error(lambda: send(grpc_client, declared(10, 10**9)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_message_over_grpc_default_4_mib_is_accepted(grpc_client: GrpcClient) -> None:
    # 400,000 rows of 3 floats (4.8 MB) pass gRPC's 4 MiB default; the shape is then refused.
    request = predict_request("iris", np.zeros((400_000, 3), np.float32))
    assert request.ByteSize() > 4 * 1024 * 1024
    error = rpc_error(lambda: send(grpc_client, request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unknown_version_label_is_invalid_argument(grpc_client: GrpcClient) -> None:
    request = predict_request("iris", ROW)
    request.model_spec.version_label = "canary"
    error = rpc_error(lambda: send(grpc_client, request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "Unrecognized servable version label: canary"
    metadata = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    metadata.model_spec.name = "iris"
    metadata.model_spec.version_label = "canary"
    error = rpc_error(lambda: grpc_client.predictions.GetModelMetadata(metadata, timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
