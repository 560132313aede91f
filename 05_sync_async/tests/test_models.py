"""The two models on the sample photo: the fast one hesitates, the accurate one is sure."""

import io

import pytest
from conftest import SAMPLE
from PIL import Image

from classifier import (
    Classifier,
    InvalidImage,
    decode_image,
    efficientnet_input,
    load_labels,
    resnet50_input,
)
from config import Settings

# Measured once on samples/chelsea.jpg (rounded); a preprocessing mistake moves these a lot.
REFERENCE = {
    "fast": [("tiger cat", 0.380), ("Egyptian cat", 0.359), ("tabby", 0.172), ("lynx", 0.022)],
    "accurate": [("Egyptian cat", 0.755), ("tiger cat", 0.148), ("tabby", 0.094), ("lynx", 0.002)],
}


@pytest.fixture(scope="module")
def models():
    settings = Settings.from_env()
    labels = load_labels(settings.labels_path)
    return {
        "fast": Classifier(settings.sync_model_path, labels, efficientnet_input),
        "accurate": Classifier(settings.async_model_path, labels, resnet50_input),
    }


@pytest.mark.parametrize("name", ["fast", "accurate"])
def test_top5_on_the_sample_matches_the_reference(models, name):
    top5 = models[name].top_k(decode_image(SAMPLE, max_pixels=10**7))
    assert len(top5) == 5
    assert [entry["label"] for entry in top5[:4]] == [label for label, _ in REFERENCE[name]]
    for entry, (_, expected) in zip(top5, REFERENCE[name], strict=False):
        assert entry["probability"] == pytest.approx(expected, abs=0.01)


def test_decode_crops_to_224_whatever_the_shape():
    for size in ((451, 300), (100, 900), (224, 224)):
        buffer = io.BytesIO()
        Image.new("RGB", size).save(buffer, format="PNG")
        assert decode_image(buffer.getvalue(), max_pixels=10**7).size == (224, 224)


def test_decode_refuses_what_is_not_an_image_or_too_big():
    with pytest.raises(InvalidImage):
        decode_image(b"GIF89a but not really", max_pixels=10**7)
    with pytest.raises(InvalidImage, match="pixels"):
        decode_image(SAMPLE, max_pixels=1000)
