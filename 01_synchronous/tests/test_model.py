"""The SavedModel itself: its signature and its accuracy on Iris."""

from typing import Any

import numpy as np
from conftest import Iris


def test_signature_is_input_4_to_output_3(saved_model: Any) -> None:
    signature = saved_model.signatures["serving_default"]
    (spec,) = signature.structured_input_signature[1].values()
    assert spec.name == "input" and spec.shape.as_list() == [None, 4]
    assert spec.dtype.name == "float32"
    outputs = signature.structured_outputs
    assert list(outputs) == ["output"] and outputs["output"].shape.as_list() == [None, 3]


def test_accuracy_on_iris_is_at_least_95_percent(expected: np.ndarray, iris: Iris) -> None:
    _, labels = iris
    accuracy = float(np.mean(expected.argmax(axis=1) == labels))
    assert accuracy >= 0.95, accuracy


def test_outputs_are_probabilities(expected: np.ndarray) -> None:
    assert np.all(expected >= 0) and np.allclose(expected.sum(axis=1), 1.0, atol=1e-5)
