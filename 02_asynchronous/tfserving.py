"""The worker's gRPC client for TensorFlow Serving's PredictionService.

Importing tensorflow_serving.apis imports all of TensorFlow (for its tensor protos): a few
seconds and some hundred MB per worker process, once, at start-up.
"""

import grpc
import numpy as np
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc


class Unreachable(ConnectionError):
    """TensorFlow Serving did not answer at all: the job should wait, not fail."""


class InferenceError(RuntimeError):
    """TensorFlow Serving answered with an error (bad model name, timeout, ...)."""


class TFServingClient:
    def __init__(self, target: str, model_name: str, timeout: float):
        self.model_name = model_name
        self.timeout = timeout
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)

    async def predict(self, rows: np.ndarray) -> np.ndarray:
        """float32 [n, 4] in, softmax probabilities float32 [n, 3] out."""
        request = predict_pb2.PredictRequest()
        request.model_spec.name = self.model_name
        request.model_spec.signature_name = "serving_default"
        request.inputs["input"].CopyFrom(_tensor(rows.astype(np.float32)))
        try:
            response = await self.stub.Predict(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as e:
            message = f"{e.code().name}: {e.details()}"
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                raise Unreachable(message) from e
            raise InferenceError(message) from e
        return _array(response.outputs["output"])

    async def close(self) -> None:
        await self.channel.close()


def _tensor(array: np.ndarray) -> tensor_pb2.TensorProto:
    # tensor_content (raw bytes) instead of tf.make_tensor_proto: no TensorFlow ops needed.
    shape = tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=n) for n in array.shape]
    )
    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT, tensor_shape=shape, tensor_content=array.tobytes()
    )


def _array(tensor: tensor_pb2.TensorProto) -> np.ndarray:
    shape = [d.size for d in tensor.tensor_shape.dim]
    if tensor.tensor_content:
        values = np.frombuffer(tensor.tensor_content, dtype=np.float32)
    else:
        values = np.asarray(tensor.float_val, dtype=np.float32)
    return values.reshape(shape)
