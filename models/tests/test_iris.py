"""The Iris artifacts, loaded the way the chapters load them."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

MODELS = Path(__file__).resolve().parents[1]
CLASSES = ["setosa", "versicolor", "virginica"]


def load_csv(path: Path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    x = np.array([[float(r[k]) for k in list(r)[:4]] for r in rows], dtype=np.float32)
    y = np.array([int(r["target"]) for r in rows])
    return x, y


@pytest.fixture(scope="module")
def iris():
    return load_csv(MODELS / "iris.csv")


def onnx_predict(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"input": x})[0]


@pytest.fixture(scope="module")
def savedmodel():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    return tf.saved_model.load(str(MODELS / "iris" / "1"))


def savedmodel_predict(loaded, x: np.ndarray) -> np.ndarray:
    return loaded.signatures["serving_default"](input=x)["output"].numpy()


def test_data_and_labels(iris):
    x, y = iris
    assert x.shape == (150, 4)
    assert np.bincount(y).tolist() == [50, 50, 50]
    labels = json.loads((MODELS / "label.json").read_text())
    assert labels == {"0": "setosa", "1": "versicolor", "2": "virginica"}


def test_svc_signature_and_accuracy(iris):
    x, y = iris
    session = ort.InferenceSession(
        str(MODELS / "iris_svc.onnx"), providers=["CPUExecutionProvider"]
    )
    (inp,) = session.get_inputs()
    assert (inp.name, inp.type, inp.shape[1]) == ("input", "tensor(float)", 4)
    outputs = {o.name: o for o in session.get_outputs()}
    assert outputs["probabilities"].type == "tensor(float)"
    assert outputs["probabilities"].shape[1] == 3

    proba = onnx_predict(MODELS / "iris_svc.onnx", x)
    assert proba.shape == (150, 3) and proba.dtype == np.float32
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    assert (proba.argmax(axis=1) == y).mean() >= 0.95


@pytest.mark.parametrize("index, name", list(enumerate(CLASSES)))
def test_binary_models_column_zero_is_the_class(iris, index, name):
    x, y = iris
    proba = onnx_predict(MODELS / f"iris_svc_0_{name}.onnx", x)
    assert proba.shape == (150, 2)
    # Column 0 is P(class): it must be high on that class's rows and low elsewhere.
    assert proba[y == index, 0].mean() > 0.8
    assert proba[y != index, 0].mean() < 0.2
    assert ((proba[:, 0] > 0.5) == (y == index)).mean() >= 0.95


def test_binary_models_vote_like_the_three_class_model(iris):
    x, y = iris
    columns = [onnx_predict(MODELS / f"iris_svc_0_{n}.onnx", x)[:, 0] for n in CLASSES]
    assert (np.stack(columns, axis=1).argmax(axis=1) == y).mean() >= 0.95


def test_savedmodel_signature_and_accuracy(iris, savedmodel):
    x, y = iris
    signature = savedmodel.signatures["serving_default"]
    (spec,) = signature.structured_input_signature[1].values()
    assert spec.name == "input" and spec.shape.as_list() == [None, 4]
    assert spec.dtype.name == "float32"
    (out_name,) = signature.structured_outputs
    assert out_name == "output"
    assert signature.structured_outputs["output"].shape.as_list() == [None, 3]

    proba = savedmodel_predict(savedmodel, x)
    assert proba.shape == (150, 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    assert (proba.argmax(axis=1) == y).mean() >= 0.95


def test_rebuild_gives_the_same_predictions(tmp_path, iris, savedmodel):
    x, _ = iris
    subprocess.run(
        [sys.executable, str(MODELS / "build_iris.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    assert (tmp_path / "iris.csv").read_text() == (MODELS / "iris.csv").read_text()
    names = ["iris_svc.onnx"] + [f"iris_svc_0_{n}.onnx" for n in CLASSES]
    for name in names:
        np.testing.assert_allclose(
            onnx_predict(tmp_path / name, x), onnx_predict(MODELS / name, x), atol=1e-5
        )

    import tensorflow as tf

    rebuilt = tf.saved_model.load(str(tmp_path / "iris" / "1"))
    np.testing.assert_allclose(
        savedmodel_predict(rebuilt, x), savedmodel_predict(savedmodel, x), atol=1e-5
    )
