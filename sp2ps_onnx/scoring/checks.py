"""Checks made before and while scoring: models that can be compared, labels that fit,
and the class each CAM explains."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from ..data import DataSource, parse_size
from ..errors import InputDataError, ModelMismatchError
from ..graph.analysis import DEFAULT_SPATIAL, input_layout
from ..graph.model_io import dims_of, graph_inputs, read_model
from .models import ModelLike, is_cam_model
from .options import TARGET_MODES


def check_labels(labels: np.ndarray | None, num_classes: int, ids: list[str]) -> None:
    if labels is None:
        return
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        first = int(bad[0])
        raise InputDataError(
            f"sample {ids[first]} has label {int(labels[first])} but the model has "
            f"{num_classes} classes (0..{num_classes - 1}); check the labels or --classes"
        )


@dataclass(frozen=True)
class _DeclaredImage:
    """What a model's file declares about its image input and class scores (None: dynamic)."""

    name: str
    layout: str
    channels: int | None
    size: tuple[int | None, int | None]
    classes: int | None


def _declared_image(model: ModelLike, name: str) -> _DeclaredImage | None:
    """Read the declared input/output dims without running anything (None if not 4-D)."""
    if is_cam_model(model):
        spatial = model.input_spatial_size
        return _DeclaredImage(name, str(model.layout), int(model.channels),
                              (int(spatial[0]), int(spatial[1])), int(model.num_classes))
    proto = model if isinstance(model, onnx.ModelProto) else read_model(model)
    inputs = graph_inputs(proto.graph)
    if len(inputs) != 1 or len(dims_of(inputs[0])) != 4 or not proto.graph.output:
        return None
    dims = [d if isinstance(d, int) else None for d in dims_of(inputs[0])]
    layout = input_layout(dims_of(inputs[0]))
    channels, size = (dims[3], (dims[1], dims[2])) if layout == "NHWC" else (
        dims[1], (dims[2], dims[3])
    )
    out = dims_of(proto.graph.output[0])[1:]
    scores = all(isinstance(d, int) for d in out) and sum(d != 1 for d in out) == 1
    classes = int(np.prod(out)) if scores else None  # else opening the model says what it is
    return _DeclaredImage(name, layout, channels, size, classes)


def check_comparable(
    original: ModelLike,
    pruned: Sequence[ModelLike],
    names: Sequence[str],
    size: str | int | Sequence[int] | None = None,
) -> None:
    """Refuse, before any compute, pruned models whose image size, channel count or class
    count differs from the original's. The layout (NCHW or NHWC) may differ: each model
    gets its own preprocessing of the same image."""
    reference = _declared_image(original, names[0])
    if reference is None:
        return  # opening the original explains what is wrong with it
    requested = parse_size(size) or (DEFAULT_SPATIAL, DEFAULT_SPATIAL)
    ref_size = reference.size if None not in reference.size else requested
    for model, name in zip(pruned, names[1:], strict=True):
        other = _declared_image(model, name)
        if other is None:
            continue
        fix = ("Sp2PS compares CAMs of the same images, so give a pruned version of the "
               "original model")
        if None not in (reference.channels, other.channels) and reference.channels != other.channels:
            raise ModelMismatchError(
                f"pruned model {name} takes {other.channels}-channel images but the original "
                f"{reference.name} takes {reference.channels}-channel images; {fix}"
            )
        if None not in other.size and other.size != ref_size:
            h, w = ref_size
            how = "" if None not in reference.size else (
                " (its input size is dynamic; it runs at --size, default 224)"
            )
            raise ModelMismatchError(
                f"pruned model {name} takes {other.size[0]}x{other.size[1]} images but the "
                f"original {reference.name} takes {h}x{w}{how}; {fix}"
                + (f", or pass --size {other.size[0]},{other.size[1]}" if how else "")
            )
        if None not in (reference.classes, other.classes) and reference.classes != other.classes:
            raise ModelMismatchError(
                f"pruned model {name} has {other.classes} classes but the original "
                f"{reference.name} has {reference.classes}; {fix}"
            )


def check_label_range(source: DataSource, num_classes: int) -> None:
    """Refuse labels outside 0..num_classes-1 before any image is read or scored."""
    largest = source.max_label
    if largest is not None and largest >= num_classes:
        raise InputDataError(
            f"the data {source.description} has label {largest} but the model has "
            f"{num_classes} classes (0..{num_classes - 1}); check the labels, the class "
            "folders or --classes"
        )


def resolve_target(target: str | None, has_labels: bool) -> str:
    """The target mode to use: ``label`` when labels exist, else ``original``."""
    if target is None or target == "auto":
        return "label" if has_labels else "original"
    if target not in TARGET_MODES:
        raise InputDataError(f"unknown target {target!r}; choose one of {', '.join(TARGET_MODES)}")
    if target == "label" and not has_labels:
        raise InputDataError(
            "--target label needs labels, but the data has none; use an image folder with class "
            "subfolders or an .npz with y, or choose --target original"
        )
    return target
