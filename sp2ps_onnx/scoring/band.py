"""The scale a Sp2PS number is read on: a random floor, reference models, and where each
pruned model lies between them.

- The **random floor** is the original with every weight layer re-initialised from the score
  backwards (cascading randomisation, Adebayo et al., NeurIPS 2018;
  :func:`sp2ps_onnx.graph.randomize_weights`): attention that has nothing left of the
  original's. It is scored like a pruned model.
- **Reference models** are independently trained models of the same task (another seed,
  another framework, a published checkpoint): how different attention is between two good
  models that were never pruned from each other.
- A pruned model's **band** says where its Sp2PS lies: at or below the floor, between the
  floor and the references, within the references' range, or above them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from scipy import stats

from ..errors import Sp2PSError
from ..graph import randomize_weights
from .models import model_source

FLOOR = "floor"
REFERENCE = "reference"
PRUNED = "pruned"

BELOW_FLOOR = "at or below the random floor"
ABOVE_FLOOR = "above the floor, below the references"
WITHIN_REFERENCES = "within the references"
ABOVE_REFERENCES = "above the references"
BANDS = (BELOW_FLOOR, ABOVE_FLOOR, WITHIN_REFERENCES, ABOVE_REFERENCES)


def floor_model(original: Any, seed: int) -> tuple[onnx.ModelProto | None, str | None]:
    """The random floor of ``original`` and ``None``, or ``None`` and why it cannot be built
    (the run then goes on without a floor and says so)."""
    try:
        source = model_source(original)
    except Sp2PSError:
        return None, "the original was given as an opened model without its file"
    try:
        return randomize_weights(source, seed=seed), None
    except Sp2PSError as exc:
        return None, " ".join(str(exc).split())


def band_of(sp2ps: float, floor: float | None, references: Sequence[float]) -> str | None:
    """Where ``sp2ps`` lies relative to the floor and the references' range (``None``
    without either)."""
    if np.isnan(sp2ps) or (floor is None and not references):
        return None
    if floor is not None and sp2ps <= floor:
        return BELOW_FLOOR
    if not references:
        return ABOVE_FLOOR
    if sp2ps < min(references):
        return ABOVE_FLOOR
    if sp2ps <= max(references):
        return WITHIN_REFERENCES
    return ABOVE_REFERENCES


def rank_correlations(models: Sequence[Any]) -> dict[str, Any]:
    """Spearman rank correlation, across the pruned models of one run, of Sp2PS with their
    accuracy and with their top-1 agreement with the original: close to 1, Sp2PS ranks the
    models as the outputs already do; lower, it tells something the outputs do not.
    ``None`` with fewer than 3 models or without the numbers."""

    def spearman(other: str) -> float | None:
        pairs = [(m.sp2ps, getattr(m.result, other, None)) for m in models]
        pairs = [(a, b) for a, b in pairs if b is not None and np.isfinite(a)]
        if len(pairs) < 3:
            return None
        a, b = np.array(pairs, dtype=np.float64).T
        if np.ptp(a) == 0 or np.ptp(b) == 0:
            return None
        return float(stats.spearmanr(a, b).statistic)

    return {
        "models": len(models),
        "sp2ps_vs_accuracy": spearman("accuracy_pruned"),
        "sp2ps_vs_agreement": spearman("top1_agreement"),
    }
