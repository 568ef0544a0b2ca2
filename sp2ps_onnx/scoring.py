"""Scoring pruned models against an original with Sp2PS, over a whole dataset.

:func:`score_models` is what ``sp2ps score`` runs: it streams the data once, computes the
original model's CAMs once per batch and reuses them for every pruned model, feeds one
:class:`~sp2ps_onnx.metric.Sp2PSAccumulator` per pruned model, and keeps the worst and best
samples of each model (input and both CAMs) for the report. :func:`explain` is the loop
behind ``sp2ps cam``; :func:`model_info` describes an ONNX file (parameters, sparsity, hash).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .data import DataSource, Preprocessing, open_data, parse_size
from .errors import InputDataError, ModelLoadError, ModelMismatchError
from .progress import Progress, ProgressReporter

TARGET_MODES = ("label", "original", "self")
"""``label``: the true class; ``original``: the original model's top-1 class, for both
models; ``self``: each model's own top-1 class."""

ModelLike = Any  # a path, an onnx.ModelProto or a CamModel


# --------------------------------------------------------------------------------------
# Model description


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


def load_onnx(model: str | os.PathLike[str] | Any) -> Any:
    """Load an ONNX ModelProto (with external data, read only from inside the model's
    folder) or return a given one unchanged."""
    import onnx

    from .graph.model_io import load_external_data, read_model

    if isinstance(model, onnx.ModelProto):
        return model
    proto = read_model(model)
    load_external_data(proto, os.fspath(model))
    return proto


def count_parameters(proto: Any) -> int:
    """Elements of the model's parameters: float weights, and the integer weights of
    quantized models (QDQ, QOperator, dynamic); quantization scales and zero points and
    shape constants do not count (see :func:`sp2ps_onnx.graph.parameter_count`)."""
    from .graph import parameter_count

    return parameter_count(proto)


def model_info(
    model: str | os.PathLike[str] | Any, cam_model: Any | None = None, name: str | None = None
) -> ModelInfo:
    """Describe a model file or ModelProto (and, if given, its CamModel's layer/layout)."""
    path = None if _is_proto(model) else str(model)
    proto = load_onnx(model)
    from .graph import weight_statistics

    parameters = count_parameters(proto)
    weight_count, zero_count = weight_statistics(proto)
    info = ModelInfo(
        name=name or (Path(path).stem if path else (proto.graph.name or "model")),
        path=path,
        sha256=file_sha256(path) if path else None,
        file_size=os.path.getsize(path) if path else proto.ByteSize(),
        parameters=parameters,
        weight_count=weight_count,
        zero_weights=zero_count,
    )
    if cam_model is not None:
        info.num_classes = int(cam_model.num_classes)
        info.layer = str(cam_model.layer)
        info.layout = str(cam_model.layout)
        info.input_shape = tuple(cam_model.input_shape)
    return info


def _is_proto(model: Any) -> bool:
    return type(model).__name__ == "ModelProto"


def _unique_names(models: Sequence[Any]) -> list[str]:
    names: list[str] = []
    for index, model in enumerate(models):
        if _is_proto(model) or hasattr(model, "cams"):
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
    providers: list[str] | None = None,
    size: str | int | Sequence[int] | None = None,
    batch_size: int = 32,
    allow_domains: Sequence[str] = (),
) -> Any:
    """A CamModel for a path or ModelProto (a CamModel is returned unchanged).

    ``size`` is the input (H, W) for models whose spatial input dims are dynamic;
    ``allow_domains`` names custom-op domains to accept.
    """
    if hasattr(model, "cams") and hasattr(model, "rewritten"):
        return model
    from .runtime import CamModel

    if not _is_proto(model) and not Path(model).is_file():
        raise ModelLoadError(f"model file {model} does not exist; give the path of an .onnx file")
    return CamModel(
        model if _is_proto(model) else str(model),
        layer=layer,
        providers=providers,
        input_size=parse_size(size),
        batch_size=batch_size,
        allow_domains=allow_domains,
    )


# --------------------------------------------------------------------------------------
# Scoring


@dataclass
class Example:
    """One sample kept for the report (among a model's worst or best)."""

    sample_id: str
    index: int
    h: float
    spatial: float
    spectral: float
    label: int | None
    target_original: int
    target_pruned: int
    pred_original: int
    pred_pruned: int
    image: np.ndarray  # uint8 (H, W, C), as fed to the original model
    original_map: np.ndarray  # float (H, W) in [0, 1]
    pruned_map: np.ndarray


@dataclass
class ModelScore:
    """The Sp2PS result of one pruned model."""

    info: ModelInfo
    result: Any  # sp2ps_onnx.metric.Sp2PSResult
    worst: list[Example] = field(default_factory=list)
    best: list[Example] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def sp2ps(self) -> float:
        return float(self.result.sp2ps)


@dataclass
class ScoreReport:
    """Everything :func:`score_models` measured; :mod:`sp2ps_onnx.report` renders it."""

    original: ModelInfo
    models: list[ModelScore]
    config: dict[str, Any]
    n: int
    class_names: list[str] | None = None
    accuracy_original: float | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    faults: list[dict[str, str]] = field(default_factory=list)  # skipped samples: id, reason

    def ranked(self) -> list[ModelScore]:
        """Pruned models from the highest Sp2PS to the lowest (NaN last)."""
        return sorted(
            self.models, key=lambda m: (np.isnan(m.sp2ps), -np.nan_to_num(m.sp2ps, nan=0.0))
        )

    def _repr_html_(self) -> str:
        """Jupyter's view: the ranking and the Sp2PS-vs-accuracy scatter."""
        from .report import notebook_html

        return notebook_html(self)

    def to_dict(self) -> dict[str, Any]:
        """Every number and the full configuration, JSON-ready."""
        ranked = self.ranked()
        return {
            "config": self.config,
            "n": self.n,
            "class_names": self.class_names,
            "seconds": self.seconds,
            "original": {**self.original.to_dict(), "accuracy": self.accuracy_original},
            "ranking": [m.info.name for m in ranked],
            "notes": self.notes,
            "data_faults": self.faults,
            "models": [
                {
                    "rank": ranked.index(m) + 1,
                    **m.info.to_dict(),
                    "result": _jsonable(_result_dict(m.result)),
                }
                for m in self.models
            ],
        }


def _result_dict(result: Any) -> dict[str, Any]:
    data = dict(result.to_dict())
    data.pop("per_sample", None)  # per-sample values go to per_sample.csv
    return data


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if hasattr(value, "to_dict"):
        return _jsonable(value.to_dict())
    return value


def _check_labels(labels: np.ndarray | None, num_classes: int, ids: list[str]) -> None:
    if labels is None:
        return
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        first = int(bad[0])
        raise InputDataError(
            f"sample {ids[first]} has label {int(labels[first])} but the model has "
            f"{num_classes} classes (0..{num_classes - 1}); check the labels or --classes"
        )


class _ExampleKeeper:
    """Keeps the ``k`` lowest-h and ``k`` highest-h samples while streaming."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.worst: list[Example] = []
        self.best: list[Example] = []

    def candidates(self, h: np.ndarray) -> list[int]:
        """Indices of a batch that may enter the worst or best lists."""
        if self.k <= 0 or h.size == 0:
            return []
        order = np.argsort(np.nan_to_num(h, nan=-1.0), kind="stable")
        return sorted({int(i) for i in order[: self.k]} | {int(i) for i in order[-self.k :]})

    def add(self, examples: list[Example]) -> None:
        self.worst = sorted(self.worst + examples, key=lambda e: _h_key(e.h))[: self.k]
        self.best = sorted(self.best + examples, key=lambda e: -_h_key(e.h))[: self.k]


def _h_key(h: float) -> float:
    return -1.0 if np.isnan(h) else h


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
    import onnx

    from .graph.analysis import input_layout
    from .graph.model_io import dims_of, graph_inputs, read_model

    if hasattr(model, "cams") and hasattr(model, "rewritten"):
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
    from .graph.analysis import DEFAULT_SPATIAL

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


def score_models(
    original: ModelLike,
    pruned: Sequence[ModelLike],
    data: DataSource | str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | Iterable[Any],
    *,
    method: str = "gradcam",
    layer: str | None = None,
    pruned_layer: str | None = None,
    target: str | None = None,
    batch_size: int = 32,
    device: str = "auto",
    preset: str = "imagenet",
    mean: str | Sequence[float] | None = None,
    std: str | Sequence[float] | None = None,
    size: str | int | Sequence[int] | None = None,
    limit: int | None = None,
    classes: str | Sequence[str] | None = None,
    spatial: str = "ssim",
    spectral: str = "tv",
    aggregation: str = "mean",
    n_bootstrap: int = 1000,
    seed: int = 0,
    examples: int = 4,
    progress: Progress = False,
    quiet: bool = True,
    strict: bool = False,
    allow_domains: Sequence[str] = (),
) -> ScoreReport:
    """Score each pruned model against the original with Sp2PS over ``data``.

    ``data`` is what :func:`~sp2ps_onnx.data.open_data` opens: paths, or any iterable of
    ``(images, labels)`` batches (a DataLoader, a ``tf.data`` numpy iterator, ...).

    The original model's CAMs are computed once per batch and reused for every pruned
    model. Each model gets its own preprocessing (layout, channels, size) from ``preset``,
    ``mean``, ``std`` and ``size``. ``target`` is ``label``, ``original`` or ``self``
    (default: ``label`` when the data has labels, else ``original``). ``progress=True``
    draws a tqdm bar; a callable is called as ``progress(done, total)`` after each batch
    (``total`` is ``None`` when the data does not know its length). Unreadable images and
    empty folders are skipped and listed in the report (``strict=True``: an error);
    ``allow_domains`` names custom-op domains to accept.

    Raises :class:`~sp2ps_onnx.errors.ModelMismatchError`, before any compute, when a pruned
    model's image size, channel count or class count differs from the original's, and :class:`~sp2ps_onnx.errors.InputDataError` for data
    that cannot be read or does not fit.
    """
    from . import metric
    from ._ort import select_providers

    if not pruned:
        raise ModelMismatchError("no pruned model given; pass at least one pruned model to score")
    started = time.perf_counter()
    source = data if isinstance(data, DataSource) else open_data(
        data, classes=classes, limit=limit, strict=strict
    )
    mode = resolve_target(target, source.has_labels)
    providers = select_providers(device, quiet=quiet)
    names = _unique_names([original, *pruned])
    check_comparable(original, pruned, names, size)
    original_cam = open_model(original, layer, providers, size, batch_size, allow_domains)
    check_label_range(source, int(original_cam.num_classes))
    original_prep = Preprocessing.for_model(original_cam, preset, mean=mean, std=std, size=size)
    map_size = (original_prep.height, original_prep.width)
    pruned_cams, pruned_preps = [], []
    for model, name in zip(pruned, names[1:], strict=True):
        cam_model = open_model(
            model, pruned_layer or layer, providers, size or map_size, batch_size, allow_domains
        )
        if int(cam_model.num_classes) != int(original_cam.num_classes):
            raise ModelMismatchError(
                f"pruned model {name} has {cam_model.num_classes} classes but the original "
                f"{names[0]} has {original_cam.num_classes}; Sp2PS compares models of the same "
                "classifier, so give a pruned version of the original model"
            )
        pruned_cams.append(cam_model)
        pruned_preps.append(
            Preprocessing.for_model(cam_model, preset, mean=mean, std=std, size=size or map_size)
        )
    accumulators = [
        metric.Sp2PSAccumulator(
            spatial=spatial,
            spectral=spectral,
            aggregation=aggregation,
            keep_per_sample=True,
            n_bootstrap=n_bootstrap,
            seed=seed,
            normalize=True,
        )
        for _ in pruned_cams
    ]
    keepers = [_ExampleKeeper(examples) for _ in pruned_cams]
    rows: list[list[dict[str, Any]]] = [[] for _ in pruned_cams]
    total = source.size_hint
    report_progress = ProgressReporter(progress, total, "score")
    done = 0
    for batch in source.batches(batch_size):
        _check_labels(batch.labels, int(original_cam.num_classes), batch.ids)
        x_original, display = original_prep.with_display(batch.images)
        wanted = batch.labels if mode == "label" else None
        original_maps, original_targets, original_scores = original_cam.cams(
            x_original, method=method, targets=wanted, size=map_size, return_scores=True
        )
        original_targets = np.asarray(original_targets, dtype=np.int64)
        for j, (cam_model, prep) in enumerate(zip(pruned_cams, pruned_preps, strict=True)):
            x_pruned = prep(batch.images)
            pruned_wanted = None if mode == "self" else original_targets
            pruned_maps, pruned_targets, pruned_scores = cam_model.cams(
                x_pruned, method=method, targets=pruned_wanted, size=map_size, return_scores=True
            )
            pruned_targets = np.asarray(pruned_targets, dtype=np.int64)
            per_sample = accumulators[j].update(
                original_maps,
                pruned_maps,
                batch.labels,
                targets=original_targets,
                original_scores=original_scores,
                pruned_scores=pruned_scores,
            )
            h = np.asarray(per_sample.h, dtype=np.float64)
            s = np.asarray(per_sample.spatial, dtype=np.float64)
            f = np.asarray(per_sample.spectral, dtype=np.float64)
            pred_o = original_scores.argmax(axis=1)
            pred_p = pruned_scores.argmax(axis=1)
            for i in range(len(h)):
                rows[j].append(
                    {
                        "model": names[1 + j],
                        "index": done + i,
                        "id": batch.ids[i],
                        "label": None if batch.labels is None else int(batch.labels[i]),
                        "target_original": int(original_targets[i]),
                        "target_pruned": int(pruned_targets[i]),
                        "pred_original": int(pred_o[i]),
                        "pred_pruned": int(pred_p[i]),
                        "spatial": float(s[i]),
                        "spectral": float(f[i]),
                        "h": float(h[i]),
                    }
                )

            keepers[j].add(
                [
                    Example(
                        sample_id=batch.ids[i],
                        index=done + i,
                        h=float(h[i]),
                        spatial=float(s[i]),
                        spectral=float(f[i]),
                        label=None if batch.labels is None else int(batch.labels[i]),
                        target_original=int(original_targets[i]),
                        target_pruned=int(pruned_targets[i]),
                        pred_original=int(pred_o[i]),
                        pred_pruned=int(pred_p[i]),
                        image=display[i].copy(),
                        original_map=np.array(original_maps[i], dtype=np.float32),
                        pruned_map=np.array(pruned_maps[i], dtype=np.float32),
                    )
                    for i in keepers[j].candidates(h)
                ]
            )
        done += len(batch.ids)
        report_progress(done, total)
    report_progress.close()
    if done == 0:
        skipped = "".join(f"; skipped {f.id}: {f.reason}" for f in source.faults[:3])
        raise InputDataError(f"no samples were read from {source.description}{skipped}")
    results = [acc.result() for acc in accumulators]
    scores = []
    for j, (model, cam_model) in enumerate(zip(pruned, pruned_cams, strict=True)):
        info = model_info(_model_source(model, cam_model), cam_model, names[1 + j])
        scores.append(
            ModelScore(info, results[j], keepers[j].worst, keepers[j].best, rows[j])
        )
    original_info = model_info(_model_source(original, original_cam), original_cam, names[0])
    accuracy = getattr(results[0], "accuracy_original", None)
    notes = []
    if source.faults:
        listed = ", ".join(f.id for f in source.faults[:5])
        more = f" and {len(source.faults) - 5} more" if len(source.faults) > 5 else ""
        notes.append(
            f"skipped {len(source.faults)} unreadable sample(s) or empty folder(s): "
            f"{listed}{more} (results.json lists each with its reason; --strict makes "
            "them an error)"
        )
    if source.class_names and len(source.class_names) != int(original_cam.num_classes):
        notes.append(
            f"the data names {len(source.class_names)} classes but the model has "
            f"{original_cam.num_classes}; labels are the positions in that list, so give "
            "--classes with all the model's class names in label order if they differ"
        )
    config = {
        "method": method,
        "layer": layer,
        "pruned_layer": pruned_layer,
        "original_layer": str(original_cam.layer),
        "target": mode,
        "batch_size": batch_size,
        "device": device,
        "providers": providers,
        "preset": preset,
        "mean": list(original_prep.mean),
        "std": list(original_prep.std),
        "size": list(map_size),
        "limit": limit,
        "data": source.description,
        "data_preprocessed": source.preprocessed,
        "spatial": spatial,
        "spectral": spectral,
        "aggregation": aggregation,
        "n_bootstrap": n_bootstrap,
        "seed": seed,
        "versions": package_versions(),
    }
    return ScoreReport(
        original=original_info,
        models=scores,
        config=config,
        n=done,
        class_names=source.class_names,
        accuracy_original=None if accuracy is None else float(accuracy),
        seconds=time.perf_counter() - started,
        notes=notes,
        faults=[f.to_dict() for f in source.faults],
    )


def _model_source(model: ModelLike, cam_model: Any) -> Any:
    if hasattr(model, "cams"):
        path = getattr(model, "path", None)
        if path:
            return path
        raise ModelLoadError("a CamModel without .path cannot be described; pass its file path")
    return model


def package_versions() -> dict[str, str | None]:
    """Versions of Python and of the packages that produce the numbers."""
    import platform
    from importlib import metadata

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("sp2ps-onnx", "onnx", "onnxruntime", "onnxruntime-gpu", "numpy", "scipy",
                 "scikit-image", "click"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


# --------------------------------------------------------------------------------------
# CAMs for one model


@dataclass
class CamBatch:
    """CAMs of one batch from :func:`explain`."""

    ids: list[str]
    images: np.ndarray  # uint8 (N, H, W, C) as fed to the model
    maps: np.ndarray  # float32 (N, H, W) in [0, 1]
    targets: np.ndarray  # int64 (N,)
    scores: np.ndarray  # logits (N, K)
    labels: np.ndarray | None


def explain(
    model: ModelLike,
    data: DataSource | str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    method: str = "gradcam",
    layer: str | None = None,
    target: str | None = None,
    batch_size: int = 32,
    device: str = "auto",
    preset: str = "imagenet",
    mean: str | Sequence[float] | None = None,
    std: str | Sequence[float] | None = None,
    size: str | int | Sequence[int] | None = None,
    limit: int | None = None,
    classes: str | Sequence[str] | None = None,
    quiet: bool = True,
    strict: bool = False,
    allow_domains: Sequence[str] = (),
) -> Iterator[CamBatch]:
    """Yield the CAMs of ``model`` for ``data`` batch by batch.

    ``target`` is ``label`` (needs labels) or ``original``/``self`` (the model's top-1);
    the default is ``label`` when the data has labels, else the top-1 class. Unreadable
    images are skipped and recorded in the source's ``faults`` (``strict=True``: an error).
    """
    from ._ort import select_providers

    source = data if isinstance(data, DataSource) else open_data(
        data, classes=classes, limit=limit, strict=strict
    )
    mode = resolve_target(target, source.has_labels)
    cam_model = open_model(
        model, layer, select_providers(device, quiet=quiet), size, batch_size, allow_domains
    )
    check_label_range(source, int(cam_model.num_classes))
    prep = Preprocessing.for_model(cam_model, preset, mean=mean, std=std, size=size)
    for batch in source.batches(batch_size):
        _check_labels(batch.labels, int(cam_model.num_classes), batch.ids)
        x, display = prep.with_display(batch.images)
        wanted = batch.labels if mode == "label" else None
        maps, targets, scores = cam_model.cams(
            x, method=method, targets=wanted, size=(prep.height, prep.width), return_scores=True
        )
        yield CamBatch(
            ids=batch.ids,
            images=display,
            maps=np.asarray(maps, dtype=np.float32),
            targets=np.asarray(targets, dtype=np.int64),
            scores=np.asarray(scores),
            labels=batch.labels,
        )
