"""The model side of the stand-in server: one SavedModel version, its signatures, and errors.

TensorFlow Serving calls a loaded model a *servable*. This module loads the highest numbered
version directory under the model base path, answers status and metadata as TensorFlow Serving's
protos, and validates and runs Predict. Both the REST and the gRPC front ends call it, so the two
protocols cannot disagree about what a valid request is.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from typing import Any

# Before TensorFlow is imported: keep its C++ INFO lines off the JSON log stream.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from google.protobuf import json_format  # noqa: E402
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2  # noqa: E402
from tensorflow.types.experimental import ConcreteFunction  # noqa: E402
from tensorflow_serving.apis import (  # noqa: E402
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
)

DEFAULT_SIGNATURE = "serving_default"
PREDICT_METHOD = "tensorflow/serving/predict"
# Rows in one Predict request, checked on the declared shape before any array is built (a gRPC
# tensor declaring [10**9, 4] with a single value would otherwise be padded to 16 GB). Clients
# send a few hundred thousand rows at most; a million Iris rows is a 16 MB float32 array.
MAX_ROWS = 1_000_000


class ServingError(Exception):
    """An error with the gRPC status code TensorFlow Serving would give (REST maps it to HTTP)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def latest_version(base_path: Path) -> int:
    """TensorFlow Serving's default version policy: serve the highest numbered sub-directory."""
    versions = [int(p.name) for p in base_path.iterdir() if p.is_dir() and p.name.isdigit()]
    if not versions:
        raise FileNotFoundError(f"no numbered version directory under {base_path}")
    return max(versions)


@dataclass
class Servable:
    name: str
    version: int
    signature_defs: dict[str, meta_graph_pb2.SignatureDef]
    functions: dict[str, ConcreteFunction[..., dict[str, tf.Tensor]]]  # by signature name
    loaded: object  # the loaded SavedModel: owns the variables the functions read

    def __post_init__(self) -> None:
        # Per signature and input: (shape with -1 for any size, or None if unknown rank; dtype),
        # worked out once here rather than from the protos on every request.
        self.input_specs = {
            key: {
                name: (
                    None if info.tensor_shape.unknown_rank
                    else [d.size for d in info.tensor_shape.dim],
                    np.dtype(tf.dtypes.as_dtype(info.dtype).as_numpy_dtype),
                )
                for name, info in sig.inputs.items()
            }
            for key, sig in self.signature_defs.items()
        }  # fmt: skip

    @classmethod
    def load(cls, name: str, base_path: str | Path) -> Servable:
        base = Path(base_path).resolve()
        version = latest_version(base)
        path = base / str(version)
        # Metadata comes from saved_model.pb itself, so it lists every signature the file holds
        # (including __saved_model_init_op), exactly as TensorFlow Serving reports them.
        saved_model = saved_model_pb2.SavedModel()
        saved_model.ParseFromString((path / "saved_model.pb").read_bytes())
        signature_defs = dict(saved_model.meta_graphs[0].signature_def)
        # One thread per op: for a model this small, waking TensorFlow's thread pools costs more
        # than the arithmetic, and on a busy 2-core machine it adds milliseconds of wait.
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        loaded = tf.saved_model.load(str(path))
        return cls(name, version, signature_defs, dict(loaded.signatures), loaded)

    # ---- which model and version a request names --------------------------------------------

    def check_spec(self, name: str, version: int | None) -> None:
        """NOT_FOUND for another model or version, with TensorFlow Serving's wording."""
        if name != self.name or (version is not None and version != self.version):
            wanted = f"Latest({name})" if version is None else f"Specific({name}, {version})"
            raise ServingError(
                grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {wanted}"
            )

    def status(self, name: str, version: int | None) -> dict[str, Any]:
        """GetModelStatusResponse as JSON (REST) and as proto (gRPC) share this one builder."""
        return json_format.MessageToDict(
            self.status_proto(name, version), always_print_fields_with_no_presence=True
        )

    def status_proto(
        self, name: str, version: int | None
    ) -> get_model_status_pb2.GetModelStatusResponse:
        if name != self.name:
            raise ServingError(
                grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {name}"
            )
        if version is not None and version != self.version:
            raise ServingError(
                grpc.StatusCode.NOT_FOUND, f"Could not find version {version} of model {name}"
            )
        response = get_model_status_pb2.GetModelStatusResponse()
        entry = response.model_version_status.add()
        entry.version = self.version
        entry.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
        entry.status.SetInParent()  # error_code OK, error_message "" are printed explicitly
        return response

    def model_spec(self, signature_name: str = "") -> model_pb2.ModelSpec:
        spec = model_pb2.ModelSpec(name=self.name, signature_name=signature_name)
        spec.version.value = self.version
        return spec

    def signature_def_map(self) -> get_model_metadata_pb2.SignatureDefMap:
        result = get_model_metadata_pb2.SignatureDefMap()
        for key, sig in self.signature_defs.items():
            result.signature_def[key].CopyFrom(sig)
        return result

    def metadata(self, name: str, version: int | None) -> dict[str, Any]:
        self.check_spec(name, version)
        as_dict = lambda m: json_format.MessageToDict(  # noqa: E731
            m, always_print_fields_with_no_presence=True, preserving_proto_field_name=True
        )
        return {
            "model_spec": as_dict(self.model_spec()),
            "metadata": {"signature_def": as_dict(self.signature_def_map())},
        }

    # ---- Predict -------------------------------------------------------------------------------

    def signature(self, signature_name: str) -> tuple[str, meta_graph_pb2.SignatureDef]:
        key = signature_name or DEFAULT_SIGNATURE
        sig = self.signature_defs.get(key)
        if sig is None or sig.method_name != PREDICT_METHOD:
            raise ServingError(
                grpc.StatusCode.FAILED_PRECONDITION, f'Serving signature key "{key}" not found.'
            )
        return key, sig

    def check_shape(self, signature_key: str, name: str, shape: list[int]) -> None:
        """A shape, declared or built, fits the signature and MAX_ROWS, else INVALID_ARGUMENT."""
        expected, _ = self.input_specs[signature_key][name]
        if any(s < 0 for s in shape) or (
            expected is not None
            and not (
                len(expected) == len(shape)
                and all(e in (-1, s) for e, s in zip(expected, shape, strict=True))
            )
        ):
            raise invalid(
                f"{name}: expected shape [{','.join(map(str, expected or []))}] "
                f"but got [{','.join(map(str, shape))}]"
            )
        if shape and shape[0] > MAX_ROWS:
            raise invalid(f"{name}: {shape[0]} rows, more than the {MAX_ROWS} allowed per request")

    def check_names(self, signature_key: str, names: Collection[str]) -> None:
        """The inputs sent must be exactly the signature's, with TensorFlow Serving's wording."""
        specs = self.input_specs[signature_key]
        if set(names) != specs.keys():
            sent, wanted = sorted(names), sorted(specs)
            raise invalid(
                f"input size does not match signature: {len(sent)}!={len(wanted)} "
                f"len({{{','.join(sent)}}}) != len({{{','.join(wanted)}}}). "
                f"Sent extra: {{{','.join(sorted(set(sent) - set(wanted)))}}}. "
                f"Missing but required: {{{','.join(sorted(set(wanted) - set(sent)))}}}."
            )

    def validate(self, signature_key: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Same names as the signature, numbers only, shapes compatible: else INVALID_ARGUMENT."""
        self.check_names(signature_key, inputs)
        checked = {}
        for key, value in inputs.items():
            _, dtype = self.input_specs[signature_key][key]
            if value.dtype.kind not in "iuf":
                raise invalid(f"{key}: expects {dtype.name} values but got {value.dtype.name}")
            self.check_shape(signature_key, key, list(value.shape))
            checked[key] = value.astype(dtype, copy=False)
        return checked

    def run(self, signature_key: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One model call. Takes ~0.5 ms whatever the batch size, which is why batching pays."""
        outputs = self.functions[signature_key](**{k: tf.constant(v) for k, v in inputs.items()})
        return {k: v.numpy() for k, v in outputs.items()}
