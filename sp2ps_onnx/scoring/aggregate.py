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
    FAULTS,
    FLAG_ORIGINAL_CONSTANT,
    FLAG_ORIGINAL_NONFINITE,
    Example,
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
    rows: dict[str, np.ndarray],
    candidates: Sequence[Sequence[Example]],
    names: Sequence[str],
    options: MetricOptions,
    *,
    expected: int | None = None,
    max_listed: int = 100,
    uncounted: Collection[int] = (),
) -> Aggregate:
    """Step 2: turn the rows of all batches (any order) into every reported number.

    ``names`` are the pruned models' names; ``candidates`` their worst/best candidates from
    every batch; ``options`` say how they are aggregated. Each sample index must appear
    exactly once per model (and, with ``expected``, the indices must be
    ``0..expected-1``): a lost or duplicated row is an error, never a silently different
    score. The faults of the models at the positions ``uncounted`` are not counted (the
    random floor's flat CAMs are what a random network gives, not a fault).
    """
    order = np.lexsort((rows["index"], rows["model"]))
    table = {key: value[order] for key, value in rows.items()}
    summaries, tables, worst, best, moved, faithful = [], [], [], [], [], []
    stage_tables: list[list[metric.SampleTable]] = []
    original_faithful = None
    reference: np.ndarray | None = None
    for j, name in enumerate(names):
        lo, hi = np.searchsorted(table["model"], [j, j + 1])
        cols = {key: value[lo:hi] for key, value in table.items()}
        reference = _checked_indices(cols["index"], reference, expected, name, names[0])
        kept = (cols["flags"] & FLAG_ORIGINAL_NONFINITE) == 0
        if not kept.any():
            raise InputDataError(
                "the original model gave NaN or infinite outputs for every sample; check the "
                "model and the preprocessing (--preset, --mean, --std)"
            )
        labels = cols["label"][kept]
        samples = metric.SampleTable.of_rows(
            cols["spatial"][kept], cols["spectral"][kept], cols["h"][kept],
            labels=labels if np.all(labels >= 0) else None,
            targets=cols["target_original"][kept],
            pred_original=cols["pred_original"][kept],
            pred_pruned=cols["pred_pruned"][kept],
            confidence_original=cols["confidence_original"][kept],
            confidence_pruned=cols["confidence_pruned"][kept],
            js_divergence=cols["js_divergence"][kept],
        )
        summaries.append(samples)
        if "stage_h" in cols:
            stage_tables.append(_stage_tables(cols))
        faithful.append(_faithfulness_means(cols, kept, "pruned"))
        if original_faithful is None:
            original_faithful = _faithfulness_means(cols, kept, "original")
        tables.append(RowTable(name, cols))
        found = candidates[j] if j < len(candidates) else []
        w, b = keep_examples(found, options.examples)
        worst.append(w)
        best.append(b)
        moved.append(keep_moved(found, options.examples))
    results = _summarize_all(summaries, options)
    faults = _fault_summary(table, names, max_listed, uncounted)
    flat = _summarize_all([t for per_model in stage_tables for t in per_model], options)
    count = len(stage_tables[0]) if stage_tables else 0
    stages = [flat[j * count:(j + 1) * count] for j in range(len(stage_tables))]
    return Aggregate(results, tables, worst, best, moved, faithful, original_faithful,
                     0 if reference is None else int(reference.size), faults, stages)


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


def _faithfulness_means(
    cols: dict[str, np.ndarray], kept: np.ndarray, who: str
) -> dict[str, float] | None:
    """The mean of each faithfulness figure of ``who`` over the samples where it is defined
    (ROAD is undefined on some flat maps); ``None`` when it was not measured."""
    means: dict[str, float] = {}
    for name in FAITHFULNESS:
        values = cols[f"{name}_{who}"][kept]
        finite = values[np.isfinite(values)]
        means[name] = float(finite.mean()) if finite.size else float("nan")
    return None if all(np.isnan(v) for v in means.values()) else means


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


def _summarize_all(summaries: list[metric.SampleTable], options: MetricOptions) -> list[Any]:
    """:func:`~sp2ps_onnx.metric.summarize` for every model, models side by side.

    Each model's bootstrap has its own seeded generator, so the numbers do not depend on
    the threads; its random draws and indexing release the GIL.
    """
    def one(table: metric.SampleTable) -> Any:
        return metric.summarize(table, aggregation=options.aggregation,
                                n_bootstrap=options.n_bootstrap, seed=options.seed,
                                config=options.component_config())

    threads = min(len(summaries), thread_budget())
    if threads <= 1:
        return [one(kwargs) for kwargs in summaries]
    with ThreadPoolExecutor(threads, thread_name_prefix="sp2ps-summary") as pool:
        return list(pool.map(one, summaries))


def _fault_summary(
    table: dict[str, np.ndarray], names: Sequence[str], max_listed: int,
    uncounted: Collection[int],
) -> dict[str, Any]:
    counts: dict[str, int] = {}
    listed: list[dict[str, Any]] = []
    flags = np.where(np.isin(table["model"], list(uncounted)), 0, table["flags"])
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
