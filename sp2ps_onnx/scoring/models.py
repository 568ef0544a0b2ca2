"""The models of a run: opening them, naming them, describing them.

One vocabulary for model files across the package: *read* parses an ONNX file
(:func:`sp2ps_onnx.graph.model_io.read_model`), *load* gives a ModelProto with its external
data (:func:`sp2ps_onnx.graph.model_io.load_model`), and *open* gives a runnable
:class:`~sp2ps_onnx.runtime.CamModel` (:func:`open_model`).
"""

from __future__ import annotations

import hashlib
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import onnx

from ..data import parse_size
from ..errors import ModelLoadError
from ..graph import parameter_count, weight_statistics
from ..graph.model_io import load_model
from ..runtime import CamModel

ModelLike = Any
"""A path, an ``onnx.ModelProto`` or a :class:`~sp2ps_onnx.runtime.CamModel`."""


@dataclass
class ModelInfo:
    """Facts about one model that the report shows next to its score."""

    name: str
    path: str | None
    sha256: str | None
    file_size: int | None
    parameters: int
    weight_count: int
    zero_weights: int
    num_classes: int | None = None
    layer: str | None = None
    layout: str | None = None
    input_shape: tuple[Any, ...] | None = None

    @property
    def sparsity(self) -> float:
        """Percentage of exactly-zero values in Conv/Gemm/MatMul weights (for quantized
        weights: values equal to the zero point), as :func:`sp2ps_onnx.graph.weight_statistics`
        counts them."""
        return 100.0 * self.zero_weights / self.weight_count if self.weight_count else 0.0

    def to_dict(self) -> dict[str, Any]:
        """All fields plus ``sparsity_percent``, JSON-ready."""
        return {
            "name": self.name,
            "path": self.path,
            "sha256": self.sha256,
            "file_size_bytes": self.file_size,
            "parameters": self.parameters,
            "weight_count": self.weight_count,
            "zero_weights": self.zero_weights,
            "sparsity_percent": self.sparsity,
            "num_classes": self.num_classes,
            "layer": self.layer,
            "layout": self.layout,
            "input_shape": list(self.input_shape) if self.input_shape is not None else None,
        }


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_cam_model(model: Any) -> bool:
    """Whether ``model`` is an opened model (a CamModel or a stand-in with its interface)."""
    return hasattr(model, "cams") and hasattr(model, "rewritten")


def count_parameters(proto: onnx.ModelProto) -> int:
    """Elements of the model's parameters: float weights, and the integer weights of
    quantized models (QDQ, QOperator, dynamic); quantization scales and zero points and
    shape constants do not count (see :func:`sp2ps_onnx.graph.parameter_count`)."""
    return parameter_count(proto)


def model_info(
    model: str | os.PathLike[str] | onnx.ModelProto,
    cam_model: Any | None = None,
    name: str | None = None,
    allow_domains: Sequence[str] = (),
) -> ModelInfo:
    """Describe a model file or ModelProto (and, if given, its CamModel's layer/layout)."""
    path = None if isinstance(model, onnx.ModelProto) else str(model)
    proto, _ = load_model(model, allow_domains)
    weight_count, zero_count = weight_statistics(proto)
    info = ModelInfo(
        name=name or (Path(path).stem if path else (proto.graph.name or "model")),
        path=path,
        sha256=file_sha256(path) if path else None,
        file_size=os.path.getsize(path) if path else model.ByteSize(),
        parameters=count_parameters(proto),
        weight_count=weight_count,
        zero_weights=zero_count,
    )
    if cam_model is not None:
        info.num_classes = int(cam_model.num_classes)
        info.layer = str(cam_model.layer)
        info.layout = str(cam_model.layout)
        info.input_shape = tuple(cam_model.input_shape)
    return info


def model_source(model: ModelLike) -> str | os.PathLike[str] | onnx.ModelProto:
    """The file or proto behind ``model`` (a CamModel must have been opened from a file)."""
    if is_cam_model(model):
        path = getattr(model, "path", None)
        if path:
            return path
        raise ModelLoadError("a CamModel without .path cannot be described; pass its file path")
    return model


def model_hash(cam_model: Any) -> str:
    """SHA-256 of an opened model's file, or of its rewritten graph when it has no file."""
    path = getattr(cam_model, "path", None)
    if path:
        return file_sha256(path)
    return hashlib.sha256(cam_model.rewritten.SerializeToString()).hexdigest()


def unique_names(models: Sequence[ModelLike]) -> list[str]:
    """One short name per model (the file stem), made unique with ``-2``, ``-3``, ..."""
    names: list[str] = []
    for index, model in enumerate(models):
        if isinstance(model, onnx.ModelProto) or is_cam_model(model):
            path = getattr(model, "path", None)
            base = Path(path).stem if path else f"model{index}"
        else:
            base = Path(model).stem
        name, suffix = base, 2
        while name in names:
            name, suffix = f"{base}-{suffix}", suffix + 1
        names.append(name)
    return names


def open_model(
    model: ModelLike,
    layer: str | None = None,
    providers: Sequence[str] | None = None,
    size: str | int | Sequence[int] | None = None,
    batch_size: int = 32,
    allow_domains: Sequence[str] = (),
    threads: int | None = None,
    spinning: bool = True,
    grid: tuple[int, int] | None = None,
) -> Any:
    """A CamModel for a path or ModelProto (a CamModel is returned unchanged).

    ``size`` is the input (H, W) for models whose spatial input dims are dynamic;
    ``allow_domains`` names custom-op domains to accept; ``threads`` is the sessions'
    intra-op thread count (default: ``$SP2PS_THREADS``, else one per physical core) and
    ``spinning`` whether their idle threads spin (see :func:`sp2ps_onnx.runtime.session_options`);
    ``grid`` states the (H, W) patch grid of a token layer the graph does not prove.
    """
    if is_cam_model(model):
        return model
    if not isinstance(model, onnx.ModelProto) and not Path(model).is_file():
        raise ModelLoadError(f"model file {model} does not exist; give the path of an .onnx file")
    return CamModel(
        model if isinstance(model, onnx.ModelProto) else str(model),
        layer=layer,
        providers=providers,
        input_size=parse_size(size),
        batch_size=batch_size,
        allow_domains=allow_domains,
        threads=threads,
        spinning=spinning,
        grid=grid,
    )


def package_versions() -> dict[str, str | None]:
    """Versions of Python and of the packages that produce the numbers."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("sp2ps-onnx", "onnx", "onnxruntime", "onnxruntime-gpu", "numpy", "scipy",
                 "scikit-image", "click"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions
