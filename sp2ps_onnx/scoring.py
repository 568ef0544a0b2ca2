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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .data import Batch, DataSource, Preprocessing, open_data, parse_size
from .errors import InputDataError, ModelLoadError, ModelMismatchError, Sp2PSError
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
    threads: int | None = None,
) -> Any:
    """A CamModel for a path or ModelProto (a CamModel is returned unchanged).

    ``size`` is the input (H, W) for models whose spatial input dims are dynamic;
    ``allow_domains`` names custom-op domains to accept; ``threads`` is the sessions'
    intra-op thread count (default: ``$SP2PS_THREADS``, else one per physical core).
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
        threads=threads,
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


class RowTable(Sequence[dict[str, Any]]):
    """The per-sample rows of one pruned model, stored as columns.

    Indexing or iterating gives one dict per sample (the columns of ``per_sample.csv``);
    memory is a few numbers per sample, not a Python dict per sample.
    """

    def __init__(self, model: str, columns: dict[str, np.ndarray]) -> None:
        self.model = model
        self.columns = columns

    def __len__(self) -> int:
        return int(self.columns["index"].size)

    def __getitem__(self, item: Any) -> Any:
        if isinstance(item, slice):
            return [self[i] for i in range(*item.indices(len(self)))]
        c = self.columns
        label = int(c["label"][item])
        return {
            "model": self.model,
            "index": int(c["index"][item]),
            "id": str(c["id"][item]),
            "label": None if label < 0 else label,
            "target_original": int(c["target_original"][item]),
            "target_pruned": int(c["target_pruned"][item]),
            "pred_original": int(c["pred_original"][item]),
            "pred_pruned": int(c["pred_pruned"][item]),
            "spatial": float(c["spatial"][item]),
            "spectral": float(c["spectral"][item]),
            "h": float(c["h"][item]),
            "confidence_original": float(c["confidence_original"][item]),
            "confidence_pruned": float(c["confidence_pruned"][item]),
            "fault": fault_names(int(c["flags"][item])),
        }


@dataclass
class ModelScore:
    """The Sp2PS result of one pruned model."""

    info: ModelInfo
    result: Any  # sp2ps_onnx.metric.Sp2PSResult
    worst: list[Example] = field(default_factory=list)
    best: list[Example] = field(default_factory=list)
    rows: Sequence[dict[str, Any]] = field(default_factory=list)

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
    model_faults: dict[str, Any] = field(default_factory=dict)  # NaN/Inf outputs, flat CAMs

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
            "model_faults": _jsonable(self.model_faults),
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


# --------------------------------------------------------------------------------------
# Step 1: the per-batch kernel

# Per-row fault flags. A sample whose original model gives NaN/Inf has no reference CAM and
# is left out of every aggregate; a pruned model that gives NaN/Inf has lost the attention
# entirely and scores s = f = h = 0; a constant (all-zero) CAM is scored by the metric's
# own rule for constant maps and only counted.
FLAG_ORIGINAL_NONFINITE = 1
FLAG_PRUNED_NONFINITE = 2
FLAG_ORIGINAL_CONSTANT = 4
FLAG_PRUNED_CONSTANT = 8
FAULTS = {
    FLAG_ORIGINAL_NONFINITE: "original_nonfinite",
    FLAG_PRUNED_NONFINITE: "pruned_nonfinite",
    FLAG_ORIGINAL_CONSTANT: "original_constant_cam",
    FLAG_PRUNED_CONSTANT: "pruned_constant_cam",
}

ROW_INT_COLUMNS = ("model", "index", "label", "target_original", "target_pruned",
                   "pred_original", "pred_pruned", "flags")
ROW_FLOAT_COLUMNS = ("spatial", "spectral", "h", "confidence_original", "confidence_pruned")
ROW_COLUMNS = (*ROW_INT_COLUMNS, *ROW_FLOAT_COLUMNS, "id")
"""The per-sample row table, one row per (pruned model, sample): ``model`` is the pruned
model's position, ``index`` the sample's position in the data, ``label`` -1 when unknown,
``pred_*`` -1 when the model gave no finite scores, ``confidence_*`` both models' softmax
confidence in the original's target class, ``flags`` a sum of :data:`FAULTS` bits."""


def fault_names(flags: int) -> str:
    """The fault names of a row's ``flags``, joined by ``+`` (empty when none)."""
    return "+".join(name for bit, name in FAULTS.items() if flags & bit)


@dataclass
class BatchOutput:
    """What the kernel returns for one batch: its rows and its worst/best candidates."""

    rows: dict[str, np.ndarray]
    examples: list[list[Example]]  # per pruned model: this batch's candidates

    def to_bytes(self) -> bytes:
        """Serialise as an ``.npz`` archive (no pickle), for checkpoints and Ray."""
        import io

        arrays = {f"row.{key}": value for key, value in self.rows.items()}
        for j, candidates in enumerate(self.examples):
            arrays.update(_examples_to_arrays(candidates, f"ex{j}."))
        arrays["n_models"] = np.array(len(self.examples))
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> BatchOutput:
        import io

        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
        rows = {key[4:]: value for key, value in arrays.items() if key.startswith("row.")}
        examples = [_examples_from_arrays(arrays, f"ex{j}.") for j in range(int(arrays["n_models"]))]
        return cls(rows, examples)


_EXAMPLE_SCALARS = ("index", "h", "spatial", "spectral", "label", "target_original",
                    "target_pruned", "pred_original", "pred_pruned")


def _examples_to_arrays(examples: list[Example], prefix: str) -> dict[str, np.ndarray]:
    if not examples:
        return {}
    arrays = {
        f"{prefix}{name}": np.array(
            [-1 if getattr(e, name) is None else getattr(e, name) for e in examples]
        )
        for name in _EXAMPLE_SCALARS
    }
    arrays[f"{prefix}sample_id"] = np.array([e.sample_id for e in examples])
    for name in ("image", "original_map", "pruned_map"):
        arrays[f"{prefix}{name}"] = np.stack([getattr(e, name) for e in examples])
    return arrays


def _examples_from_arrays(arrays: dict[str, np.ndarray], prefix: str) -> list[Example]:
    if f"{prefix}index" not in arrays:
        return []
    out = []
    for i in range(arrays[f"{prefix}index"].size):
        label = int(arrays[f"{prefix}label"][i])
        out.append(
            Example(
                sample_id=str(arrays[f"{prefix}sample_id"][i]),
                index=int(arrays[f"{prefix}index"][i]),
                h=float(arrays[f"{prefix}h"][i]),
                spatial=float(arrays[f"{prefix}spatial"][i]),
                spectral=float(arrays[f"{prefix}spectral"][i]),
                label=None if label < 0 else label,
                target_original=int(arrays[f"{prefix}target_original"][i]),
                target_pruned=int(arrays[f"{prefix}target_pruned"][i]),
                pred_original=int(arrays[f"{prefix}pred_original"][i]),
                pred_pruned=int(arrays[f"{prefix}pred_pruned"][i]),
                image=arrays[f"{prefix}image"][i],
                original_map=arrays[f"{prefix}original_map"][i],
                pruned_map=arrays[f"{prefix}pruned_map"][i],
            )
        )
    return out


def _worst_key(example: Example) -> tuple[float, int]:
    # NaN sorts as the worst; ties go to the earlier sample, whatever the batching.
    return (-1.0 if np.isnan(example.h) else example.h, example.index)


def _best_key(example: Example) -> tuple[float, int]:
    return (-(-1.0 if np.isnan(example.h) else example.h), example.index)


def keep_examples(examples: Sequence[Example], k: int) -> tuple[list[Example], list[Example]]:
    """The ``k`` lowest-h and ``k`` highest-h examples (ties: the lower sample index)."""
    worst = sorted(examples, key=_worst_key)[:k]
    best = sorted(examples, key=_best_key)[:k]
    return worst, best


@dataclass
class _Prepared:
    ids: list[str]
    indices: np.ndarray
    labels: np.ndarray | None
    x_original: np.ndarray
    display: np.ndarray
    x_pruned: list[np.ndarray]


@dataclass
class _ModelOutputs:
    prepared: _Prepared
    original: tuple[np.ndarray, np.ndarray, np.ndarray]  # maps, targets, scores
    pruned: list[tuple[np.ndarray, np.ndarray, np.ndarray]]


class BatchScorer:
    """The per-batch kernel: a batch of images to per-sample rows for every pruned model.

    The original's CAMs are computed once per batch and reused for every pruned model.
    Three steps, so that callers can overlap them: :meth:`prepare` (decode-side NumPy
    work), :meth:`run_models` (ONNX Runtime, which releases the GIL) and :meth:`rows`
    (the metric); :meth:`__call__` runs all three. Both backends (local and Ray) use it.
    """

    def __init__(
        self,
        original: Any,
        pruned: Sequence[Any],
        original_prep: Preprocessing,
        pruned_preps: Sequence[Preprocessing],
        *,
        method: str,
        mode: str,
        spatial: str = "ssim",
        spectral: str = "tv",
        examples: int = 4,
        strict: bool = False,
    ) -> None:
        self.original = original
        self.pruned = list(pruned)
        self.original_prep = original_prep
        self.pruned_preps = list(pruned_preps)
        self.method = method
        self.mode = mode
        self.spatial = spatial
        self.spectral = spectral
        self.examples = int(examples)
        self.strict = strict
        self.map_size = (original_prep.height, original_prep.width)

    def __call__(self, batch: Batch, indices: np.ndarray) -> BatchOutput:
        return self.rows(self.run_models(self.prepare(batch, indices)))

    def prepare(self, batch: Batch, indices: np.ndarray) -> _Prepared:
        """Check labels and preprocess the batch for every model (shared where equal)."""
        _check_labels(batch.labels, int(self.original.num_classes), batch.ids)
        x_original, display = self.original_prep.with_display(batch.images)
        cache = {self.original_prep: x_original}
        x_pruned = []
        for prep in self.pruned_preps:
            if prep not in cache:
                cache[prep] = prep(batch.images)
            x_pruned.append(cache[prep])
        return _Prepared(
            list(batch.ids), np.asarray(indices, dtype=np.int64), batch.labels, x_original,
            display, x_pruned,
        )

    def run_models(self, prepared: _Prepared) -> _ModelOutputs:
        """CAMs, targets and scores of the original and every pruned model."""
        wanted = prepared.labels if self.mode == "label" else None
        original = self._cams(self.original, prepared.x_original, wanted)
        pruned_wanted = None if self.mode == "self" else original[1]
        pruned = [
            self._cams(model, x, pruned_wanted)
            for model, x in zip(self.pruned, prepared.x_pruned, strict=True)
        ]
        return _ModelOutputs(prepared, original, pruned)

    def _cams(self, model: Any, x: np.ndarray, targets: np.ndarray | None) -> tuple:
        maps, used, scores = model.cams(
            x, method=self.method, targets=targets, size=self.map_size, return_scores=True
        )
        return np.asarray(maps), np.asarray(used, dtype=np.int64), np.asarray(scores)

    def rows(self, outputs: _ModelOutputs, workers: int | None = None) -> BatchOutput:
        """Per-sample rows and worst/best candidates for every pruned model.

        ``workers``: threads of the metric (see :func:`~sp2ps_onnx.metric.sp2ps`).
        """
        from . import metric

        prepared = outputs.prepared
        n = len(prepared.ids)
        maps_o, targets_o, scores_o = outputs.original
        bad_o = _nonfinite(maps_o, scores_o)
        maps_o = np.where(bad_o[:, None, None], 0.0, maps_o).astype(maps_o.dtype, copy=False)
        flat_o = _constant(maps_o) & ~bad_o
        pred_o = _top1(scores_o, bad_o)
        labels = (
            np.full(n, -1, dtype=np.int64) if prepared.labels is None
            else np.asarray(prepared.labels, dtype=np.int64)
        )
        explained = np.clip(targets_o, 0, scores_o.shape[1] - 1)
        conf_o = _confidence(scores_o, explained, bad_o)
        ids = np.array(prepared.ids, dtype=str)
        cleaned = []
        for maps_p, _, scores_p in outputs.pruned:
            bad_p = _nonfinite(maps_p, scores_p) & ~bad_o
            maps_p = np.where(bad_p[:, None, None], 0.0, maps_p).astype(maps_p.dtype, copy=False)
            cleaned.append((maps_p, bad_p))
        # One metric call for all pruned models: the original's share of the work is done
        # once per batch, and the per-call overhead too (it matters for small maps).
        per_model = metric.sp2ps_many(
            maps_o, [maps_p for maps_p, _ in cleaned], self.spatial, self.spectral,
            normalize=True, workers=workers,
        )
        parts, examples = [], []
        for j, ((_, targets_p, scores_p), (maps_p, bad_p), per) in enumerate(
            zip(outputs.pruned, cleaned, per_model, strict=True)
        ):
            lost = bad_o | bad_p
            s = np.where(lost, 0.0, per.spatial)
            f = np.where(lost, 0.0, per.spectral)
            h = np.where(lost, 0.0, per.h)
            flags = (
                bad_o * FLAG_ORIGINAL_NONFINITE
                + bad_p * FLAG_PRUNED_NONFINITE
                + flat_o * FLAG_ORIGINAL_CONSTANT
                + (_constant(maps_p) & ~lost) * FLAG_PRUNED_CONSTANT
            ).astype(np.int64)
            if self.strict and flags.any():
                first = int(np.flatnonzero(flags)[0])
                raise InputDataError(
                    f"sample {prepared.ids[first]}: {fault_names(int(flags[first]))} "
                    f"(pruned model #{j + 1}); --strict turns such samples into errors, "
                    "drop it to score them with defined values instead"
                )
            pred_p = _top1(scores_p, bad_p | bad_o)
            part = {
                "model": np.full(n, j, dtype=np.int64),
                "index": prepared.indices,
                "label": labels,
                "target_original": targets_o.astype(np.int64),
                "target_pruned": targets_p.astype(np.int64),
                "pred_original": pred_o,
                "pred_pruned": pred_p,
                "flags": flags,
                "spatial": s.astype(np.float64),
                "spectral": f.astype(np.float64),
                "h": h.astype(np.float64),
                "confidence_original": conf_o,
                "confidence_pruned": _confidence(scores_p, explained, bad_p | bad_o),
                "id": ids,
            }
            parts.append(part)
            examples.append(self._candidates(part, prepared, maps_o, maps_p, bad_o))
        rows = {key: np.concatenate([p[key] for p in parts]) for key in ROW_COLUMNS}
        return BatchOutput(rows, examples)

    def _candidates(
        self, part: dict[str, np.ndarray], prepared: _Prepared, maps_o: np.ndarray,
        maps_p: np.ndarray, skipped: np.ndarray,
    ) -> list[Example]:
        if self.examples <= 0:
            return []
        usable = np.flatnonzero(~skipped)
        h = part["h"][usable]
        ranked_h = np.where(np.isnan(h), -1.0, h)
        index = part["index"][usable]
        # The same order as keep_examples' keys, found in NumPy so that Example objects
        # are built only for the few samples that can be kept.
        worst = usable[np.lexsort((index, ranked_h))[: self.examples]]
        best = usable[np.lexsort((index, -ranked_h))[: self.examples]]
        examples = [
            Example(
                sample_id=str(part["id"][i]),
                index=int(part["index"][i]),
                h=float(part["h"][i]),
                spatial=float(part["spatial"][i]),
                spectral=float(part["spectral"][i]),
                label=None if part["label"][i] < 0 else int(part["label"][i]),
                target_original=int(part["target_original"][i]),
                target_pruned=int(part["target_pruned"][i]),
                pred_original=int(part["pred_original"][i]),
                pred_pruned=int(part["pred_pruned"][i]),
                image=prepared.display[i],
                original_map=maps_o[i],
                pruned_map=maps_p[i],
            )
            for i in np.union1d(worst, best)
        ]
        worst, best = keep_examples(examples, self.examples)
        chosen = {e.index: e for e in worst + best}
        return [
            Example(**{**e.__dict__, "image": e.image.copy(),
                       "original_map": np.array(e.original_map, dtype=np.float32),
                       "pruned_map": np.array(e.pruned_map, dtype=np.float32)})
            for e in sorted(chosen.values(), key=lambda e: e.index)
        ]


def _nonfinite(maps: np.ndarray, scores: np.ndarray) -> np.ndarray:
    return ~(
        np.isfinite(scores).all(axis=1)
        & np.isfinite(maps.reshape(len(maps), -1)).all(axis=1)
    )


def _constant(maps: np.ndarray) -> np.ndarray:
    flat = maps.reshape(len(maps), -1)
    return flat.max(axis=1) == flat.min(axis=1)


def _top1(scores: np.ndarray, bad: np.ndarray) -> np.ndarray:
    safe = np.where(bad[:, None], 0.0, scores)
    return np.where(bad, -1, safe.argmax(axis=1)).astype(np.int64)


def _confidence(scores: np.ndarray, classes: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """Softmax probability of ``classes`` (0 for samples without finite scores)."""
    logits = np.where(bad[:, None], 0.0, scores).astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    chosen = logits[np.arange(len(logits)), classes] / logits.sum(axis=1)
    return np.where(bad, 0.0, chosen)


# --------------------------------------------------------------------------------------
# Step 2: aggregation of the rows


@dataclass
class Aggregate:
    """Every reported number of every pruned model, from the rows of all batches."""

    results: list[Any]  # metric.Sp2PSResult per pruned model
    rows: list[RowTable]
    worst: list[list[Example]]
    best: list[list[Example]]
    n: int
    faults: dict[str, Any]


def concat_rows(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One row table from several (in any order)."""
    if not parts:
        return {key: np.empty(0, dtype=np.int64) for key in ROW_COLUMNS}
    return {key: np.concatenate([p[key] for p in parts]) for key in ROW_COLUMNS}


def aggregate(
    rows: dict[str, np.ndarray],
    candidates: Sequence[Sequence[Example]],
    names: Sequence[str],
    *,
    expected: int | None = None,
    aggregation: str = "mean",
    n_bootstrap: int = 1000,
    seed: int = 0,
    examples: int = 4,
    metric_config: dict[str, Any] | None = None,
    max_listed: int = 100,
) -> Aggregate:
    """Step 2: turn the rows of all batches (any order) into every reported number.

    ``names`` are the pruned models' names; ``candidates`` their worst/best candidates from
    every batch. Each sample index must appear exactly once per model (and, with
    ``expected``, the indices must be ``0..expected-1``): a lost or duplicated row is an
    error, never a silently different score.
    """

    order = np.lexsort((rows["index"], rows["model"]))
    table = {key: value[order] for key, value in rows.items()}
    summaries, tables, worst, best = [], [], [], []
    reference: np.ndarray | None = None
    for j, name in enumerate(names):
        lo, hi = np.searchsorted(table["model"], [j, j + 1])
        cols = {key: value[lo:hi] for key, value in table.items()}
        index = cols["index"]
        if index.size > 1 and np.any(index[1:] == index[:-1]):
            dup = int(index[1:][index[1:] == index[:-1]][0])
            raise Sp2PSError(f"sample #{dup} was scored twice for model {name}; rows are corrupt")
        if reference is None:
            reference = index
            if expected is not None and not np.array_equal(index, np.arange(expected)):
                missing = np.setdiff1d(np.arange(expected), index)
                raise Sp2PSError(
                    f"{missing.size} of {expected} samples have no row for model {name} "
                    f"(first: #{int(missing[0]) if missing.size else -1}); rows were lost"
                )
        elif not np.array_equal(index, reference):
            raise Sp2PSError(f"model {name} has rows for other samples than {names[0]}")
        kept = (cols["flags"] & FLAG_ORIGINAL_NONFINITE) == 0
        if not kept.any():
            raise InputDataError(
                "the original model gave NaN or infinite outputs for every sample; check the "
                "model and the preprocessing (--preset, --mean, --std)"
            )
        labels = cols["label"][kept]
        summaries.append(
            dict(
                spatial=cols["spatial"][kept], spectral=cols["spectral"][kept],
                h=cols["h"][kept],
                labels=labels if np.all(labels >= 0) else None,
                targets=cols["target_original"][kept],
                pred_original=cols["pred_original"][kept],
                pred_pruned=cols["pred_pruned"][kept],
                confidence_original=cols["confidence_original"][kept],
                confidence_pruned=cols["confidence_pruned"][kept],
                aggregation=aggregation,
                n_bootstrap=n_bootstrap,
                seed=seed,
                config=metric_config,
            )
        )
        tables.append(RowTable(name, cols))
        w, b = keep_examples(candidates[j] if j < len(candidates) else [], examples)
        worst.append(w)
        best.append(b)
    results = _summarize_all(summaries)
    faults = _fault_summary(table, names, max_listed)
    return Aggregate(results, tables, worst, best,
                     0 if reference is None else int(reference.size), faults)


def _summarize_all(summaries: list[dict[str, Any]]) -> list[Any]:
    """:func:`~sp2ps_onnx.metric.summarize` for every model, models side by side.

    Each model's bootstrap has its own seeded generator, so the numbers do not depend on
    the threads; its random draws and indexing release the GIL.
    """
    from concurrent.futures import ThreadPoolExecutor

    from . import metric
    from .runtime import thread_budget

    def one(kwargs: dict[str, Any]) -> Any:
        return metric.summarize(**kwargs)

    threads = min(len(summaries), thread_budget())
    if threads <= 1:
        return [one(kwargs) for kwargs in summaries]
    with ThreadPoolExecutor(threads, thread_name_prefix="sp2ps-summary") as pool:
        return list(pool.map(one, summaries))


def _fault_summary(
    table: dict[str, np.ndarray], names: Sequence[str], max_listed: int
) -> dict[str, Any]:
    counts: dict[str, int] = {}
    listed: list[dict[str, Any]] = []
    flags = table["flags"]
    for bit, fault in FAULTS.items():
        hit = (flags & bit) != 0
        if bit in (FLAG_ORIGINAL_NONFINITE, FLAG_ORIGINAL_CONSTANT):
            hit &= table["model"] == 0  # a property of the sample, counted once
        counts[fault] = int(np.count_nonzero(hit))
        for i in np.flatnonzero(hit)[: max(0, max_listed - len(listed))]:
            listed.append({
                "fault": fault,
                "id": str(table["id"][i]),
                "index": int(table["index"][i]),
                "model": None if bit in (FLAG_ORIGINAL_NONFINITE, FLAG_ORIGINAL_CONSTANT)
                else names[int(table["model"][i])],
            })
    total = sum(counts.values())
    return {"counts": counts, "total": total, "samples": listed,
            "listed": len(listed), "truncated": total > len(listed)}


# --------------------------------------------------------------------------------------
# The whole run


def build_scorer(
    original: ModelLike,
    pruned: Sequence[ModelLike],
    names: Sequence[str],
    *,
    mode: str,
    method: str = "gradcam",
    layer: str | None = None,
    pruned_layer: str | None = None,
    providers: list[str] | None = None,
    batch_size: int = 32,
    preset: str = "imagenet",
    mean: str | Sequence[float] | None = None,
    std: str | Sequence[float] | None = None,
    size: str | int | Sequence[int] | None = None,
    spatial: str = "ssim",
    spectral: str = "tv",
    examples: int = 4,
    strict: bool = False,
    allow_domains: Sequence[str] = (),
    session_threads: int | None = None,
) -> BatchScorer:
    """Open every model once (rewrite, session) and build the per-batch kernel.

    ``session_threads``: intra-op threads of every session (see :func:`plan_execution`).
    """
    original_cam = open_model(
        original, layer, providers, size, batch_size, allow_domains, session_threads
    )
    original_prep = Preprocessing.for_model(original_cam, preset, mean=mean, std=std, size=size)
    map_size = (original_prep.height, original_prep.width)
    pruned_cams, pruned_preps = [], []
    for model, name in zip(pruned, names[1:], strict=True):
        cam_model = open_model(
            model, pruned_layer or layer, providers, size or map_size, batch_size, allow_domains,
            session_threads,
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
    return BatchScorer(
        original_cam, pruned_cams, original_prep, pruned_preps, method=method, mode=mode,
        spatial=spatial, spectral=spectral, examples=examples, strict=strict,
    )


#: At most this many batches are scored at once on the CPU: beyond it the gain is small
#: and every batch in flight holds its own activations in each ONNX Runtime session.
MAX_IN_FLIGHT = 4


@dataclass(frozen=True)
class ExecutionPlan:
    """How a local scoring run uses the cores.

    ``in_flight`` batches are scored at once, each by one worker thread that runs all the
    models and the metric of its batch in turn; ``session_threads`` is the intra-op thread
    count of every ONNX Runtime session (``None``: ONNX Runtime's default) and
    ``metric_workers`` the metric's threads per batch (``None``: its default).
    """

    in_flight: int
    session_threads: int | None
    metric_workers: int | None


def plan_execution(providers: Sequence[str] | None) -> ExecutionPlan:
    """The execution plan for these ONNX Runtime providers on this machine.

    On the CPU the run's thread budget (``$SP2PS_THREADS``, else the physical cores) is
    split between batches, not spent inside each ONNX Runtime call: with ``k`` batches in
    flight every session gets ``budget // k`` intra-op threads and the metric one thread,
    so the threads never outnumber the budget. Scoring whole batches side by side needs
    no synchronisation between them, whereas intra-op threads meet at a barrier after
    every operator and the metric, run beside them, stalls that barrier; small models
    (tens of microseconds per operator) lose a third of their speed to it. On a GPU
    ONNX Runtime needs little CPU: two batches overlap so that one batch's metric runs
    while the next one's models run on the device.
    """
    from .runtime import thread_budget

    on_cpu = not providers or providers[0] == "CPUExecutionProvider"
    if not on_cpu:
        return ExecutionPlan(in_flight=2, session_threads=None, metric_workers=None)
    budget = thread_budget()
    in_flight = max(1, min(MAX_IN_FLIGHT, budget))
    return ExecutionPlan(in_flight, max(1, budget // in_flight), 1)


class _Prefetcher:
    """Reads an iterator in a background thread, ``depth`` items ahead (decoding overlaps
    the scoring of earlier batches). Exceptions reach the consumer in order."""

    _END = object()

    def __init__(self, iterator: Iterator[Any], depth: int) -> None:
        import queue
        import threading

        self._iterator = iterator
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="sp2ps-read", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        import queue

        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self) -> None:
        try:
            for item in self._iterator:
                if not self._put((item, None)):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            self._put((self._END, exc))
            return
        self._put((self._END, None))

    def __iter__(self) -> Iterator[Any]:
        while True:
            item, error = self._queue.get()
            if error is not None:
                raise error
            if item is self._END:
                return
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _run_local(
    scorer: BatchScorer,
    source: DataSource,
    batch_size: int,
    start: int,
    on_output: Callable[[BatchOutput], None],
    plan: ExecutionPlan | None = None,
) -> None:
    """Stream ``source`` through the kernel from sample ``start`` on.

    A reader thread decodes batches ahead; ``plan.in_flight`` worker threads score whole
    batches side by side (ONNX Runtime, NumPy and SciPy's FFT release the GIL). Outputs
    reach ``on_output`` in data order, and at most ``in_flight + 1`` batches are held.
    """
    from collections import deque
    from concurrent.futures import Future, ThreadPoolExecutor

    plan = plan or ExecutionPlan(1, None, None)

    def score(batch: Batch, indices: np.ndarray) -> BatchOutput:
        outputs = scorer.run_models(scorer.prepare(batch, indices))
        return scorer.rows(outputs, plan.metric_workers)

    reader = _Prefetcher(source.batches(batch_size, start=start), plan.in_flight)
    pending: deque[Future[BatchOutput]] = deque()
    offset = start
    with ThreadPoolExecutor(plan.in_flight, thread_name_prefix="sp2ps-batch") as pool:
        try:
            for batch in reader:
                indices = np.arange(offset, offset + len(batch.ids))
                offset += len(batch.ids)
                pending.append(pool.submit(score, batch, indices))
                while pending and (len(pending) > plan.in_flight or pending[0].done()):
                    on_output(pending.popleft().result())
            while pending:
                on_output(pending.popleft().result())
        except BaseException:
            for job in pending:
                job.cancel()
            raise
        finally:
            reader.close()


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
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = False,
    checkpoint_every: float = 10.0,
    backend: str = "local",
    ray_address: str | None = None,
    workers: int | None = None,
    gpus_per_worker: float = 0.0,
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

    NaN/Inf model outputs and constant CAMs get defined values and are counted in
    ``ScoreReport.model_faults``; ``strict=True`` turns them into errors. With ``checkpoint``
    (a directory) the per-sample rows are saved every ``checkpoint_every`` seconds and
    when the run stops, and ``resume=True`` continues a run that was interrupted (Ctrl-C or
    kill); the directory is left for the caller to remove once the report is written. ``backend="ray"`` runs the batches on a Ray
    cluster (``ray_address``: ``None`` for a local Ray, ``"auto"`` or ``"ray://..."``) with
    ``workers`` actors of ``gpus_per_worker`` GPUs each; the numbers are the same.

    Raises :class:`~sp2ps_onnx.errors.ModelMismatchError`, before any compute, when a pruned
    model's image size, channel count or class count differs from the original's, and :class:`~sp2ps_onnx.errors.InputDataError` for data
    that cannot be read or does not fit.
    """
    from ._ort import select_providers

    if not pruned:
        raise ModelMismatchError("no pruned model given; pass at least one pruned model to score")
    if backend not in ("local", "ray"):
        raise InputDataError(f"unknown backend {backend!r}; choose local or ray")
    if resume and checkpoint is None:
        raise InputDataError("resume=True continues the rows saved in checkpoint=; give it")
    started = time.perf_counter()
    source = data if isinstance(data, DataSource) else open_data(
        data, classes=classes, limit=limit, strict=strict
    )
    mode = resolve_target(target, source.has_labels)
    providers = select_providers(device, quiet=quiet)
    names = _unique_names([original, *pruned])
    check_comparable(original, pruned, names, size)
    options = dict(
        mode=mode, method=method, layer=layer, pruned_layer=pruned_layer, batch_size=batch_size,
        preset=preset, mean=mean, std=std, size=size, spatial=spatial, spectral=spectral,
        examples=examples, strict=strict, allow_domains=tuple(allow_domains),
    )
    plan = plan_execution(providers)
    scorer = build_scorer(
        original, pruned, names, providers=providers, session_threads=plan.session_threads,
        **options,
    )
    check_label_range(source, int(scorer.original.num_classes))
    total = source.size_hint
    report_progress = ProgressReporter(progress, total, "score")
    store = None
    if checkpoint is not None:
        from .checkpoint import RowStore

        store = RowStore(
            checkpoint,
            fingerprint=_fingerprint(scorer, source, options, total),
            resume=resume,
            flush_seconds=checkpoint_every,
        )
    parts: list[dict[str, np.ndarray]] = []
    candidates: list[list[Example]] = [[] for _ in scorer.pruned]
    done = 0

    def collect(output: BatchOutput) -> None:
        nonlocal done
        parts.append(output.rows)
        for j, found in enumerate(output.examples):
            candidates[j] = _merge_candidates(candidates[j], found, examples)
        done += int(np.count_nonzero(output.rows["model"] == 0))
        if store is not None:
            store.add(output.rows, candidates, len(getattr(source, "faults", ())))
        report_progress(done, total)

    if store is not None and store.done:
        parts.append(store.saved_rows())
        candidates = store.saved_examples(len(scorer.pruned))
        done = store.done
    try:
        if backend == "ray":
            from .distributed import run_ray

            run_ray(
                original, pruned, names, source, options=options, start=done,
                on_output=collect, address=ray_address, workers=workers,
                gpus_per_worker=gpus_per_worker, quiet=quiet,
            )
        else:
            _run_local(scorer, source, batch_size, done, collect, plan)
    except BaseException:
        report_progress.close()
        if store is not None:
            store.flush()  # on Ctrl-C too: every finished batch is kept for --resume
            store.discard_if_empty()
        raise
    report_progress.close()
    if store is not None:
        store.flush()
    if done == 0:
        if store is not None:
            store.discard_if_empty()
        skipped = "".join(f"; skipped {f.id}: {f.reason}" for f in source.faults[:3])
        raise InputDataError(f"no samples were read from {source.description}{skipped}")
    result = aggregate(
        concat_rows(parts), candidates, names[1:], expected=done, aggregation=aggregation,
        n_bootstrap=n_bootstrap, seed=seed, examples=examples,
        metric_config={"spatial": spatial, "spectral": spectral, "normalize": True},
    )
    report = _report(
        original, pruned, names, scorer, source, result, options, providers,
        device=device, limit=limit, aggregation=aggregation, n_bootstrap=n_bootstrap, seed=seed,
        backend=backend,
    )
    report.seconds = time.perf_counter() - started
    return report


def _merge_candidates(kept: list[Example], found: list[Example], k: int) -> list[Example]:
    worst, best = keep_examples([*kept, *found], k)
    return sorted({e.index: e for e in worst + best}.values(), key=lambda e: e.index)


def _fingerprint(
    scorer: BatchScorer, source: DataSource, options: dict[str, Any], total: int
) -> dict[str, Any]:
    """What must match for a saved run to be resumed."""
    models = []
    for cam_model in [scorer.original, *scorer.pruned]:
        path = getattr(cam_model, "path", None)
        models.append(file_sha256(path) if path else hashlib.sha256(
            cam_model.rewritten.SerializeToString()).hexdigest())
    return {
        "models": models,
        "data": source.description,
        "n": total,
        "options": _jsonable({k: v for k, v in options.items() if k != "examples"}),
        "examples": options["examples"],
    }


def _report(
    original: ModelLike, pruned: Sequence[ModelLike], names: Sequence[str], scorer: BatchScorer,
    source: DataSource, result: Aggregate, options: dict[str, Any], providers: list[str], *,
    device: str, limit: int | None, aggregation: str, n_bootstrap: int, seed: int, backend: str,
) -> ScoreReport:
    original_cam = scorer.original
    scores = []
    for j, (model, cam_model) in enumerate(zip(pruned, scorer.pruned, strict=True)):
        info = model_info(_model_source(model, cam_model), cam_model, names[1 + j])
        scores.append(ModelScore(info, result.results[j], result.worst[j], result.best[j],
                                 result.rows[j]))
    original_info = model_info(_model_source(original, original_cam), original_cam, names[0])
    accuracy = getattr(result.results[0], "accuracy_original", None)
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
    if result.faults.get("total"):
        counts = ", ".join(f"{count} {name.replace('_', ' ')}"
                           for name, count in result.faults["counts"].items() if count)
        notes.append(
            f"faults: {counts}; NaN/Inf outputs of the original leave the sample out, of a "
            "pruned model score h = 0; constant CAMs are scored by the metric's rule for "
            "constant maps (see model_faults in results.json; --strict makes them errors)"
        )
    prep = scorer.original_prep
    config = {
        "method": options["method"],
        "layer": options["layer"],
        "pruned_layer": options["pruned_layer"],
        "original_layer": str(original_cam.layer),
        "target": options["mode"],
        "batch_size": options["batch_size"],
        "device": device,
        "providers": providers,
        "preset": options["preset"],
        "mean": list(prep.mean),
        "std": list(prep.std),
        "size": list(scorer.map_size),
        "limit": limit,
        "data": source.description,
        "data_preprocessed": source.preprocessed,
        "spatial": options["spatial"],
        "spectral": options["spectral"],
        "aggregation": aggregation,
        "n_bootstrap": n_bootstrap,
        "seed": seed,
        "strict": options["strict"],
        "backend": backend,
        "versions": package_versions(),
    }
    return ScoreReport(
        original=original_info,
        models=scores,
        config=config,
        n=result.n,
        class_names=source.class_names,
        accuracy_original=None if accuracy is None else float(accuracy),
        notes=notes,
        faults=[f.to_dict() for f in source.faults],
        model_faults=result.faults,
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
    # The next batches are decoded in a thread while ONNX Runtime explains this one.
    reader = _Prefetcher(source.batches(batch_size), depth=2)
    try:
        for batch in reader:
            _check_labels(batch.labels, int(cam_model.num_classes), batch.ids)
            x, display = prep.with_display(batch.images)
            wanted = batch.labels if mode == "label" else None
            maps, targets, scores = cam_model.cams(
                x, method=method, targets=wanted, size=(prep.height, prep.width),
                return_scores=True,
            )
            yield CamBatch(
                ids=batch.ids,
                images=display,
                maps=np.asarray(maps, dtype=np.float32),
                targets=np.asarray(targets, dtype=np.int64),
                scores=np.asarray(scores),
                labels=batch.labels,
            )
    finally:
        reader.close()
