"""Scoring pruned models against an original with Sp2PS, over a whole dataset.

:func:`score_models` is what ``sp2ps score`` runs. The package reads bottom to top, each
module importing only those below it (checked by import-linter, see ``pyproject.toml``):

- :mod:`.options`: the typed options of a run (:class:`CamOptions`, :class:`DataOptions`,
  :class:`MetricOptions`, :class:`RunOptions`).
- :mod:`.models`: opening, naming and describing models (:func:`model_info`).
- :mod:`.rows`: per-sample rows and the samples kept for the report.
- :mod:`.checks`: comparable models, labels that fit, the class each CAM explains.
- :mod:`.batch`: the per-batch kernel shared by the local and the Ray backends.
- :mod:`.aggregate`: the rows of all batches to every reported number.
- :mod:`.result`: :class:`ScoreReport` and :class:`ModelScore`.
- :mod:`.checkpoint`: the resume store.
- :mod:`.ray_backend`: the Ray Data backend.
- :mod:`.band`: the scale a score is read on (random floor, references, bands).
- :mod:`.run`: the execution plan and :func:`score_models`.
- :mod:`.gate`: the ``--fail-under`` rule and its verdict (:func:`check_gate`).
- :mod:`.judge`: :class:`Sp2PSJudge`, one candidate at a time against an original run once.

Beside them, :mod:`.files` (atomic writes, checksummed archives) and :mod:`.cache` (the
pass cache of ``--cache DIR``: the original's, the floor's and the references' passes).
"""

from .aggregate import Aggregate, aggregate
from .batch import BatchScorer, ScorerSpec, build_scorer
from .cache import PassCache
from .checks import check_comparable, check_label_range, resolve_target
from .gate import GateVerdict, check_gate
from .judge import Sp2PSJudge
from .models import ModelInfo, file_sha256, model_info, open_model, package_versions
from .options import (
    TARGET_MODES,
    CamOptions,
    DataOptions,
    MetricOptions,
    RayOptions,
    ReferenceOptions,
    RunOptions,
)
from .result import ModelScore, ScoreReport, StageScore
from .rows import ROW_COLUMNS, BatchOutput, Example, RowTable, concat_rows, keep_examples
from .run import ExecutionPlan, plan_execution, score_models

__all__ = [
    "ROW_COLUMNS",
    "TARGET_MODES",
    "Aggregate",
    "BatchOutput",
    "BatchScorer",
    "CamOptions",
    "DataOptions",
    "Example",
    "ExecutionPlan",
    "GateVerdict",
    "MetricOptions",
    "ModelInfo",
    "ModelScore",
    "PassCache",
    "RayOptions",
    "ReferenceOptions",
    "RowTable",
    "RunOptions",
    "ScoreReport",
    "ScorerSpec",
    "Sp2PSJudge",
    "StageScore",
    "aggregate",
    "build_scorer",
    "check_comparable",
    "check_gate",
    "check_label_range",
    "concat_rows",
    "file_sha256",
    "keep_examples",
    "model_info",
    "open_model",
    "package_versions",
    "plan_execution",
    "resolve_target",
    "score_models",
]
