"""TensorFlow Serving's gRPC API (port 8500) over a Servable, with the protos from
tensorflow-serving-api: PredictionService (Predict, GetModelMetadata) and ModelService
(GetModelStatus). Errors abort the call with TensorFlow Serving's status code and message.
"""

from __future__ import annotations

import grpc
import numpy as np
import tensorflow as tf
from batching import Scheduler
from monitoring import ServingMetrics
from servable import Servable, ServingError, invalid
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

# TensorFlow Serving's own limit (server.cc: builder.SetMaxMessageSize(kint32max)), not gRPC's
# 4 MiB default: 300,000 Iris rows are already 4.8 MB. What a message may *declare* is bounded
# separately, by MAX_ROWS, before any array is built.
MAX_MESSAGE_BYTES = 2**31 - 1
# Calls handled at once; past it gRPC answers RESOURCE_EXHAUSTED at once instead of queueing
# without bound (each call may hold a large message). The bench runs 50 concurrent callers.
MAX_CONCURRENT_RPCS = 200


def requested_version(model_spec: model_pb2.ModelSpec) -> int | None:
    """The version asked for. The stand-in has no labels configured, so every label is unknown,
    as TensorFlow Serving's ServerCore says for a label missing from its config."""
    if model_spec.HasField("version_label"):
        raise invalid(f"Unrecognized servable version label: {model_spec.version_label}")
    return model_spec.version.value if model_spec.HasField("version") else None


def to_array(
    servable: Servable,
    key: str,
    name: str,
    proto: tensor_pb2.TensorProto,
    expected_dtype: int,
    position: int,
) -> np.ndarray:
    if proto.dtype != expected_dtype:
        want = tf.dtypes.as_dtype(expected_dtype).name
        got = tf.dtypes.as_dtype(proto.dtype).name if proto.dtype else "invalid"
        raise invalid(f"Expects arg[{position}] to be {want} but {got} is provided")
    if proto.tensor_shape.unknown_rank:
        raise invalid(f"{name}: the tensor's shape has unknown rank")
    # make_ndarray pads the values to the declared shape: check that shape first.
    servable.check_shape(key, name, [d.size for d in proto.tensor_shape.dim])
    try:
        array: np.ndarray = tf.make_ndarray(proto)
    except (ValueError, TypeError) as exc:
        raise invalid(f"tensor parsing error: {name} ({exc})") from None
    return array


def to_tensor_proto(array: np.ndarray) -> tensor_pb2.TensorProto:
    """float_val, like TensorFlow Serving's AsProtoField: clients may read .float_val directly."""
    if array.dtype != np.float32:
        proto: tensor_pb2.TensorProto = tf.make_tensor_proto(array)
        return proto
    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT,
        tensor_shape=tf.TensorShape(array.shape).as_proto(),
        float_val=array.ravel().tolist(),
    )


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, servable: Servable, scheduler: Scheduler, metrics: ServingMetrics):
        self.servable = servable
        self.scheduler = scheduler
        self.metrics = metrics

    async def Predict(
        self,
        request: predict_pb2.PredictRequest,
        context: grpc.aio.ServicerContext[predict_pb2.PredictRequest, predict_pb2.PredictResponse],
    ) -> predict_pb2.PredictResponse:
        spec = request.model_spec
        try:
            with self.metrics.request(spec.name, "Predict", "GRPC"):  # TensorFlow Serving's labels
                return await self.predict(request)
        except ServingError as exc:
            await context.abort(exc.code, exc.message)

    async def predict(self, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        spec = request.model_spec
        self.servable.check_spec(spec.name, requested_version(spec))
        key, sig = self.servable.signature(spec.signature_name)
        self.servable.check_names(key, request.inputs)
        order = sorted(sig.inputs)
        inputs = {
            k: to_array(self.servable, key, k, request.inputs[k], sig.inputs[k].dtype, i)
            for i, k in enumerate(order)
        }
        outputs = await self.scheduler.predict(key, self.servable.validate(key, inputs))
        response = predict_pb2.PredictResponse()
        response.model_spec.CopyFrom(self.servable.model_spec(key))
        for name, value in outputs.items():
            response.outputs[name].CopyFrom(to_tensor_proto(value))
        return response

    async def GetModelMetadata(
        self,
        request: get_model_metadata_pb2.GetModelMetadataRequest,
        context: grpc.aio.ServicerContext[
            get_model_metadata_pb2.GetModelMetadataRequest,
            get_model_metadata_pb2.GetModelMetadataResponse,
        ],
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        spec = request.model_spec
        try:
            self.servable.check_spec(spec.name, requested_version(spec))
            if not request.metadata_field:
                raise invalid("GetModelMetadataRequest must specify at least one metadata_field")
            unsupported = [f for f in request.metadata_field if f != "signature_def"]
            if unsupported:
                raise invalid(f"Metadata field {unsupported[0]} is not supported")
        except ServingError as exc:
            await context.abort(exc.code, exc.message)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.CopyFrom(self.servable.model_spec())
        response.metadata["signature_def"].Pack(self.servable.signature_def_map())
        return response


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, servable: Servable):
        self.servable = servable

    async def GetModelStatus(
        self,
        request: get_model_status_pb2.GetModelStatusRequest,
        context: grpc.aio.ServicerContext[
            get_model_status_pb2.GetModelStatusRequest,
            get_model_status_pb2.GetModelStatusResponse,
        ],
    ) -> get_model_status_pb2.GetModelStatusResponse:
        spec = request.model_spec
        # GetModelStatus ignores a version label (get_model_status_impl.cc): all versions.
        version = spec.version.value if spec.HasField("version") else None
        try:
            return self.servable.status_proto(spec.name, version)
        except ServingError as exc:
            await context.abort(exc.code, exc.message)


def create_server(
    servable: Servable, scheduler: Scheduler, metrics: ServingMetrics, host: str, port: int
) -> grpc.aio.Server:
    server = grpc.aio.server(
        maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionService(servable, scheduler, metrics), server
    )
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(servable), server)
    server.add_insecure_port(f"{host}:{port}")
    return server
