"""What a scoring run returns: :class:`ScoreReport` with one :class:`ModelScore` per pruned
model; :mod:`sp2ps_onnx.report` renders it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..report import notebook_html
from .models import ModelInfo
from .rows import Example


@dataclass
class StageScore:
    """Sp2PS at one resolution stage (``CamOptions(layers="stages")``): both models' CAMs at
    their last map of that resolution."""

    stage: int  # 0: the finest
    resolution: tuple[int, int]
    original_layer: str
    layer: str  # the compared model's
    result: Any  # sp2ps_onnx.metric.Sp2PSResult

    @property
    def sp2ps(self) -> float:
        return float(self.result.sp2ps)

    def to_dict(self) -> dict[str, Any]:
        """The stage, its layers and its Sp2PS with the 95 % confidence interval."""
        r = self.result
        return {"stage": self.stage, "resolution": list(self.resolution),
                "original_layer": self.original_layer, "layer": self.layer,
                "sp2ps": r.sp2ps, "ci95": None if r.ci95 is None else list(r.ci95),
                "mean_spatial": r.mean_spatial, "mean_spectral": r.mean_spectral,
                "median_h": r.median_h, "n": r.n}


def stage_scores(plan: Any, stages: Sequence[Sequence[Any]], j: int) -> list[StageScore]:
    """Compared model ``j``'s :class:`StageScore` list from a run's stage plan
    (:class:`~sp2ps_onnx.scoring.batch.StagePlan`) and the aggregated per-stage results
    (empty without ``layers="stages"``)."""
    if plan is None or not stages:
        return []
    return [StageScore(k, plan.resolutions[k], plan.layers[0][k], plan.layers[1 + j][k], result)
            for k, result in enumerate(stages[j])]


@dataclass
class ModelScore:
    """The Sp2PS result of one pruned model (or reference model: see ``role``).

    ``worst``/``best`` are the samples with the lowest/highest h, ``moved`` those with the
    lowest h among the samples both models classify identically ("same answer, attention
    moved"). ``role`` is ``pruned``, ``floor`` or ``reference``; ``band`` where a pruned
    model's Sp2PS lies relative to the floor and references
    (:data:`~sp2ps_onnx.scoring.band.BANDS`, ``None`` without them). ``stages``: Sp2PS
    per resolution stage, finest first (``CamOptions(layers="stages")``; else empty).
    """

    info: ModelInfo
    result: Any  # sp2ps_onnx.metric.Sp2PSResult
    worst: list[Example] = field(default_factory=list)
    best: list[Example] = field(default_factory=list)
    rows: Sequence[dict[str, Any]] = field(default_factory=list)
    moved: list[Example] = field(default_factory=list)
    role: str = "pruned"
    band: str | None = None
    faithfulness: dict[str, float] | None = None  # means over the samples (--faithfulness)
    stages: list[StageScore] = field(default_factory=list)

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
    references: list[ModelScore] = field(default_factory=list)  # the floor, then references
    correlations: dict[str, Any] = field(default_factory=dict)  # rank_correlations()
    original_faithfulness: dict[str, float] | None = None
    gate: dict[str, Any] | None = None  # the --fail-under rule and verdict (GateVerdict)

    @property
    def floor(self) -> ModelScore | None:
        """The random floor's score, if the run has one."""
        return next((m for m in self.references if m.role == "floor"), None)

    def ranked(self) -> list[ModelScore]:
        """Pruned models from the highest Sp2PS to the lowest (NaN last)."""
        return sorted(
            self.models, key=lambda m: (np.isnan(m.sp2ps), -np.nan_to_num(m.sp2ps, nan=0.0))
        )

    def _repr_html_(self) -> str:
        """Jupyter's view: the ranking and the Sp2PS-vs-accuracy scatter."""
        return notebook_html(self)

    def to_dict(self) -> dict[str, Any]:
        """Every number and the full configuration, JSON-ready."""
        ranked = self.ranked()
        return {
            "config": self.config,
            "n": self.n,
            "class_names": self.class_names,
            "seconds": self.seconds,
            "original": {**self.original.to_dict(), "accuracy": self.accuracy_original,
                         "faithfulness": jsonable(self.original_faithfulness)},
            "ranking": [m.info.name for m in ranked],
            "notes": self.notes,
            "data_faults": self.faults,
            "model_faults": jsonable(self.model_faults),
            "models": [
                {"rank": ranked.index(m) + 1, **_model_dict(m)} for m in self.models
            ],
            "references": [_model_dict(m) for m in self.references],
            "band": {
                "floor": None if self.floor is None else self.floor.sp2ps,
                "references": {m.info.name: m.sp2ps for m in self.references
                               if m.role == "reference"},
                "positions": {m.info.name: m.band for m in self.models},
            },
            "correlations": jsonable(self.correlations),
            "gate": jsonable(self.gate),
        }


def _model_dict(model: ModelScore) -> dict[str, Any]:
    return {
        **model.info.to_dict(),
        "role": model.role,
        "band": model.band,
        "result": jsonable(_result_dict(model.result)),
        "faithfulness": jsonable(model.faithfulness),
        **({"stages": jsonable([stage.to_dict() for stage in model.stages])}
           if model.stages else {}),
    }


def _result_dict(result: Any) -> dict[str, Any]:
    data = dict(result.to_dict())
    data.pop("per_sample", None)  # per-sample values go to per_sample.csv
    return data


def jsonable(value: Any) -> Any:
    """``value`` with NumPy values as Python ones and NaN/Inf as ``None``, for JSON."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if hasattr(value, "to_dict"):
        return jsonable(value.to_dict())
    return value
