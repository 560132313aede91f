"""The Iris classifier: one onnxruntime session, predicting a whole batch per call."""

import json
from typing import Any

import numpy as np
import onnxruntime as ort


class IrisModel:
    def __init__(self, model_filepath: str, label_filepath: str) -> None:
        options = ort.SessionOptions()
        # One thread per call: the job already runs several chunks at once, one per thread.
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(
            model_filepath, options, providers=["CPUExecutionProvider"]
        )
        with open(label_filepath) as f:
            self.labels: dict[str, str] = json.load(f)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """float32 [n, 4] -> float32 [n, 3]; one vectorised call for the whole batch."""
        proba: np.ndarray = self.session.run(["probabilities"], {"input": x})[0]
        return proba

    def metadata(self) -> dict[str, Any]:
        def describe(arg: ort.NodeArg) -> dict[str, Any]:
            return {"name": arg.name, "type": arg.type, "shape": arg.shape}

        outputs = [o for o in self.session.get_outputs() if o.name == "probabilities"]
        return {
            "model": "iris_svc",
            "input": [describe(i) for i in self.session.get_inputs()],
            "output": [describe(o) for o in outputs],
            "labels": self.labels,
        }
