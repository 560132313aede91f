"""The two ImageNet classifiers: image decoding, each model's preprocessing, top-k labels.

Both models see the same 224x224 centre crop; they differ only in how pixels are scaled and laid
out, which is each model's training convention (see `efficientnet_input` and `resnet50_input`).
"""

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import TypedDict

import numpy as np
import onnxruntime as ort
from PIL import Image

RESIZE, CROP = 256, 224


class Guess(TypedDict):
    """One of a model's top-k classes."""

    label: str
    probability: float


class InvalidImage(ValueError):
    """The bytes are not an image we accept; the message is safe to show the client."""


# Only what a photo upload needs: each extra format is another decoder open to hostile bytes.
FORMATS = ("JPEG", "PNG", "WEBP")
UNREADABLE = "not a readable JPEG, PNG or WebP image"


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode, resize the short side to 256 and centre-crop 224x224 RGB.

    At most `max_pixels` are decoded, checked from the header before any pixel is: a small PNG
    can declare 4000x4000 pixels and cost 64 MB and 0.2 s of CPU to decode.
    """
    try:
        image: Image.Image = Image.open(io.BytesIO(data), formats=FORMATS)
        # For JPEG, let the decoder downscale by 1/2, 1/4 or 1/8 while decoding: a phone photo
        # then costs a few ms instead of ~100, and only the reduced size counts against the limit.
        # The result is never smaller than asked for.
        image.draft("RGB", (RESIZE, RESIZE))
        if image.width * image.height > max_pixels:
            size = f"{image.width}x{image.height}"
            raise InvalidImage(f"image decodes to {size} pixels, over the {max_pixels} limit")
        image = image.convert("RGB")
    except InvalidImage:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        # Pillow's messages can show Python objects (`<_io.BytesIO object at 0x...>`): say what
        # we accept instead.
        raise InvalidImage(UNREADABLE) from exc
    scale = RESIZE / min(image.size)
    width, height = max(CROP, round(image.width * scale)), max(CROP, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BILINEAR)
    left, top = (width - CROP) // 2, (height - CROP) // 2
    return image.crop((left, top, left + CROP, top + CROP))


def efficientnet_input(image: Image.Image) -> np.ndarray:
    """EfficientNet-Lite0 (TF Lite convention): RGB, (x - 127) / 128, NCHW."""
    x = (np.asarray(image, dtype=np.float32) - 127.0) / 128.0
    return x.transpose(2, 0, 1)[np.newaxis]


CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], dtype=np.float32)


def resnet50_input(image: Image.Image) -> np.ndarray:
    """Keras ResNet50 ("caffe" convention): BGR, minus the ImageNet mean, no scaling, NHWC."""
    x = np.asarray(image, dtype=np.float32)[..., ::-1] - CAFFE_MEAN_BGR
    return x[np.newaxis]


def load_labels(path: Path) -> list[str]:
    labels: list[str] = json.loads(Path(path).read_text())
    if len(labels) != 1000:
        raise ValueError(f"{path}: expected 1000 ImageNet labels, got {len(labels)}")
    return labels


class Classifier:
    """An ONNX ImageNet model with its preprocessing; safe to call from several threads."""

    def __init__(
        self,
        model_path: Path,
        labels: list[str],
        preprocess: Callable[[Image.Image], np.ndarray],
        threads: int = 1,
    ):
        options = ort.SessionOptions()
        # One thread per call: concurrency comes from requests (proxy) or processes (worker),
        # and on a small shared machine idle threads spinning for work only steal CPU.
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(model_path), options, providers=["CPUExecutionProvider"]
        )
        self.name = Path(model_path).stem
        self.labels = labels
        self.preprocess = preprocess

    def top_k(self, image: Image.Image, k: int = 5) -> list[Guess]:
        """The k most likely classes, best first: [{"label": ..., "probability": ...}, ...]."""
        (probabilities,) = self.session.run(["probabilities"], {"input": self.preprocess(image)})
        best = np.argsort(probabilities[0])[::-1][:k]
        return [
            {"label": self.labels[i], "probability": round(float(probabilities[0][i]), 4)}
            for i in best
        ]
