"""The study's statistics, as pure functions of the committed tables (``experiments/data``).

Nothing here reads a model or the cache: :mod:`experiments.report` builds results.md from
these functions alone, so a reviewer can recompute every number from the CSV files.
"""

from __future__ import annotations

import csv
import itertools
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

TOLERANCES = (1.0, 2.0, 3.0)  # points of accuracy and of top-1 agreement for "matched"
MOVED = 0.15  # a Sp2PS difference that counts as "attention moved"
TEXT_COLUMNS = ("name", "arch", "base", "kind", "method", "band", "error", "photo", "model",
                "class_original", "note")


def _parse(key: str, value: str) -> Any:
    if value == "":
        return None
    if key in TEXT_COLUMNS:
        return value
    if value in ("True", "False"):
        return value == "True"
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        return value


def read_table(path: Path) -> list[dict[str, Any]]:
    """A committed CSV with its numbers and booleans parsed (empty cells are None)."""
    with open(path, newline="") as handle:
        return [{k: _parse(k, v) for k, v in row.items()} for row in csv.DictReader(handle)]


def write_table(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.6g}"
        return str(value)

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([cell(row.get(c)) for c in columns])


def mean_sd(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    """Mean and sample standard deviation (ddof 1) of the values that are not None."""
    kept = [v for v in values if v is not None]
    if not kept:
        return None, None, 0
    return (float(np.mean(kept)), float(np.std(kept, ddof=1)) if len(kept) > 1 else None,
            len(kept))


def recipe(row: dict[str, Any]) -> str:
    """The pruning recipe of a pruned model, without the seed: ``l1-filter30-ft``."""
    return f"{row['method']}{row['rate']}" + ("-ft" if row["finetuned"] else "")


def by_recipe(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Pruned models grouped by (architecture, recipe): one per seed."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["kind"] == "pruned":
            groups[(row["arch"], recipe(row))].append(row)
    return dict(groups)


# --------------------------------------------------------------------------------------
# Rank correlations


def partial_spearman(x: Sequence[float], y: Sequence[float], z: Sequence[float]
                     ) -> tuple[float, float, int]:
    """Spearman correlation of ``x`` and ``y`` with ``z`` held fixed: the Pearson correlation
    of the residuals of rank(x) and rank(y) after a least-squares fit on rank(z); its p-value
    from Student's t with n - 3 degrees of freedom. Returns (rho, p, n)."""
    ranks = [stats.rankdata(np.asarray(v, dtype=float)) for v in (x, y, z)]
    design = np.column_stack([np.ones(len(ranks[2])), ranks[2]])
    residuals = [r - design @ np.linalg.lstsq(design, r, rcond=None)[0] for r in ranks[:2]]
    rho = float(np.corrcoef(*residuals)[0, 1])
    n = len(ranks[0])
    t = rho * math.sqrt(max(n - 3, 1) / max(1e-12, 1 - rho * rho))
    return rho, float(2 * stats.t.sf(abs(t), n - 3)), n


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, int]:
    result = stats.spearmanr(x, y)
    return float(result.statistic), float(result.pvalue), len(x)


@dataclass
class Correlations:
    """What Sp2PS shares with the output-based measures over a set of models."""

    n: int
    sp2ps_accuracy: tuple[float, float, int]
    sp2ps_agreement: tuple[float, float, int]
    accuracy_agreement: tuple[float, float, int]
    sp2ps_js: tuple[float, float, int]
    sp2ps_accuracy_given_agreement: tuple[float, float, int]
    sp2ps_accuracy_given_js: tuple[float, float, int]
    sp2ps_agreement_given_accuracy: tuple[float, float, int]


def correlations(rows: Sequence[dict[str, Any]]) -> Correlations | None:
    """Rank correlations over ``rows`` (models with a Sp2PS, an accuracy, an agreement and
    a JS divergence)."""
    kept = [r for r in rows if all(r.get(k) is not None for k in
                                   ("sp2ps", "accuracy", "top1_agreement", "js_divergence"))]
    if len(kept) < 5:
        return None
    s, a, g, j = (np.array([r[k] for r in kept]) for k in
                  ("sp2ps", "accuracy", "top1_agreement", "js_divergence"))
    return Correlations(
        n=len(kept), sp2ps_accuracy=spearman(s, a), sp2ps_agreement=spearman(s, g),
        accuracy_agreement=spearman(a, g), sp2ps_js=spearman(s, j),
        sp2ps_accuracy_given_agreement=partial_spearman(s, a, g),
        sp2ps_accuracy_given_js=partial_spearman(s, a, j),
        sp2ps_agreement_given_accuracy=partial_spearman(s, g, a),
    )


# --------------------------------------------------------------------------------------
# Matched-accuracy pairs


@dataclass
class Pair:
    """Two models scored against the same original, with their differences."""

    first: dict[str, Any]
    second: dict[str, Any]

    @property
    def base(self) -> str:
        return self.first["base"]

    @property
    def accuracy_gap(self) -> float:
        return 100 * abs(self.first["accuracy"] - self.second["accuracy"])

    @property
    def agreement_gap(self) -> float:
        return 100 * abs(self.first["top1_agreement"] - self.second["top1_agreement"])

    @property
    def sp2ps_gap(self) -> float:
        return abs(self.first["sp2ps"] - self.second["sp2ps"])

    @property
    def ordered(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(higher Sp2PS, lower Sp2PS)."""
        if self.first["sp2ps"] >= self.second["sp2ps"]:
            return self.first, self.second
        return self.second, self.first


def comparable(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Models that enter the pair analysis: pruned, retrains and int8 artifacts (not the
    floor, whose accuracy is at chance) with every number present."""
    return [r for r in rows if r["kind"] in ("pruned", "reference", "deploy")
            and all(r.get(k) is not None for k in ("sp2ps", "accuracy", "top1_agreement"))]


def pairs_within(rows: Sequence[dict[str, Any]], tolerance: float) -> list[Pair]:
    """Every pair of models scored against the same original whose accuracy and top-1
    agreement both differ by at most ``tolerance`` points; largest Sp2PS gap first."""
    by_base: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in comparable(rows):
        by_base[row["base"]].append(row)
    found = []
    for members in by_base.values():
        for first, second in itertools.combinations(members, 2):
            pair = Pair(first, second)
            if pair.accuracy_gap <= tolerance and pair.agreement_gap <= tolerance:
                found.append(pair)
    return sorted(found, key=lambda p: (-p.sp2ps_gap, p.first["name"], p.second["name"]))


def shown_pairs(rows: Sequence[dict[str, Any]], limit: int = 4) -> list[Pair]:
    """The pairs the write-up shows with pictures: within 1 point of accuracy and of
    agreement, at least :data:`MOVED` apart in Sp2PS, at most one per original (the largest
    gap), largest first."""
    chosen, bases = [], set()
    for pair in pairs_within(rows, TOLERANCES[0]):
        if pair.sp2ps_gap < MOVED or pair.base in bases:
            continue
        chosen.append(pair)
        bases.add(pair.base)
        if len(chosen) == limit:
            break
    return chosen


def typical_samples(first: dict[str, np.ndarray], second: dict[str, np.ndarray],
                    count: int = 4) -> np.ndarray:
    """Sample indices for the pictures of a pair: among the samples that the original and
    both models classify correctly, the ``count`` whose h (of the model with the lower
    Sp2PS) is closest to that model's median h there: typical, not worst, cases."""
    correct = ((first["label"] == first["pred_original"]) & (first["label"] == first["pred"])
               & (second["label"] == second["pred"]))
    candidates = np.flatnonzero(correct)
    if len(candidates) == 0:
        return candidates
    lower = second["h"][candidates]
    order = np.argsort(np.abs(lower - np.median(lower)), kind="stable")
    return np.sort(candidates[order[:count]])
