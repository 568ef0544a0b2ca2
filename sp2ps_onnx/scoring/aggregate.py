"""Step 2 of a run: the rows of all batches to every reported number.

One implementation: each pruned model's rows go to :func:`sp2ps_onnx.metric.summarize`,
the function the streaming :class:`~sp2ps_onnx.metric.Sp2PSAccumulator` also delegates to.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import metric
from ..errors import InputDataError, Sp2PSError
from ..runtime import thread_budget
from .options import MetricOptions
from .rows import (
    FAITHFULNESS,
    FAITHFULNESS_COLUMNS,
    FAULTS,
    FLAG_ORIGINAL_CONSTANT,
    FLAG_ORIGINAL_NONFINITE,
    Example,
    RowSpill,
    RowTable,
    keep_examples,
    keep_moved,
)


@dataclass
class Aggregate:
    """Every reported number of every pruned model, from the rows of all batches."""

    results: list[Any]  # metric.Sp2PSResult per pruned model
    rows: list[RowTable]
    worst: list[list[Example]]
    best: list[list[Example]]
    moved: list[list[Example]]  # same answer, lowest h
    faithfulness: list[dict[str, float] | None]  # per model, means over the samples
    original_faithfulness: dict[str, float] | None
    n: int
    faults: dict[str, Any]
    # Per model, per stage (layers="stages"; else empty): the stage's Sp2PSResult.
    stages: list[list[Any]] = field(default_factory=list)


def aggregate(
    rows: dict[str, np.ndarray] | RowSpill,
    candidates: Sequence[Sequence[Example]],
    names: Sequence[str],
    options: MetricOptions,
    *,
    expected: int | None = None,
    max_listed: int = 100,
    uncounted: Collection[int] = (),
) -> Aggregate:
    """Step 2: turn the rows of all batches (any order) into every reported number.

    ``rows`` are the rows of every pruned model, in memory or in a :class:`RowSpill` (then
    they are read one model at a time and the report's tables are memory-mapped; the
    numbers are the same). ``names`` are the pruned models' names; ``candidates`` their
    worst/best candidates from every batch; ``options`` say how they are aggregated. Each
    sample index must appear exactly once per model (and, with ``expected``, the indices
    must be ``0..expected-1``): a lost or duplicated row is an error, never a silently
    different score. The faults of the models at the positions ``uncounted`` are not
    counted (the random floor's flat CAMs are what a random network gives, not a fault).
    """
    source = rows if isinstance(rows, RowSpill) else _RowsInMemory(rows)
    reference = None
    if names:
        first = source.columns(0, ["index"])["index"]
        reference = _checked_indices(first, None, expected, names[0], names[0])

    def one(j: int) -> _ModelPart:
        return _model_part(source, j, names, reference,
                           _Setting(options, candidates, max_listed, j in uncounted))

    # Models side by side (each bootstrap has its own seeded generator, so the numbers do
    # not depend on the threads; its draws and indexing release the GIL); one model's
    # columns per thread in memory.
    threads = min(len(names), thread_budget())
    if threads <= 1:
        parts = [one(j) for j in range(len(names))]
    else:
        with ThreadPoolExecutor(threads, thread_name_prefix="sp2ps-summary") as pool:
            parts = list(pool.map(one, range(len(names))))
    return Aggregate(
        [p.result for p in parts], [p.table for p in parts], [p.worst for p in parts],
        [p.best for p in parts], [p.moved for p in parts], [p.faithfulness for p in parts],
        parts[0].original_faithfulness if parts else None,
        0 if reference is None else int(reference.size),
        _fault_summary([p.faults for p in parts], names, max_listed),
        [p.stages for p in parts] if any(p.stages for p in parts) else [],
    )


class _RowsInMemory:
    """The rows of all models in one in-memory table, with :class:`RowSpill`'s reading
    methods (each model's rows sorted by sample index)."""

    def __init__(self, rows: dict[str, np.ndarray]) -> None:
        order = np.lexsort((rows["index"], rows["model"]))
        self._table = {key: value[order] for key, value in rows.items()}

    def columns(self, model: int, keys: Sequence[str]) -> dict[str, np.ndarray]:
        lo, hi = np.searchsorted(self._table["model"], [model, model + 1])
        return {key: self._table[key][lo:hi] for key in keys if key in self._table}

    def table(self, model: int) -> dict[str, np.ndarray]:
        return self.columns(model, list(self._table))

    def keep(self, model: int, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return arrays


@dataclass(frozen=True)
class _Setting:
    """What :func:`_model_part` needs beyond the rows."""

    options: MetricOptions
    candidates: Sequence[Sequence[Example]]
    max_listed: int
    uncounted: bool


@dataclass
class _ModelPart:
    """Every reported number of one pruned model."""

    result: Any
    table: RowTable
    worst: list[Example]
    best: list[Example]
    moved: list[Example]
    faithfulness: dict[str, float] | None
    original_faithfulness: dict[str, float] | None
    faults: dict[int, tuple[int, list[tuple[str, int]]]]  # per fault bit: count, first hits
    stages: list[Any]  # per stage (layers="stages"; else empty): the stage's Sp2PSResult


_AGGREGATED = ("index", "flags", "label", "spatial", "spectral", "h", "target_original",
               "pred_original", "pred_pruned", "confidence_original", "confidence_pruned",
               "js_divergence")


def _model_part(
    source: RowSpill | _RowsInMemory, j: int, names: Sequence[str],
    reference: np.ndarray | None, setting: _Setting,
) -> _ModelPart:
    """The numbers of pruned model ``j`` from its rows (read from ``source`` alone)."""
    cols = source.columns(j, _AGGREGATED)
    if j:
        _checked_indices(cols["index"], reference, None, names[j], names[0])
    kept = (cols["flags"] & FLAG_ORIGINAL_NONFINITE) == 0
    if not kept.any():
        raise InputDataError(
            "the original model gave NaN or infinite outputs for every sample; check the "
            "model and the preprocessing (--preset, --mean, --std)"
        )
    every = bool(kept.all())
    # The kept samples' values (all of them: the columns themselves, not a copy).
    of_kept = {key: cols[key] if every else cols[key][kept] for key in _AGGREGATED[2:]}
    labels = of_kept["label"]
    samples = metric.SampleTable.of_rows(
        of_kept["spatial"], of_kept["spectral"], of_kept["h"],
        labels=labels if np.all(labels >= 0) else None,
        targets=of_kept["target_original"],
        pred_original=of_kept["pred_original"],
        pred_pruned=of_kept["pred_pruned"],
        confidence_original=of_kept["confidence_original"],
        confidence_pruned=of_kept["confidence_pruned"],
        js_divergence=of_kept["js_divergence"],
    )
    present, means = _faithfulness(source, j, kept)
    faults = _model_faults(source, j, cols, setting)
    options = setting.options
    result = _summary(samples, options)
    result.per_sample = source.keep(j, result.per_sample)
    stage_cols = source.columns(j, ("stage_h", "stage_spatial", "stage_spectral", "stage_flags",
                                    "label", "target_original"))
    stages = [] if "stage_h" not in stage_cols else [
        _summary(table, options) for table in _stage_tables(stage_cols)]
    found = setting.candidates[j] if j < len(setting.candidates) else []
    worst, best = keep_examples(found, options.examples)
    return _ModelPart(result, RowTable(names[j], source.table(j), present, owner=source),
                      worst, best, keep_moved(found, options.examples), means["pruned"],
                      means["original"] if j == 0 else None, faults, stages)


def _summary(table: metric.SampleTable, options: MetricOptions) -> Any:
    """One table's Sp2PSResult, aggregated as ``options`` say."""
    return metric.summarize(table, aggregation=options.aggregation,
                            n_bootstrap=options.n_bootstrap, seed=options.seed,
                            config=options.component_config())


def _stage_tables(cols: dict[str, np.ndarray]) -> list[metric.SampleTable]:
    """One model's per-stage sample tables: the samples a one-layer run at that stage would
    keep (the original's CAM there finite), grouped as the main table groups them."""
    tables = []
    for k in range(cols["stage_h"].shape[1]):
        kept = (cols["stage_flags"][:, k] & FLAG_ORIGINAL_NONFINITE) == 0
        labels = cols["label"][kept]
        tables.append(metric.SampleTable.of_rows(
            cols["stage_spatial"][kept, k], cols["stage_spectral"][kept, k],
            cols["stage_h"][kept, k],
            labels=labels if np.all(labels >= 0) else None,
            targets=cols["target_original"][kept],
        ))
    return tables


def _faithfulness(
    source: RowSpill | _RowsInMemory, j: int, kept: np.ndarray
) -> tuple[list[str], dict[str, dict[str, float] | None]]:
    """The faithfulness columns of model ``j`` that hold a value, and the mean of each
    figure of both models over the samples where it is defined (ROAD is undefined on some
    flat maps; ``None`` when it was not measured). One column in memory at a time."""
    present: list[str] = []
    means: dict[str, dict[str, float] | None] = {}
    for who in ("original", "pruned"):
        figures: dict[str, float] = {}
        for name in FAITHFULNESS:
            column = source.columns(j, [f"{name}_{who}"])[f"{name}_{who}"]
            if np.isfinite(column).any():
                present.append(f"{name}_{who}")
            values = column[kept]
            finite = values[np.isfinite(values)]
            figures[name] = float(finite.mean()) if finite.size else float("nan")
        means[who] = None if all(np.isnan(v) for v in figures.values()) else figures
    return [name for name in FAITHFULNESS_COLUMNS if name in present], means


def _checked_indices(
    index: np.ndarray, reference: np.ndarray | None, expected: int | None, name: str,
    first_name: str,
) -> np.ndarray:
    """``index`` (one model's sorted sample indices) if it has no duplicate and the same
    samples as the first model's ``reference`` (and, for the first, ``0..expected-1``)."""
    if index.size > 1 and np.any(index[1:] == index[:-1]):
        dup = int(index[1:][index[1:] == index[:-1]][0])
        raise Sp2PSError(f"sample #{dup} was scored twice for model {name}; rows are corrupt")
    if reference is None:
        if expected is not None and not np.array_equal(index, np.arange(expected)):
            missing = np.setdiff1d(np.arange(expected), index)
            raise Sp2PSError(
                f"{missing.size} of {expected} samples have no row for model {name} "
                f"(first: #{int(missing[0]) if missing.size else -1}); rows were lost"
            )
        return index
    if not np.array_equal(index, reference):
        raise Sp2PSError(f"model {name} has rows for other samples than {first_name}")
    return reference


def _model_faults(
    source: RowSpill | _RowsInMemory, j: int, cols: dict[str, np.ndarray], setting: _Setting,
) -> dict[int, tuple[int, list[tuple[str, int]]]]:
    """Per fault bit: how many of model ``j``'s rows have it, and the (id, index) of the
    first ``max_listed`` of them. The original model's faults are properties of the sample,
    counted once (with the first model); an uncounted model (the random floor) has none."""
    flags = np.zeros_like(cols["flags"]) if setting.uncounted else cols["flags"]
    found: dict[int, tuple[int, np.ndarray]] = {}
    for bit in FAULTS:
        hit = (flags & bit) != 0
        if bit in (FLAG_ORIGINAL_NONFINITE, FLAG_ORIGINAL_CONSTANT) and j != 0:
            hit[:] = False
        positions = np.flatnonzero(hit)
        found[bit] = (int(positions.size), positions[: setting.max_listed])
    if not any(count for count, _ in found.values()):
        return {bit: (0, []) for bit in found}
    ids = source.columns(j, ["id"])["id"]  # only read when a row is to be listed
    return {bit: (count, [(str(ids[i]), int(cols["index"][i])) for i in positions])
            for bit, (count, positions) in found.items()}


def _fault_summary(
    faults: Sequence[dict[int, tuple[int, list[tuple[str, int]]]]], names: Sequence[str],
    max_listed: int,
) -> dict[str, Any]:
    """The fault counts and the first ``max_listed`` faulty rows (by fault, then model,
    then sample), from each model's :func:`_model_faults`."""
    counts: dict[str, int] = {}
    listed: list[dict[str, Any]] = []
    for bit, fault in FAULTS.items():
        counts[fault] = sum(per_model[bit][0] for per_model in faults)
        sample_fault = bit in (FLAG_ORIGINAL_NONFINITE, FLAG_ORIGINAL_CONSTANT)
        for j, per_model in enumerate(faults):
            for sample_id, index in per_model[bit][1][: max(0, max_listed - len(listed))]:
                listed.append({"fault": fault, "id": sample_id, "index": index,
                               "model": None if sample_fault else names[j]})
    total = sum(counts.values())
    return {"counts": counts, "total": total, "samples": listed,
            "listed": len(listed), "truncated": total > len(listed)}
