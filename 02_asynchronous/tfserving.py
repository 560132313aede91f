"""The worker's gRPC client for TensorFlow Serving's PredictionService."""

import grpc
import numpy as np

DT_FLOAT = 1  # tensorflow.DataType.DT_FLOAT


class Unreachable(ConnectionError):
    """TensorFlow Serving did not answer at all: the job should wait, not fail."""


class InferenceError(RuntimeError):
    """TensorFlow Serving answered with an error (bad model name, timeout, ...)."""


class TFServingClient:
    def __init__(self, target: str, model_name: str, timeout: float):
        # Imported here, not at the top: these protos import all of TensorFlow (seconds of CPU,
        # some hundred MB), which only a process that predicts should pay for, not the
        # supervisor that starts NUM_WORKERS of them.
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

        self.new_request = predict_pb2.PredictRequest
        self.model_name = model_name
        self.timeout = timeout
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)

    async def predict(self, rows: np.ndarray) -> np.ndarray:
        """float32 [n, 4] in, softmax probabilities float32 [n, 3] out."""
        request = self.new_request()
        request.model_spec.name = self.model_name
        request.model_spec.signature_name = "serving_default"
        tensor = request.inputs["input"]
        tensor.dtype = DT_FLOAT
        for size in rows.shape:
            tensor.tensor_shape.dim.add(size=size)
        # Raw bytes instead of tf.make_tensor_proto: no TensorFlow op runs in the worker.
        tensor.tensor_content = rows.astype(np.float32).tobytes()
        try:
            response = await self.stub.Predict(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as e:
            message = f"{e.code().name}: {e.details()}"
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                raise Unreachable(message) from e
            raise InferenceError(message) from e
        output = response.outputs["output"]
        shape = [d.size for d in output.tensor_shape.dim]
        if output.tensor_content:
            return np.frombuffer(output.tensor_content, dtype=np.float32).reshape(shape)
        return np.asarray(output.float_val, dtype=np.float32).reshape(shape)

    async def close(self) -> None:
        await self.channel.close()
