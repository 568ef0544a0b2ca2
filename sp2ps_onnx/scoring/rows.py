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
import mmap
import os
import shutil
import socket
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
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
    memory is a few numbers per sample, not a Python dict per sample. The columns of a
    run's report are memory-mapped files of a :class:`RowSpill` (``owner``, kept alive with
    the table): iterating reads them a chunk at a time, so writing ``per_sample.csv`` does
    not bring every model's rows into memory. ``faithfulness``: the faithfulness columns
    that hold a value (computed from the columns when not given).
    """

    def __init__(self, model: str, columns: dict[str, np.ndarray],
                 faithfulness: Sequence[str] | None = None, owner: Any = None) -> None:
        self.model = model
        self.columns = columns
        self._owner = owner
        # The faithfulness figures are columns of the rows only when they were measured.
        self.faithfulness = tuple(
            name for name in FAITHFULNESS_COLUMNS
            if name in columns and np.isfinite(columns[name]).any()
        ) if faithfulness is None else tuple(faithfulness)

    def __len__(self) -> int:
        return int(self.columns["index"].size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for start in range(0, len(self), _ROWS_PER_READ):
            stop = min(len(self), start + _ROWS_PER_READ)
            chunk = RowTable(self.model, {key: _read_part(column, start, stop)
                                          for key, column in self.columns.items()},
                             self.faithfulness)
            for i in range(stop - start):
                yield chunk[i]

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
            **self._stages(item),
        }

    def _stages(self, item: Any) -> dict[str, float | None]:
        """A per-stage run's similarities at every stage (``stage0_h``: the finest), ``None``
        where the original's CAM at that stage was not finite (the stage's score leaves the
        sample out)."""
        c = self.columns
        if "stage_h" not in c:
            return {}
        out: dict[str, float | None] = {}
        for k, flags in enumerate(np.asarray(c["stage_flags"][item])):
            kept = (int(flags) & FLAG_ORIGINAL_NONFINITE) == 0
            for key in ("spatial", "spectral", "h"):
                out[f"stage{k}_{key}"] = float(c[f"stage_{key}"][item][k]) if kept else None
        return out


_ROWS_PER_READ = 4096


def _read_part(column: np.ndarray, start: int, stop: int) -> np.ndarray:
    """``column[start:stop]`` in memory; a memory-mapped column is read from its file, so
    that the pages of a whole column never stay mapped into this process."""
    # Only a map of the file itself: a view's ``offset`` is its parent's.
    if (isinstance(column, np.memmap) and isinstance(column.base, mmap.mmap)
            and column.filename and column.ndim == 1):
        return np.fromfile(column.filename, dtype=column.dtype, count=stop - start,
                           offset=int(column.offset) + start * column.dtype.itemsize)
    return np.asarray(column[start:stop])


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


_EMPTY_DTYPES = {**dict.fromkeys(ROW_INT_COLUMNS, np.dtype(np.int64)),
                 **dict.fromkeys(ROW_FLOAT_COLUMNS, np.dtype(np.float64)), "id": np.dtype("<U1")}


SPILL_PREFIX = "sp2ps-rows-"
_OWNER = "owner"


def remove_abandoned_spills(folder: Path) -> list[Path]:
    """Remove the spills in ``folder`` whose process is gone without removing them (killed
    with SIGKILL, or ended by Ray); return them. Only on POSIX, and only the spills made on
    this host (a shared temporary folder may hold other machines' spills)."""
    if os.name != "posix":
        return []  # no harmless way to ask whether a process lives
    removed = []
    for spill in folder.glob(f"{SPILL_PREFIX}*"):
        try:
            host, pid = (spill / _OWNER).read_text().split()
            if host != socket.gethostname() or int(pid) == os.getpid():
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(spill, ignore_errors=True)
            removed.append(spill)
        except (OSError, ValueError):
            continue  # not ours to judge: unreadable, being written, another user's
    return removed


class RowSpill:
    """A run's rows on disk instead of in memory, read back one pruned model at a time.

    The rows are a few numbers per sample and pruned model (about 300 bytes: 141 MB for
    50k images and 10 models, gigabytes for millions of images). The driver appends each
    batch's rows here as they arrive (:meth:`add`: one file per model); the aggregation
    reads back the columns it needs of one model at a time, sorted by sample index
    (:meth:`columns`), and the report keeps memory-mapped columns (:meth:`table`,
    :meth:`keep`), so the driver's memory does not grow with the data. The folder (made
    under ``directory``, by default the system's temporary folder, ``$TMPDIR``) is
    removed when the spill and every :class:`RowTable` reading it are gone, and at exit;
    the folder of a process killed before that is removed by the next spill made there
    (:func:`remove_abandoned_spills`).
    """

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix=SPILL_PREFIX, dir=directory))
        self._remove = weakref.finalize(self, shutil.rmtree, str(self.directory), True)
        (self.directory / _OWNER).write_text(f"{socket.gethostname()} {os.getpid()}")
        remove_abandoned_spills(self.directory.parent)
        # Per model: the (rows, column dtypes) of each batch appended to its file.
        self._records: dict[int, list[tuple[int, tuple[str, ...]]]] = {}
        self._dtypes: dict[int, dict[str, np.dtype]] = {}  # per model, once settled
        # The columns kept: ROW_COLUMNS, and a per-stage run's STAGE_COLUMNS (rows, stages)
        # with their trailing shape, fixed by the first batch.
        self._keys: tuple[str, ...] = ROW_COLUMNS
        self._trailing: dict[str, tuple[int, ...]] = {}

    def add(self, rows: dict[str, np.ndarray]) -> None:
        """Append a batch's rows (:data:`ROW_COLUMNS`, and :data:`STAGE_COLUMNS` when
        present; any models, any order)."""
        models = np.asarray(rows["model"])
        if not self._records:
            self._keys = ROW_COLUMNS + tuple(k for k in STAGE_COLUMNS if k in rows)
            self._trailing = {k: np.asarray(rows[k]).shape[1:] for k in self._keys}
        for model in np.unique(models).tolist():
            if model in self._dtypes:
                raise ValueError(f"rows of model #{model} added after they were read back")
            mine = models == model
            part = [np.ascontiguousarray(np.asarray(rows[key])[mine]) for key in self._keys]
            with open(self._records_path(model), "ab") as handle:
                for column in part:
                    handle.write(column.tobytes())
            self._records.setdefault(model, []).append(
                (int(part[0].shape[0]), tuple(column.dtype.str for column in part)))

    def discard(self) -> None:
        """Remove the folder now (a run that failed)."""
        self._remove()

    def columns(self, model: int, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """The columns ``keys`` of ``model``'s rows in memory, in the order of a stable sort
        by sample index (the order of :func:`numpy.lexsort` on the whole table)."""
        dtypes = self._settle(model)
        return {key: np.fromfile(self._column_path(model, key), dtype=dtypes[key]).reshape(
                    (-1, *self._trailing.get(key, ()))) for key in keys if key in dtypes}

    def table(self, model: int) -> dict[str, np.ndarray]:
        """Every column of ``model``'s rows, memory-mapped (nothing read until used)."""
        dtypes = self._settle(model)
        return {key: self._mapped(self._column_path(model, key), dtype,
                                  self._trailing.get(key, ()))
                for key, dtype in dtypes.items()}

    def keep(self, model: int, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``arrays`` (per-sample values of ``model``) written here and memory-mapped."""
        kept = {}
        for key, array in arrays.items():
            path = self.directory / f"model-{model}" / f"kept-{key}.bin"
            np.ascontiguousarray(array).tofile(path)
            kept[key] = self._mapped(path, array.dtype)
        return kept

    @staticmethod
    def _mapped(path: Path, dtype: np.dtype, trailing: tuple[int, ...] = ()) -> np.ndarray:
        width = int(np.prod(trailing)) if trailing else 1
        size = path.stat().st_size // max(1, dtype.itemsize * width)
        if size == 0:
            return np.empty((0, *trailing), dtype=dtype)  # an empty file cannot be mapped
        return np.memmap(path, dtype=dtype, mode="r", shape=(size, *trailing))

    def _records_path(self, model: int) -> Path:
        return self.directory / f"model-{model}.rows"

    def _column_path(self, model: int, key: str) -> Path:
        return self.directory / f"model-{model}" / f"{key}.bin"

    def _settle(self, model: int) -> dict[str, np.dtype]:
        """Turn ``model``'s batches into one file per column, sorted by sample index (once).

        A column's dtype is that of :func:`numpy.concatenate` of its batches (the widest
        sample id, say), as the rows of an in-memory run have.
        """
        if model in self._dtypes:
            return self._dtypes[model]
        records = self._records.get(model, [])
        keys = self._keys if records else ROW_COLUMNS
        dtypes = {
            key: np.result_type(*(np.dtype(stored[k]) for _, stored in records))
            if records else _EMPTY_DTYPES[key]
            for k, key in enumerate(keys)
        }
        (self.directory / f"model-{model}").mkdir()
        outputs = {key: open(self._column_path(model, key), "wb") for key in keys}
        try:
            if records:
                with open(self._records_path(model), "rb") as handle:
                    for size, stored in records:
                        for key, dtype in zip(keys, map(np.dtype, stored), strict=True):
                            width = int(np.prod(self._trailing.get(key, ()))) or 1
                            column = np.frombuffer(
                                handle.read(size * width * dtype.itemsize), dtype)
                            outputs[key].write(column.astype(dtypes[key], copy=False).tobytes())
                self._records_path(model).unlink()
        finally:
            for output in outputs.values():
                output.close()
        self._dtypes[model] = dtypes
        self._sort(model)
        return dtypes

    def _sort(self, model: int) -> None:
        """Sort ``model``'s column files by sample index, stably, one column at a time
        (rows arrive in data order, so there is usually nothing to do)."""
        index = self.columns(model, ["index"])["index"]
        if index.size < 2 or not np.any(index[1:] < index[:-1]):
            return
        order = np.argsort(index, kind="stable")
        del index
        for key in self._dtypes[model]:
            column = np.ascontiguousarray(self.columns(model, [key])[key][order])
            column.tofile(self._column_path(model, key))
