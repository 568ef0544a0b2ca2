"""The per-batch kernel, shared by the local and the Ray backends.

:func:`build_scorer` opens every model once; :class:`BatchScorer` turns a batch of images
into per-sample rows (:mod:`.rows`) for every pruned model, computing the original's CAMs
once per batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import metric
from ..cam import layer_cams
from ..data import Batch, Preprocessing
from ..errors import InputDataError, ModelMismatchError, UnsupportedModelError
from ..faithfulness import FaithfulnessOptions, FaithfulnessResult, evaluate_faithfulness
from .cache import Pass, PassCache, model_key, tensor_digest
from .checks import check_labels
from .models import ModelLike, open_model
from .options import CamOptions, DataOptions, MetricOptions
from .rows import (
    FAITHFULNESS,
    FLAG_ORIGINAL_CONSTANT,
    FLAG_ORIGINAL_NONFINITE,
    FLAG_PRUNED_CONSTANT,
    FLAG_PRUNED_NONFINITE,
    ROW_COLUMNS,
    STAGE_COLUMNS,
    BatchOutput,
    Example,
    fault_names,
    keep_examples,
    keep_moved,
)


@dataclass(frozen=True)
class ScorerSpec:
    """Everything that decides the kernel's numbers: what a resumed run must repeat and
    what every Ray worker receives.

    ``mode`` is the resolved target (:func:`~sp2ps_onnx.scoring.checks.resolve_target`).
    """

    cam: CamOptions
    data: DataOptions
    metric: MetricOptions
    mode: str
    batch_size: int


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
    faithfulness: list[FaithfulnessResult | None]  # the original's, then every pruned one's
    stages: list[np.ndarray | None] = dataclasses.field(default_factory=list)  # same order


@dataclass(frozen=True)
class StagePlan:
    """The stages of a per-stage run (``CamOptions(layers="stages")``): their resolutions,
    finest first, and each model's layer at each stage (the original's first)."""

    resolutions: list[tuple[int, int]]
    layers: list[list[str]]


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
        spec: ScorerSpec,
    ) -> None:
        self.original = original
        self.pruned = list(pruned)
        self.original_prep = original_prep
        self.pruned_preps = list(pruned_preps)
        self.spec = spec
        self.map_size = (original_prep.height, original_prep.width)
        self.cache: PassCache | None = None
        self._keys: list[str | None] = [None] * (1 + len(self.pruned))
        self.stages: StagePlan | None = None

    def __call__(self, batch: Batch, indices: np.ndarray) -> BatchOutput:
        return self.rows(self.run_models(self.prepare(batch, indices)))

    def prepare(self, batch: Batch, indices: np.ndarray,
                original: tuple[np.ndarray, np.ndarray] | None = None) -> _Prepared:
        """Check labels and preprocess the batch for every model (shared where equal);
        ``original``: the original's input and display images when already made."""
        check_labels(batch.labels, int(self.original.num_classes), batch.ids)
        x_original, display = original or self.original_prep.with_display(batch.images)
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

    def use_cache(self, cache: PassCache | None, cached: Sequence[int],
                  providers: Sequence[str] | None) -> None:
        """Take the original's passes, and those of the pruned models at positions
        ``cached`` (the random floor, references: models that do not change between
        runs), from ``cache`` when it holds them, and store them there when not."""
        self.cache = cache
        self._keys = [None] * (1 + len(self.pruned))
        if cache is None:
            return
        spec = self.spec
        figures = ({"seed": spec.metric.seed, "batch": self._faithfulness_batch()}
                   if spec.metric.faithfulness else None)
        preps = [self.original_prep, *self.pruned_preps]
        models = [self.original, *self.pruned]
        for index in (0, *(1 + j for j in cached)):
            options = {"method": spec.cam.method, "size": list(self.map_size),
                       "target": spec.mode, "grid": spec.cam.grid,
                       "preprocessing": dataclasses.asdict(preps[index]),
                       "faithfulness": figures, **_smoothing(spec.cam)}
            if spec.cam.cam_layers or spec.cam.layers:
                options.update(cam_layers=list(spec.cam.cam_layers), layers=spec.cam.layers)
            self._keys[index] = model_key(models[index], options, providers)

    def run_models(self, prepared: _Prepared, original: Pass | None = None) -> _ModelOutputs:
        """CAMs, targets and scores of the original and every pruned model (``original``:
        the original's pass when the caller already has it)."""
        wanted = prepared.labels if self.spec.mode == "label" else None
        digests: dict[int, str] = {}
        if original is None:
            original = self._pass(0, self.original, prepared.x_original, wanted, digests)
        pruned_wanted = None if self.spec.mode == "self" else original.targets
        pruned = [
            self._pass(1 + j, model, x, pruned_wanted, digests)
            for j, (model, x) in enumerate(zip(self.pruned, prepared.x_pruned, strict=True))
        ]
        return _ModelOutputs(prepared, original.as_tuple(), [p.as_tuple() for p in pruned],
                             [p.faithfulness for p in (original, *pruned)],
                             [p.stages for p in (original, *pruned)])

    def original_pass(self, prepared: _Prepared) -> Pass:
        """The original's pass over a prepared batch (from the cache when it holds it)."""
        wanted = prepared.labels if self.spec.mode == "label" else None
        return self._pass(0, self.original, prepared.x_original, wanted, {})

    def _pass(self, index: int, model: Any, x: np.ndarray, wanted: np.ndarray | None,
              digests: dict[int, str]) -> Pass:
        """One model's pass over one batch; through the cache for the models it keeps."""
        key = self._keys[index] if self.cache is not None else None
        faithfulness = self.spec.metric.faithfulness
        if key is not None:
            if id(x) not in digests:  # models with the same preprocessing share the input
                digests[id(x)] = tensor_digest(x)
            key = PassCache.entry_key(key, digests[id(x)], wanted)
            found = self.cache.get(key, len(x), faithfulness)
            if found is not None:
                return found
        maps, used, scores = self._cams(model, x, wanted)
        figures = self._faithfulness(model, x, (maps, used, scores)) if faithfulness else None
        stages = self._stage_maps(model, x, used, maps) if self.stages is not None else None
        found = Pass(maps, used, scores, figures, stages)
        if key is not None:
            self.cache.put(key, found)
        return found

    def _faithfulness_batch(self) -> int:
        return max(self.spec.batch_size, 64)

    def _faithfulness(self, model: Any, x: np.ndarray, outputs: tuple) -> FaithfulnessResult:
        """How faithfully ``model``'s own CAMs explain it, on this batch."""
        maps, targets, scores = outputs
        usable = np.where(_nonfinite(maps, scores)[:, None, None], 0.0, maps)
        options = FaithfulnessOptions(layout=str(model.layout), seed=self.spec.metric.seed,
                                      batch_size=self._faithfulness_batch())
        return evaluate_faithfulness(x, usable, targets, model.scores, options)

    def _cams(self, model: Any, x: np.ndarray, targets: np.ndarray | None) -> tuple:
        several = {"layers": self.spec.cam.cam_layers} if self.spec.cam.cam_layers else {}
        maps, used, scores = model.cams(
            x, method=self.spec.cam.method, targets=targets, size=self.map_size,
            return_scores=True, **_smoothing(self.spec.cam), **several,
        )
        return np.asarray(maps), np.asarray(used, dtype=np.int64), np.asarray(scores)

    def _stage_maps(self, model: Any, x: np.ndarray, used: np.ndarray,
                    maps: np.ndarray) -> np.ndarray:
        """Each stage's CAM (S, N, H, W) for the classes ``used`` by the main CAM ``maps``,
        all stages from one run. The stage at the model's own layer (the last one, unless
        a layer was named) takes ``maps`` itself: the same map, so that its Sp2PS is the
        one-layer run's to the last bit."""
        per_layer, _ = layer_cams(model, x, self.spec.cam.method, targets=used,
                                  size=self.map_size, layers="stages", batch_size=len(x),
                                  eigen_smooth=self.spec.cam.eigen_smooth)
        return np.stack([maps if name == str(model.layer) else np.asarray(stage)
                         for name, stage in per_layer.items()])

    def rows(self, outputs: _ModelOutputs, workers: int | None = None) -> BatchOutput:
        """Per-sample rows and worst/best candidates for every pruned model.

        ``workers``: threads of the metric (see :func:`~sp2ps_onnx.metric.sp2ps`).
        """
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
            maps_o, [maps_p for maps_p, _ in cleaned], self.spec.metric.spatial,
            self.spec.metric.spectral,
            normalize=True, workers=workers,
        )
        staged = (self._stage_columns(outputs, workers)
                  if outputs.stages and outputs.stages[0] is not None else [])
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
            if self.spec.data.strict and flags.any():
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
                "js_divergence": _js_divergence(scores_o, scores_p, bad_o, bad_p),
                "id": ids,
            }
            part.update(_faithfulness_columns(outputs.faithfulness[0],
                                              outputs.faithfulness[1 + j], n))
            if staged:
                part.update(staged[j])
            parts.append(part)
            examples.append(self._candidates(part, prepared, maps_o, maps_p, bad_o))
        rows = {key: np.concatenate([p[key] for p in parts]) for key in (*ROW_COLUMNS, *STAGE_COLUMNS)
                if key in parts[0]}
        return BatchOutput(rows, examples)

    def _stage_columns(self, outputs: _ModelOutputs,
                       workers: int | None) -> list[dict[str, np.ndarray]]:
        """Every pruned model's similarity to the original at every stage, (n, S) columns,
        scored as a one-layer run at that stage scores its rows."""
        scores_o = outputs.original[2]
        columns = [{key: [] for key in STAGE_COLUMNS} for _ in outputs.pruned]
        for k, maps_o in enumerate(outputs.stages[0]):
            bad_o = _nonfinite(maps_o, scores_o)
            maps_o = np.where(bad_o[:, None, None], 0.0, maps_o).astype(maps_o.dtype, copy=False)
            cleaned = []
            for (_, _, scores_p), stages_p in zip(outputs.pruned, outputs.stages[1:], strict=True):
                bad_p = _nonfinite(stages_p[k], scores_p) & ~bad_o
                cleaned.append((np.where(bad_p[:, None, None], 0.0, stages_p[k]).astype(
                    stages_p[k].dtype, copy=False), bad_p))
            # One metric call per stage for all pruned models, as for the main maps.
            per_model = metric.sp2ps_many(maps_o, [maps for maps, _ in cleaned],
                                          self.spec.metric.spatial, self.spec.metric.spectral,
                                          normalize=True, workers=workers)
            for column, (_, bad_p), per in zip(columns, cleaned, per_model, strict=True):
                lost = bad_o | bad_p
                column["stage_spatial"].append(np.where(lost, 0.0, per.spatial))
                column["stage_spectral"].append(np.where(lost, 0.0, per.spectral))
                column["stage_h"].append(np.where(lost, 0.0, per.h))
                column["stage_flags"].append(
                    bad_o * FLAG_ORIGINAL_NONFINITE + bad_p * FLAG_PRUNED_NONFINITE)
        return [{key: np.stack(values, axis=1).astype(
                     np.int64 if key == "stage_flags" else np.float64)
                 for key, values in column.items()} for column in columns]

    def _candidates(
        self, part: dict[str, np.ndarray], prepared: _Prepared, maps_o: np.ndarray,
        maps_p: np.ndarray, skipped: np.ndarray,
    ) -> list[Example]:
        keep = self.spec.metric.examples
        if keep <= 0:
            return []
        usable = np.flatnonzero(~skipped)
        h = part["h"][usable]
        ranked_h = np.where(np.isnan(h), -1.0, h)
        index = part["index"][usable]
        # The same order as keep_examples' keys, found in NumPy so that Example objects
        # are built only for the few samples that can be kept.
        worst = usable[np.lexsort((index, ranked_h))[:keep]]
        best = usable[np.lexsort((index, -ranked_h))[:keep]]
        pred = part["pred_original"][usable]
        same = (pred >= 0) & (pred == part["pred_pruned"][usable])
        moved = usable[same][np.lexsort((index[same], ranked_h[same]))[:keep]]
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
            for i in np.union1d(np.union1d(worst, best), moved)
        ]
        worst, best = keep_examples(examples, keep)
        chosen = {e.index: e for e in worst + best + keep_moved(examples, keep)}
        return [
            Example(**{**e.__dict__, "image": e.image.copy(),
                       "original_map": np.array(e.original_map, dtype=np.float32),
                       "pruned_map": np.array(e.pruned_map, dtype=np.float32)})
            for e in sorted(chosen.values(), key=lambda e: e.index)
        ]


def _smoothing(options: CamOptions) -> dict[str, bool]:
    """The smoothing options that are on (a pass cache key without them stays as before)."""
    return {name: True for name in ("eigen_smooth", "aug_smooth") if getattr(options, name)}


def _faithfulness_columns(original: FaithfulnessResult | None,
                          pruned: FaithfulnessResult | None, n: int) -> dict[str, np.ndarray]:
    """The faithfulness figures of both models as row columns (NaN when not measured)."""
    columns = {}
    for who, result in (("original", original), ("pruned", pruned)):
        for name in FAITHFULNESS:
            value = getattr(result, name) if result is not None else np.full(n, np.nan)
            columns[f"{name}_{who}"] = np.asarray(value, dtype=np.float64)
    return columns


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


def _js_divergence(scores_o: np.ndarray, scores_p: np.ndarray, bad_o: np.ndarray,
                   bad_p: np.ndarray) -> np.ndarray:
    """:func:`~sp2ps_onnx.metric.output_divergence`; 1 where the pruned model gave no finite
    scores, 0 where the original did not (such samples are left out of every aggregate)."""
    bad = bad_o | bad_p
    safe_o = np.where(bad[:, None], 0.0, scores_o)
    safe_p = np.where(bad[:, None], 0.0, scores_p)
    divergence = metric.output_divergence(safe_o, safe_p)
    return np.where(bad_o, 0.0, np.where(bad_p, 1.0, divergence))


def _confidence(scores: np.ndarray, classes: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """Softmax probability of ``classes`` (0 for samples without finite scores)."""
    logits = np.where(bad[:, None], 0.0, scores).astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    chosen = logits[np.arange(len(logits)), classes] / logits.sum(axis=1)
    return np.where(bad, 0.0, chosen)


def build_scorer(
    original: ModelLike,
    pruned: Sequence[ModelLike],
    names: Sequence[str],
    spec: ScorerSpec,
    *,
    providers: Sequence[str] | None = None,
    session_threads: int | None = None,
    spinning: bool = True,
    cache: PassCache | None = None,
    cached: Sequence[int] = (),
) -> BatchScorer:
    """Open every model once (rewrite, session) and build the per-batch kernel.

    ``session_threads`` and ``spinning`` set every session's intra-op threads and whether
    they spin while idle (see :func:`~sp2ps_onnx.scoring.run.plan_execution`). With
    ``cache`` the original's passes, and those of the pruned models at positions
    ``cached``, come from the cache when it holds them (:mod:`.cache`).
    """
    cam, data = spec.cam, spec.data

    def opened(model: ModelLike, layer: str | None, size: Any) -> Any:
        return open_model(model, layer, providers, size, spec.batch_size, cam.allow_domains,
                          session_threads, spinning, cam.grid)

    def preprocessing(cam_model: Any, size: Any) -> Preprocessing:
        return Preprocessing.for_model(cam_model, data.preset, mean=data.mean, std=data.std,
                                       size=size)

    original_cam = opened(original, cam.layer, data.size)
    original_prep = preprocessing(original_cam, data.size)
    size = data.size or (original_prep.height, original_prep.width)
    pruned_cams, pruned_preps = [], []
    for model, name in zip(pruned, names[1:], strict=True):
        cam_model = opened(model, cam.pruned_layer or cam.layer, size)
        if int(cam_model.num_classes) != int(original_cam.num_classes):
            raise ModelMismatchError(
                f"pruned model {name} has {cam_model.num_classes} classes but the original "
                f"{names[0]} has {original_cam.num_classes}; Sp2PS compares models of the same "
                "classifier, so give a pruned version of the original model"
            )
        pruned_cams.append(cam_model)
        pruned_preps.append(preprocessing(cam_model, size))
    scorer = BatchScorer(original_cam, pruned_cams, original_prep, pruned_preps, spec)
    if cam.layers == "stages":
        scorer.stages = match_stages([original_cam, *pruned_cams], names)
    scorer.use_cache(cache, cached, providers)
    return scorer


def match_stages(models: Sequence[Any], names: Sequence[str]) -> StagePlan:
    """Each model's stages (:func:`sp2ps_onnx.graph.stage_layers`), matched with the first
    model's by resolution; models whose stages have other resolutions are refused."""
    per_model: list[dict[str, tuple[int, int] | None]] = []
    for model, name in zip(models, names, strict=True):
        grids = model.with_backward(layers="stages").layer_grids
        unknown = [layer for layer, grid in grids.items() if grid is None]
        if unknown:
            raise UnsupportedModelError(
                f"the stage {unknown[0]!r} of {name} has no fixed resolution, so it cannot be "
                "matched with the original's stages; give --size, or score without "
                "--layers stages"
            )
        per_model.append(grids)
    wanted = list(per_model[0].values())
    for grids, name in zip(per_model[1:], names[1:], strict=True):
        if list(grids.values()) != wanted:
            raise ModelMismatchError(
                f"per-stage Sp2PS matches stages by resolution, but {name} has stages at "
                f"{_resolutions(list(grids.values()))} and the original {names[0]} at "
                f"{_resolutions(wanted)}; score these models without --layers stages"
            )
    return StagePlan([tuple(g) for g in wanted], [list(grids) for grids in per_model])


def _resolutions(grids: list[Any]) -> str:
    return ", ".join(f"{h}x{w}" for h, w in grids)
