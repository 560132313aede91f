"""Build every Iris artifact the chapters serve, offline and reproducibly.

    python models/build_iris.py            # writes into models/
    python models/build_iris.py --out DIR  # writes into DIR (the tests rebuild into a temp dir)

Writes:
    iris.csv                      the 150 rows of scikit-learn's bundled Iris data
    label.json                    class index -> name
    iris_svc.onnx                 StandardScaler + SVC, 3 classes (chapter 03)
    iris_svc_0_<class>.onnx       one-vs-rest binary SVCs, column 0 = P(class) (chapter 04)
    iris/1/                       Keras classifier as a SavedModel for TensorFlow Serving (01, 02)
"""

import argparse
import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
from sklearn.datasets import load_iris
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

SEED = 0
LABELS = {"0": "setosa", "1": "versicolor", "2": "virginica"}
HERE = Path(__file__).resolve().parent


def load_split():
    iris = load_iris()
    x = iris.data.astype(np.float32)
    y = iris.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.3, random_state=SEED, stratify=y
    )
    return (x, y), (x_train, y_train), (x_test, y_test)


def svc_pipeline() -> Pipeline:
    # probability=True gives Platt-scaled probabilities; random_state fixes its internal CV.
    return Pipeline(
        [
            ("scaler", StandardScaler()),
            ("svc", SVC(probability=True, random_state=SEED)),
        ]
    )


def to_onnx(pipeline: Pipeline, path: Path) -> None:
    from skl2onnx import to_onnx as convert
    from skl2onnx.common.data_types import FloatTensorType

    # zipmap=False: probabilities come out as a plain float32 [N, classes] tensor, not dicts.
    onx = convert(
        pipeline,
        initial_types=[("input", FloatTensorType([None, 4]))],
        options={id(pipeline.steps[-1][1]): {"zipmap": False}},
        target_opset=17,
    )
    path.write_bytes(onx.SerializeToString())


def build_svc(out: Path, train, test) -> None:
    (x_train, y_train), (x_test, y_test) = train, test
    model = svc_pipeline().fit(x_train, y_train)
    print(f"iris_svc.onnx              held-out accuracy {model.score(x_test, y_test):.4f}")
    to_onnx(model, out / "iris_svc.onnx")

    for index, name in LABELS.items():
        # Label 0 means "this class", 1 means "not this class", so column 0 is P(class).
        binary = svc_pipeline().fit(x_train, np.where(y_train == int(index), 0, 1))
        accuracy = binary.score(x_test, np.where(y_test == int(index), 0, 1))
        filename = f"iris_svc_0_{name}.onnx"
        print(f"{filename:<26} held-out accuracy {accuracy:.4f} (binary)")
        to_onnx(binary, out / filename)


def build_savedmodel(out: Path, train, test) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    (x_train, y_train), (x_test, y_test) = train, test
    keras.utils.set_random_seed(SEED)
    tf.config.experimental.enable_op_determinism()

    # The normalisation is inside the model, so clients send raw measurements in centimetres.
    norm = keras.layers.Normalization()
    norm.adapt(x_train)
    model = keras.Sequential(
        [
            keras.Input(shape=(4,), name="input"),
            norm,
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, epochs=150, batch_size=16, shuffle=True, verbose=0)
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(f"iris/1 (SavedModel)        held-out accuracy {accuracy:.4f}")

    # An explicit signature for TensorFlow Serving: `input` [-1, 4] -> `output` [-1, 3].
    class Serving(tf.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="input")])
        def serve(self, input):  # noqa: A002 - the tensor name is part of the contract
            return {"output": self.model(input, training=False)}

    module = Serving(model)
    target = out / "iris" / "1"
    if target.exists():
        shutil.rmtree(target)
    tf.saved_model.save(module, str(target), signatures={"serving_default": module.serve})


def write_data(out: Path, everything) -> None:
    x, y = everything
    with open(out / "iris.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sepal_length", "sepal_width", "petal_length", "petal_width", "target"])
        for row, target in zip(x.tolist(), y.tolist(), strict=True):
            writer.writerow([f"{v:.1f}" for v in row] + [target])
    (out / "label.json").write_text(json.dumps(LABELS) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="output directory")
    parser.add_argument("--skip-tf", action="store_true", help="build only the ONNX models")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    everything, train, test = load_split()
    write_data(args.out, everything)
    build_svc(args.out, train, test)
    if not args.skip_tf:
        build_savedmodel(args.out, train, test)


if __name__ == "__main__":
    main()
