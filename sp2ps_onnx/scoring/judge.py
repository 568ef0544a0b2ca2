"""Sp2PS inside a compression loop: :class:`Sp2PSJudge` scores one candidate at a time.

A pruning or quantisation loop makes many candidates of one original and asks of each: does
it still look where the original looked? :class:`Sp2PSJudge` reads the data and runs the
original once, keeps the original's CAMs, targets and scores in memory (and the random
floor's and references' results, which place every candidate on the same scale), and then
:meth:`Sp2PSJudge.score` runs only the candidate. It returns the
:class:`~sp2ps_onnx.scoring.result.ModelScore` that
:func:`~sp2ps_onnx.scoring.score_models` gives the same candidate with the same options, to
the last bit.

    judge = Sp2PSJudge("model.onnx", "val.npz", data_options=DataOptions(preset="unit"))
    for rate in (0.2, 0.4, 0.6):
        score = judge.score(prune(rate))   # a path, ONNX bytes or an onnx.ModelProto
        if score.sp2ps < 0.85:
            break

The judge holds the data (its decoded images and the original's preprocessed inputs) and
the original's CAMs in memory; for data too large for that, run ``sp2ps score --cache DIR``
per candidate instead. With ``RunOptions.cache`` the original's pass also goes to (and comes
from) that directory, so that a new process starts without running the original.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from .._ort import select_providers
from ..data import Batch, DataSource, open_data
from ..errors import InputDataError
from .aggregate import aggregate
from .band import FLOOR, PRUNED, REFERENCE, band_of
from .batch import BatchScorer, ScorerSpec, build_scorer
from .cache import Pass, PassCache
from .checks import check_comparable, check_label_range, resolve_target
from .models import ModelInfo, ModelLike, model_info, model_source, unique_names
from .options import CamOptions, DataOptions, MetricOptions, ReferenceOptions, RunOptions
from .result import ModelScore, stage_scores
from .rows import BatchOutput, concat_rows, merge_candidates
from .run import ComparedModels, DataLike, plan_execution

Candidate = str | os.PathLike[str] | bytes | onnx.ModelProto | Any
"""A path, the bytes of an ONNX model, an ``onnx.ModelProto`` or an opened CamModel."""


@dataclass
class _Kept:
    """One batch as the judge keeps it: the raw images (for candidates whose preprocessing
    differs from the original's), the original's input and display images, and its pass."""

    batch: Batch
    indices: np.ndarray
    x_original: np.ndarray
    display: np.ndarray
    original: Pass


class Sp2PSJudge:
    """Scores candidates against one original over fixed data, running the original once.

    The arguments are those of :func:`~sp2ps_onnx.scoring.score_models` without the pruned
    models. ``run.checkpoint`` and ``run.ray`` are refused (the judge works in memory on
    this machine); ``run.cache`` is used for the original's, the floor's and the
    references' passes.

    Attributes:
        references: the random floor's and the reference models' scores (as in
            :attr:`ScoreReport.references <sp2ps_onnx.scoring.result.ScoreReport.references>`).
        n: samples scored.
    """

    def __init__(
        self,
        original: ModelLike,
        data: DataLike,
        *,
        cam: CamOptions = CamOptions(),
        data_options: DataOptions = DataOptions(),
        metric: MetricOptions = MetricOptions(),
        run: RunOptions = RunOptions(),
        references: ReferenceOptions = ReferenceOptions(),
    ) -> None:
        if run.ray is not None or run.checkpoint is not None:
            raise InputDataError(
                "Sp2PSJudge keeps its results in memory on this machine, so it takes no "
                "checkpoint= or ray= in RunOptions; use score_models for those"
            )
        self.original = original
        self.data_options = data_options
        self.metric = metric
        source = data if isinstance(data, DataSource) else open_data(
            data, classes=data_options.classes, limit=data_options.limit,
            strict=data_options.strict,
        )
        self.spec = ScorerSpec(cam, data_options, metric,
                               resolve_target(cam.target, source.has_labels), run.batch_size)
        self.providers = select_providers(run.device, quiet=run.quiet)
        self.plan = plan_execution(self.providers)
        compared = ComparedModels.of(original, [], references, metric.seed)
        check_comparable(original, compared.checked, compared.names[:len(compared.checked) + 1],
                         data_options.size)
        self.cache = None if run.cache is None else PassCache(run.cache)
        fixed = build_scorer(original, compared.models, compared.names, self.spec,
                             providers=self.providers, session_threads=self.plan.session_threads,
                             spinning=self.plan.session_spinning, cache=self.cache,
                             cached=compared.fixed)
        check_label_range(source, int(fixed.original.num_classes))
        self._original_cam = fixed.original
        self._batches: list[_Kept] = []
        parts: list[dict[str, np.ndarray]] = []
        candidates: list[list[Any]] = [[] for _ in compared.models]
        offset = 0
        for batch in source.batches(run.batch_size):
            indices = np.arange(offset, offset + len(batch.ids))
            offset += len(batch.ids)
            prepared = fixed.prepare(batch, indices)
            kept = _Kept(batch, indices, prepared.x_original, prepared.display,
                         fixed.original_pass(prepared))
            self._batches.append(kept)
            if compared.models:
                output = fixed.rows(fixed.run_models(prepared, kept.original),
                                    self.plan.metric_workers)
                parts.append(output.rows)
                for j, found in enumerate(output.examples):
                    candidates[j] = merge_candidates(candidates[j], found, metric.examples)
        self.n = offset
        if self.n == 0:
            raise InputDataError(f"no samples were read from {source.description}")
        self.references = self._score_fixed(compared, fixed, parts, candidates)
        floor = next((m.sp2ps for m in self.references if m.role == FLOOR), None)
        self._floor = floor
        self._levels = [m.sp2ps for m in self.references if m.role == REFERENCE]

    def _score_fixed(self, compared: ComparedModels, scorer: BatchScorer,
                     parts: list[dict[str, np.ndarray]],
                     candidates: list[list[Any]]) -> list[ModelScore]:
        if not compared.models:
            return []
        floors = [j for j, role in enumerate(compared.roles) if role == FLOOR]
        result = aggregate(concat_rows(parts), candidates, compared.names[1:], self.metric,
                           expected=self.n, uncounted=floors)
        return [self._model_score(model, cam_model, compared.names[1 + j], result, j,
                                  compared.roles[j], stage_plan=scorer.stages)
                for j, (model, cam_model) in enumerate(zip(compared.models, scorer.pruned,
                                                           strict=True))]

    def _model_score(self, model: ModelLike, cam_model: Any, name: str, result: Any, j: int,
                     role: str, info: ModelInfo | None = None,
                     stage_plan: Any = None) -> ModelScore:
        if info is None:
            info = model_info(model_source(model), cam_model, name, self.spec.cam.allow_domains)
        return ModelScore(info, result.results[j], result.worst[j], result.best[j],
                          result.rows[j], result.moved[j], role,
                          faithfulness=result.faithfulness[j],
                          stages=stage_scores(stage_plan, result.stages, j))

    def score(self, candidate: Candidate) -> ModelScore:
        """The Sp2PS result of ``candidate`` against the original: the same
        :class:`~sp2ps_onnx.scoring.result.ModelScore`, band included, as
        ``score_models(original, [candidate], data, ...)`` gives with the judge's options.
        Only the candidate's pass and the metric run."""
        model: ModelLike = onnx.load_from_string(candidate) if isinstance(
            candidate, (bytes, bytearray)) else candidate
        names = unique_names([self.original, model])
        # The opened original, not its file: its declared image is known, nothing is read.
        check_comparable(self._original_cam, [model], names, self.data_options.size)
        scorer = build_scorer(self._original_cam, [model], names, self.spec,
                              providers=self.providers,
                              session_threads=self.plan.session_threads,
                              spinning=self.plan.session_spinning)

        def one(kept: _Kept) -> BatchOutput:
            prepared = scorer.prepare(kept.batch, kept.indices,
                                      original=(kept.x_original, kept.display))
            return scorer.rows(scorer.run_models(prepared, kept.original),
                               self.plan.metric_workers)

        parts, found = [], []
        # Batches side by side, as score_models runs them (see plan_execution); the model's
        # facts (its file's hash, weight counts) are read meanwhile.
        with ThreadPoolExecutor(1, thread_name_prefix="sp2ps-facts") as side, \
                ThreadPoolExecutor(self.plan.in_flight, thread_name_prefix="sp2ps-judge") as pool:
            info = side.submit(model_info, model_source(model), scorer.pruned[0], names[1],
                               self.spec.cam.allow_domains)
            for output in pool.map(one, self._batches):
                parts.append(output.rows)
                found = merge_candidates(found, output.examples[0], self.metric.examples)
            facts = info.result()
        result = aggregate(concat_rows(parts), [found], names[1:], self.metric, expected=self.n)
        scored = self._model_score(model, scorer.pruned[0], names[1], result, 0, PRUNED, facts,
                                   stage_plan=scorer.stages)
        scored.band = band_of(scored.sp2ps, self._floor, self._levels)
        return scored
