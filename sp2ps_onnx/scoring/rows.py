"""Per-sample rows and the samples kept for the report.

A scoring run produces one row per (pruned model, sample): both models' targets and
predictions, the spatial, spectral and harmonic similarity, the softmax confidences and
fault flags (:data:`ROW_COLUMNS`). Rows are columns of NumPy arrays, so a 10k-sample run
holds a few numbers per sample. :class:`Example` is one sample kept with its image and both
CAMs, among a model's worst and best. Both serialise to ``.npz`` without pickle, for the
checkpoint and the Ray backend.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


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
        # The faithfulness figures are columns of the rows only when they were measured.
        self.faithfulness = tuple(
            name for name in FAITHFULNESS_COLUMNS
            if name in columns and np.isfinite(columns[name]).any()
        )

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
            "js_divergence": float(c["js_divergence"][item]),
            "fault": fault_names(int(c["flags"][item])),
            **{name: float(c[name][item]) for name in self.faithfulness},
        }


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
FAITHFULNESS = ("deletion_auc", "insertion_auc", "cam_mult_change", "road_morf", "road_lerf",
                "road_combined")
"""The faithfulness figures of :class:`sp2ps_onnx.faithfulness.FaithfulnessResult`."""
FAITHFULNESS_COLUMNS = tuple(f"{name}_{who}" for who in ("original", "pruned")
                             for name in FAITHFULNESS)
ROW_FLOAT_COLUMNS = ("spatial", "spectral", "h", "confidence_original", "confidence_pruned",
                     "js_divergence", *FAITHFULNESS_COLUMNS)
ROW_COLUMNS = (*ROW_INT_COLUMNS, *ROW_FLOAT_COLUMNS, "id")
"""The per-sample row table, one row per (pruned model, sample): ``model`` is the pruned
model's position, ``index`` the sample's position in the data, ``label`` -1 when unknown,
``pred_*`` -1 when the model gave no finite scores, ``js_divergence`` the Jensen-Shannon
divergence (base 2, in [0, 1]) of both models' softmax outputs, ``<figure>_original`` and
``<figure>_pruned`` each model's faithfulness figures (:data:`FAITHFULNESS`; NaN unless
asked for), ``confidence_*`` both models' softmax
confidence in the original's target class, ``flags`` a sum of :data:`FAULTS` bits."""

STAGE_COLUMNS = ("stage_spatial", "stage_spectral", "stage_h", "stage_flags")
"""A per-stage run's (``CamOptions(layers="stages")``) extra columns, (rows, stages) each:
the similarity of both models' CAMs at every stage, finest first, and the stage's
NaN/Inf flags (:data:`FLAG_ORIGINAL_NONFINITE`, :data:`FLAG_PRUNED_NONFINITE`)."""


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
        arrays = {f"row.{key}": value for key, value in self.rows.items()}
        for j, candidates in enumerate(self.examples):
            arrays.update(examples_to_arrays(candidates, f"ex{j}."))
        arrays["n_models"] = np.array(len(self.examples))
        return npz_bytes(arrays)

    @classmethod
    def from_bytes(cls, data: bytes) -> BatchOutput:
        arrays = npz_arrays(data)
        rows = {key[4:]: value for key, value in arrays.items() if key.startswith("row.")}
        examples = [examples_from_arrays(arrays, f"ex{j}.") for j in range(int(arrays["n_models"]))]
        return cls(rows, examples)


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """``arrays`` as the bytes of an ``.npz`` archive."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def npz_arrays(data: bytes) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` archive's bytes (never unpickles)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


_EXAMPLE_SCALARS = ("index", "h", "spatial", "spectral", "label", "target_original",
                    "target_pruned", "pred_original", "pred_pruned")


def examples_to_arrays(examples: list[Example], prefix: str) -> dict[str, np.ndarray]:
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


def examples_from_arrays(arrays: dict[str, np.ndarray], prefix: str) -> list[Example]:
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


def same_answer(example: Example) -> bool:
    """Whether both models gave the sample the same (valid) top-1 class."""
    return example.pred_original >= 0 and example.pred_original == example.pred_pruned


def keep_moved(examples: Sequence[Example], k: int) -> list[Example]:
    """"Same answer, attention moved": the ``k`` lowest-h examples that both models classify
    identically (ties: the lower sample index)."""
    return sorted((e for e in examples if same_answer(e)), key=_worst_key)[:k]


def concat_rows(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One row table from several (in any order)."""
    if not parts:
        return {key: np.empty(0, dtype=np.int64) for key in ROW_COLUMNS}
    present = [key for key in (*ROW_COLUMNS, *STAGE_COLUMNS) if key in parts[0]]
    return {key: np.concatenate([p[key] for p in parts]) for key in present}


def merge_candidates(kept: list[Example], found: list[Example], k: int) -> list[Example]:
    """The examples of ``kept`` and ``found`` that can still be among the ``k`` worst, best
    or same-answer-lowest, in sample order."""
    both = [*kept, *found]
    worst, best = keep_examples(both, k)
    chosen = worst + best + keep_moved(both, k)
    return sorted({e.index: e for e in chosen}.values(), key=lambda e: e.index)
