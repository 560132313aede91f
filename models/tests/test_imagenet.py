"""The ImageNet models of chapter 05, loaded and fed the way the chapter feeds them.

The models are built by `make models` (models/build_imagenet.py); these tests skip when they are
missing. The sample photo is scikit-image's "chelsea" cat, shipped with chapter 05.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

MODELS = Path(__file__).resolve().parents[1]
IMAGENET = MODELS / "imagenet"
CHELSEA = MODELS.parent / "05_sync_async" / "samples" / "chelsea.jpg"
CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], dtype=np.float32)


def centre_crop(path: Path) -> np.ndarray:
    """RGB, short side resized to 256 (bilinear), centre 224x224: uint8-valued float32 HWC."""
    image = Image.open(path).convert("RGB")
    scale = 256 / min(image.size)
    width, height = round(image.width * scale), round(image.height * scale)
    image = image.resize((width, height), Image.Resampling.BILINEAR)
    left, top = (width - 224) // 2, (height - 224) // 2
    return np.asarray(image.crop((left, top, left + 224, top + 224)), dtype=np.float32)


def lite0_input(pixels: np.ndarray) -> np.ndarray:
    """EfficientNet-Lite0: (x - 127) / 128, NCHW."""
    return ((pixels - 127.0) / 128.0).transpose(2, 0, 1)[np.newaxis].astype(np.float32)


def resnet50_input(pixels: np.ndarray) -> np.ndarray:
    """ResNet50, Keras "caffe" style: RGB -> BGR, minus the ImageNet means, NHWC."""
    return (pixels[..., ::-1] - CAFFE_MEAN_BGR)[np.newaxis].astype(np.float32)


def session(name: str) -> ort.InferenceSession:
    path = IMAGENET / name
    if not path.exists():
        pytest.skip(f"{path} is not built: run `make models` in the repository root")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def labels() -> list[str]:
    return json.loads((IMAGENET / "labels.json").read_text())


@pytest.fixture(scope="module")
def chelsea() -> np.ndarray:
    return centre_crop(CHELSEA)


def top5(sess: ort.InferenceSession, x: np.ndarray, labels: list[str]) -> list[tuple[str, float]]:
    [probabilities] = sess.run(["probabilities"], {"input": x})
    assert probabilities.shape == (1, 1000)
    assert probabilities.sum() == pytest.approx(1.0, abs=1e-4)
    order = np.argsort(probabilities[0])[::-1][:5]
    return [(labels[i], float(probabilities[0, i])) for i in order]


def test_labels_are_1000_readable_names(labels):
    assert len(labels) == 1000 and len(set(labels)) == 1000
    assert labels[281:286] == ["tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"]
    assert not any("_" in label for label in labels)


@pytest.mark.parametrize(
    ("name", "shape"),
    [("efficientnet_lite0.onnx", [3, 224, 224]), ("resnet50.onnx", [224, 224, 3])],
)
def test_signature_and_dynamic_batch(name, shape):
    sess = session(name)
    [inp], [out] = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, inp.type, inp.shape[1:]) == ("input", "tensor(float)", shape)
    assert (out.name, out.type, out.shape[1:]) == ("probabilities", "tensor(float)", [1000])
    assert isinstance(inp.shape[0], str), "the batch axis is dynamic"

    batch = np.random.default_rng(0).uniform(-1, 1, [3, *shape]).astype(np.float32)
    [probabilities] = sess.run(["probabilities"], {"input": batch})
    assert probabilities.shape == (3, 1000)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    [first] = sess.run(["probabilities"], {"input": batch[:1]})
    np.testing.assert_allclose(first[0], probabilities[0], atol=1e-5)


def test_efficientnet_lite0_on_chelsea(labels, chelsea):
    # The fast model hesitates between two cat breeds: that is the chapter's point.
    top = top5(session("efficientnet_lite0.onnx"), lite0_input(chelsea), labels)
    assert [name for name, _ in top[:4]] == ["tiger cat", "Egyptian cat", "tabby", "lynx"]
    assert top[0][1] == pytest.approx(0.38, abs=0.03)
    assert top[1][1] == pytest.approx(0.36, abs=0.03)


def test_resnet50_on_chelsea(labels, chelsea):
    top = top5(session("resnet50.onnx"), resnet50_input(chelsea), labels)
    assert [name for name, _ in top[:4]] == ["Egyptian cat", "tiger cat", "tabby", "lynx"]
    assert top[0][1] == pytest.approx(0.75, abs=0.03)


def test_second_build_does_nothing():
    for name in ("efficientnet_lite0.onnx", "resnet50.onnx"):
        session(name)  # skips unless built
    done = subprocess.run(
        [sys.executable, str(MODELS / "build_imagenet.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "up to date" in done.stdout
