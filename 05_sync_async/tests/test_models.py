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
def models() -> dict[str, Classifier]:
    settings = Settings.from_env()
    labels = load_labels(settings.labels_path)
    return {
        "fast": Classifier(settings.sync_model_path, labels, efficientnet_input),
        "accurate": Classifier(settings.async_model_path, labels, resnet50_input),
    }


@pytest.mark.parametrize("name", ["fast", "accurate"])
def test_top5_on_the_sample_matches_the_reference(models: dict[str, Classifier], name: str) -> None:
    top5 = models[name].top_k(decode_image(SAMPLE, max_pixels=10**7))
    assert len(top5) == 5
    assert [entry["label"] for entry in top5[:4]] == [label for label, _ in REFERENCE[name]]
    for entry, (_, expected) in zip(top5, REFERENCE[name], strict=False):
        assert entry["probability"] == pytest.approx(expected, abs=0.01)


def test_decode_crops_to_224_whatever_the_shape() -> None:
    for size in ((451, 300), (100, 900), (224, 224)):
        buffer = io.BytesIO()
        Image.new("RGB", size).save(buffer, format="PNG")
        assert decode_image(buffer.getvalue(), max_pixels=10**7).size == (224, 224)


def test_decode_refuses_what_is_not_an_image_or_too_big() -> None:
    with pytest.raises(InvalidImage):
        decode_image(b"GIF89a but not really", max_pixels=10**7)
    with pytest.raises(InvalidImage, match="pixels"):
        decode_image(SAMPLE, max_pixels=1000)


def encoded(size: tuple[int, int], image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size).save(buffer, format=image_format, compress_level=9)
    return buffer.getvalue()


def test_decode_accepts_only_jpeg_png_and_webp() -> None:
    for image_format in ("JPEG", "PNG", "WEBP"):
        assert decode_image(encoded((300, 300), image_format), max_pixels=10**7).size == (224, 224)
    for image_format in ("GIF", "BMP", "TIFF", "ICO", "PPM"):
        with pytest.raises(InvalidImage, match="JPEG, PNG or WebP"):
            decode_image(encoded((300, 300), image_format), max_pixels=10**7)


def test_a_small_file_of_many_pixels_is_refused_before_decoding() -> None:
    # 4000x4000 black pixels compress to a few tens of KB, and would take ~64 MB to decode.
    bomb = encoded((4000, 4000), "PNG")
    assert len(bomb) < 50_000
    with pytest.raises(InvalidImage, match="pixels"):
        decode_image(bomb, max_pixels=Settings.from_env().max_image_pixels)
    # A JPEG of the same size is decoded at 1/8 scale (500x500), well within the bound.
    photo = encoded((4000, 4000), "JPEG")
    assert decode_image(photo, max_pixels=Settings.from_env().max_image_pixels).size == (224, 224)


def test_errors_do_not_show_python_objects() -> None:
    for data in (b"hello, world", SAMPLE[: len(SAMPLE) // 2], encoded((300, 300), "GIF")):
        with pytest.raises(InvalidImage) as caught:
            decode_image(data, max_pixels=10**7)
        assert "object at" not in str(caught.value) and "<" not in str(caught.value)
