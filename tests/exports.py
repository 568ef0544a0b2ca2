"""Cached ONNX exports of small torchvision classifiers, shared by the test modules.

Every export runs at most once per test session: results are kept in memory and written to a
per-session temporary directory (set by ``tests/conftest.py``). Setting the environment
variable ``SP2PS_TEST_CACHE`` to a directory keeps the ``.onnx`` files across local runs; the
file name then carries the torch version so that a torch upgrade re-exports.

Models have random weights (fixed seed), ``num_classes=10`` to keep the files small, and
random BatchNorm running statistics so that BN folding in the exporter changes real numbers.
The batch dimension of every export is dynamic.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

ARCHITECTURES: tuple[str, ...] = (
    "resnet18",
    "vgg11_bn",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "densenet121",
    "squeezenet1_1",
    "regnet_x_400mf",
    "convnext_tiny",
)

NUM_CLASSES = 10
BATCH = 2
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
SEED = 0

torch.set_num_threads(2)

_session_dir: Path | None = None
_memory: dict[tuple[str, bool, int], tuple[Path, nn.Module, torch.Tensor]] = {}
#: Seconds each export took in this process, for spotting slow exporters.
export_seconds: dict[tuple[str, bool, int], float] = {}


def set_session_dir(directory: Path) -> None:
    """Use ``directory`` for this session's exports (unless SP2PS_TEST_CACHE is set)."""
    global _session_dir
    _session_dir = Path(directory)


def cache_dir() -> Path:
    """Directory for the export files: SP2PS_TEST_CACHE, the session dir, or a fresh temp dir."""
    global _session_dir
    env = os.environ.get("SP2PS_TEST_CACHE")
    if env:
        path = Path(env)
        path.mkdir(parents=True, exist_ok=True)
        return path
    if _session_dir is None:
        _session_dir = Path(tempfile.mkdtemp(prefix="sp2ps-exports-"))
    return _session_dir


def _randomize_batchnorm_statistics(model: nn.Module, generator: torch.Generator) -> None:
    # Default running stats (mean 0, var 1, weight 1, bias 0) make BN almost an identity, so
    # a rule or a folding bug would hide; random statistics make every BN count.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            channels = module.num_features
            with torch.no_grad():
                module.running_mean.copy_(0.1 * torch.randn(channels, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(channels, generator=generator))
                module.weight.copy_(0.5 + torch.rand(channels, generator=generator))
                module.bias.copy_(0.1 * torch.randn(channels, generator=generator))


def build_torch_model(name: str) -> nn.Module:
    """A torchvision classifier with fixed random weights, 10 classes, in eval mode."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose from {ARCHITECTURES}")
    torch.manual_seed(SEED)
    model = getattr(torchvision.models, name)(weights=None, num_classes=NUM_CLASSES)
    if name == "vgg11_bn":
        # At 64x64 the VGG features are 2x2. torchvision's AdaptiveAvgPool2d((7, 7)) would
        # upsample 2x2 to 7x7 (overlapping, uneven bins), which the exporters lower badly
        # (legacy: fixed-size AveragePool that fails for this ratio; dynamo: index gathers).
        # A 2x2 adaptive pool is then an identity and the classifier sees the same features.
        model.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        model.classifier[0] = nn.Linear(512 * 4, 4096)
    generator = torch.Generator().manual_seed(SEED + 1)
    _randomize_batchnorm_statistics(model, generator)
    return model.eval()


def example_input(size: int = 64, batch: int = BATCH, seed: int = SEED) -> torch.Tensor:
    """A deterministic float32 image batch (N, 3, size, size)."""
    generator = torch.Generator().manual_seed(seed + 7)
    return torch.randn(batch, 3, size, size, generator=generator)


def _export_legacy(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )


def _export_dynamo(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=1024)
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            dynamo=True,
            external_data=False,
        )
        program.save(str(path), external_data=False)


def export_torchvision(
    name: str, dynamo: bool, size: int = 64
) -> tuple[Path, nn.Module, torch.Tensor]:
    """Export (or fetch from cache) a torchvision classifier to ONNX.

    Returns the ONNX file path, the torch model in eval mode (the same object every call: do
    not modify it) and the example input of shape (2, 3, size, size) used for the export.
    """
    key = (name, bool(dynamo), int(size))
    if key in _memory:
        return _memory[key]
    model = build_torch_model(name)
    example = example_input(size)
    flavour = "dynamo" if dynamo else "legacy"
    torch_version = torch.__version__.replace("+", "_")
    path = cache_dir() / f"{name}-{flavour}-{size}-torch{torch_version}.onnx"
    if not path.exists():
        started = time.perf_counter()
        partial = path.with_suffix(f".partial{os.getpid()}.onnx")
        if dynamo:
            _export_dynamo(model, example, partial)
        else:
            _export_legacy(model, example, partial)
        partial.replace(path)
        export_seconds[key] = time.perf_counter() - started
    _memory[key] = (path, model, example)
    return _memory[key]


def torch_layer_output(name: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The torch tensor that the default ONNX CAM layer corresponds to (the last feature map).

    ResNet: ``layer4``; RegNet: ``trunk_output``; DenseNet: ``relu(features(x))`` (its
    forward applies the ReLU functionally); the others: ``features``.
    """
    if name == "resnet18":
        stem = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        return model.layer4(model.layer3(model.layer2(model.layer1(stem))))
    if name == "regnet_x_400mf":
        return model.trunk_output(model.stem(x))
    if name == "densenet121":
        return F.relu(model.features(x))
    return model.features(x)


def torch_head(name: str, model: nn.Module, layer_output: torch.Tensor) -> torch.Tensor:
    """The logits computed from :func:`torch_layer_output` (the rest of the forward pass)."""
    if name == "resnet18":
        return model.fc(torch.flatten(model.avgpool(layer_output), 1))
    if name == "regnet_x_400mf":
        return model.fc(torch.flatten(model.avgpool(layer_output), 1))
    if name == "densenet121":
        return model.classifier(torch.flatten(F.adaptive_avg_pool2d(layer_output, (1, 1)), 1))
    if name == "mobilenet_v2":
        pooled = F.adaptive_avg_pool2d(layer_output, (1, 1))
        return model.classifier(torch.flatten(pooled, 1))
    if name == "squeezenet1_1":
        return torch.flatten(model.classifier(layer_output), 1)
    if name == "convnext_tiny":
        # ConvNeXt's classifier starts with LayerNorm2d and flattens by itself.
        return model.classifier(model.avgpool(layer_output))
    # vgg11_bn, mobilenet_v3_small, efficientnet_b0: avgpool, flatten, classifier
    return model.classifier(torch.flatten(model.avgpool(layer_output), 1))


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """Detach and copy a tensor to a float32 NumPy array."""
    return tensor.detach().cpu().numpy().astype(np.float32)


def export_timm(
    name: str, size: int = 224, **kwargs
) -> tuple[Path, nn.Module, torch.Tensor]:
    """Export (or fetch from cache) a timm model with random weights (legacy exporter,
    opset 17, dynamic batch). ``kwargs`` go to ``timm.create_model`` (e.g. a smaller
    ``embed_dim``); returns the ONNX path, the torch model and a (2, 3, size, size) example."""
    import timm

    settings = "-".join(f"{k}={v}" for k, v in sorted(kwargs.items())).replace(" ", "")
    key = (f"timm:{name}:{settings}", False, int(size))
    if key in _memory:
        return _memory[key]
    torch.manual_seed(SEED)
    model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs).eval()
    example = example_input(size)
    torch_version = torch.__version__.replace("+", "_")
    suffix = f"-{hashlib.sha1(settings.encode()).hexdigest()[:8]}" if settings else ""
    path = cache_dir() / f"timm-{name}{suffix}-legacy-{size}-torch{torch_version}.onnx"
    if not path.exists():
        started = time.perf_counter()
        partial = path.with_suffix(f".partial{os.getpid()}.onnx")
        _export_legacy(model, example, partial)
        partial.replace(path)
        export_seconds[key] = time.perf_counter() - started
    _memory[key] = (path, model, example)
    return _memory[key]
