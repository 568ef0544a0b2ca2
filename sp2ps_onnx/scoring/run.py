"""The whole run: :func:`score_models`, its execution plan and its report.

A run streams the data once. Each batch goes through the kernel (:mod:`.batch`) on this
machine (:func:`run_local`) or on a Ray cluster (:mod:`.ray_backend`); the rows are saved
as they come when a checkpoint is asked for (:mod:`.checkpoint`) and aggregated at the end
(:mod:`.aggregate`) into a :class:`~sp2ps_onnx.scoring.result.ScoreReport`.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._ort import select_providers
from ..data import Batch, DataSource, check_class_count, open_data
from ..errors import InputDataError, ModelMismatchError
from ..prefetch import Prefetcher
from ..progress import ProgressReporter
from ..runtime import thread_budget
from .aggregate import Aggregate, aggregate
from .band import FLOOR, PRUNED, REFERENCE, band_of, floor_model, rank_correlations
from .batch import BatchScorer, ScorerSpec, build_scorer
from .cache import CacheUse, PassCache
from .checkpoint import RowStore
from .checks import check_comparable, check_label_range, resolve_target
from .models import ModelLike, model_hash, model_info, model_source, package_versions, unique_names
from .options import CamOptions, DataOptions, MetricOptions, ReferenceOptions, RunOptions
from .ray_backend import run_ray
from .result import ModelScore, ScoreReport, jsonable, stage_scores
from .rows import BatchOutput, Example, RowSpill, merge_candidates

DataLike = DataSource | str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | Iterable[Any]

#: At most this many batches are scored at once on the CPU: beyond it the gain is small
#: and every batch in flight holds its own activations in each ONNX Runtime session.
MAX_IN_FLIGHT = 4


@dataclass(frozen=True)
class ExecutionPlan:
    """How a local scoring run uses the cores.

    ``in_flight`` batches are scored at once, each by one worker thread that runs all the
    models and the metric of its batch in turn; ``session_threads`` is the intra-op thread
    count of every ONNX Runtime session (``None``: ONNX Runtime's default),
    ``session_spinning`` whether their idle threads spin, and ``metric_workers`` the
    metric's threads per batch (``None``: its default).
    """

    in_flight: int
    session_threads: int | None
    metric_workers: int | None
    session_spinning: bool = False


def plan_execution(providers: Sequence[str] | None) -> ExecutionPlan:
    """The execution plan for these ONNX Runtime providers on this machine.

    On the CPU the run's thread budget (``$SP2PS_THREADS``, else the physical cores) is
    split between batches, not spent inside each ONNX Runtime call: with ``k`` batches in
    flight every session gets ``budget // k`` intra-op threads and the metric one thread,
    so the threads never outnumber the budget. Scoring whole batches side by side needs
    no synchronisation between them, whereas intra-op threads meet at a barrier after
    every operator and the metric, run beside them, stalls that barrier; small models
    (tens of microseconds per operator) lose a third of their speed to it. Spinning is
    off: the run alternates between several sessions and the metric, and an idle
    session's spinning threads would take the cores from the next one. On a GPU ONNX
    Runtime needs little CPU: two batches overlap so that one batch's metric runs while
    the next one's models run on the device.
    """
    on_cpu = not providers or providers[0] == "CPUExecutionProvider"
    if not on_cpu:
        return ExecutionPlan(in_flight=2, session_threads=None, metric_workers=None)
    budget = thread_budget()
    in_flight = max(1, min(MAX_IN_FLIGHT, budget))
    return ExecutionPlan(in_flight, max(1, budget // in_flight), 1)


def run_local(
    scorer: BatchScorer,
    source: DataSource,
    start: int,
    on_output: Callable[[BatchOutput], None],
    plan: ExecutionPlan | None = None,
) -> None:
    """Stream ``source`` through the kernel from sample ``start`` on.

    A reader thread decodes batches ahead; ``plan.in_flight`` worker threads score whole
    batches side by side (ONNX Runtime, NumPy and SciPy's FFT release the GIL). Outputs
    reach ``on_output`` in data order, and at most ``in_flight + 1`` batches are held.
    """
    plan = plan or ExecutionPlan(1, None, None)

    def score(batch: Batch, indices: np.ndarray) -> BatchOutput:
        outputs = scorer.run_models(scorer.prepare(batch, indices))
        return scorer.rows(outputs, plan.metric_workers)

    reader = Prefetcher(source.batches(scorer.spec.batch_size, start=start), plan.in_flight)
    pending: deque[Future[BatchOutput]] = deque()
    offset = start
    with ThreadPoolExecutor(plan.in_flight, thread_name_prefix="sp2ps-batch") as pool:
        try:
            for batch in reader:
                indices = np.arange(offset, offset + len(batch.ids))
                offset += len(batch.ids)
                pending.append(pool.submit(score, batch, indices))
                while pending and (len(pending) > plan.in_flight or pending[0].done()):
                    on_output(pending.popleft().result())
            while pending:
                on_output(pending.popleft().result())
        except BaseException:
            for job in pending:
                job.cancel()
            raise
        finally:
            reader.close()


class _Collector:
    """Receives every batch's output in data order: keeps the rows (on disk, in a
    :class:`RowSpill`) and the candidates, saves them to the checkpoint and reports
    progress."""

    def __init__(self, n_models: int, examples: int, store: RowStore | None,
                 source: DataSource, progress: ProgressReporter) -> None:
        self.rows = RowSpill()
        self.candidates: list[list[Example]] = [[] for _ in range(n_models)]
        self.done = 0
        self.examples = examples
        self.store = store
        self.source = source
        self.progress = progress
        if store is not None and store.done:
            for rows in store.saved_chunks():
                self.rows.add(rows)
            self.candidates = store.saved_examples(n_models)
            self.done = store.done

    def __call__(self, output: BatchOutput) -> None:
        self.rows.add(output.rows)
        for j, found in enumerate(output.examples):
            self.candidates[j] = merge_candidates(self.candidates[j], found, self.examples)
        self.done += int(np.count_nonzero(output.rows["model"] == 0))
        if self.store is not None:
            self.store.add(output.rows, self.candidates, len(getattr(self.source, "faults", ())))
        self.progress(self.done, self.source.size_hint)

    def finish(self, failed: bool) -> None:
        """Close the progress bar and save what is left (on Ctrl-C too: every finished
        batch is kept for a resume)."""
        self.progress.close()
        if failed:
            self.rows.discard()
        if self.store is None:
            return
        self.store.flush()
        if failed or self.done == 0:
            self.store.discard_if_empty()


def score_models(
    original: ModelLike,
    pruned: Sequence[ModelLike],
    data: DataLike,
    *,
    cam: CamOptions = CamOptions(),
    data_options: DataOptions = DataOptions(),
    metric: MetricOptions = MetricOptions(),
    run: RunOptions = RunOptions(),
    references: ReferenceOptions = ReferenceOptions(),
) -> ScoreReport:
    """Score each pruned model against the original with Sp2PS over ``data``.

    ``data`` is what :func:`~sp2ps_onnx.data.open_data` opens: paths, or any iterable of
    ``(images, labels)`` batches (a DataLoader, a ``tf.data`` numpy iterator, ...).
    ``cam`` says which CAM every model gets, ``data_options`` how the data is read and
    preprocessed (each model gets its own layout, channels and size), ``metric`` how CAMs
    are compared and aggregated, and ``run`` where the run executes (device, batches,
    checkpoint and resume, Ray), and ``references`` which models put the scores on a scale:
    a random floor (on by default) and independently trained reference models, scored like
    pruned models, reported apart and never ranked (:mod:`sp2ps_onnx.scoring.band`); see
    :mod:`sp2ps_onnx.scoring.options`.

    The original model's CAMs are computed once per batch and reused for every pruned
    model. Unreadable images and empty folders are skipped and listed in the report; NaN/Inf
    model outputs and constant CAMs get defined values and are counted in
    ``ScoreReport.model_faults`` (``data_options.strict``: an error). With
    ``run.checkpoint`` the per-sample rows are saved every ``run.checkpoint_every`` seconds
    and when the run stops, and ``run.resume`` continues an interrupted run; the directory
    is left for the caller to remove once the report is written. ``run.ray`` runs the
    batches on a Ray cluster; the numbers are the same.

    Raises :class:`~sp2ps_onnx.errors.ModelMismatchError`, before any compute, when a
    pruned model's image size, channel count or class count differs from the original's,
    and :class:`~sp2ps_onnx.errors.InputDataError` for data that cannot be read or does
    not fit.
    """
    if not pruned:
        raise ModelMismatchError("no pruned model given; pass at least one pruned model to score")
    started = time.perf_counter()
    source = data if isinstance(data, DataSource) else open_data(
        data, classes=data_options.classes, limit=data_options.limit, strict=data_options.strict
    )
    spec = ScorerSpec(cam, data_options, metric, resolve_target(cam.target, source.has_labels),
                      run.batch_size)
    providers = select_providers(run.device, quiet=run.quiet)
    compared = ComparedModels.of(original, pruned, references, metric.seed)
    check_comparable(original, compared.checked, compared.checked_names, data_options.size)
    plan = plan_execution(providers)
    cache = None if run.cache is None else PassCache(run.cache)
    scorer = build_scorer(original, compared.models, compared.names, spec, providers=providers,
                          session_threads=plan.session_threads, spinning=plan.session_spinning,
                          cache=cache, cached=compared.fixed)
    check_label_range(source, int(scorer.original.num_classes))
    check_class_count(source, int(scorer.original.num_classes),
                      given=data_options.classes is not None,
                      partial=data_options.classes_partial)
    store = None if run.checkpoint is None else RowStore(
        run.checkpoint, fingerprint=_fingerprint(scorer, source), resume=run.resume,
        flush_seconds=run.checkpoint_every,
    )
    collect = _Collector(len(scorer.pruned), metric.examples, store, source,
                         ProgressReporter(run.progress, source.size_hint, "score"))
    try:
        if run.ray is not None:
            run_ray(original, compared.models, compared.names, source, spec, run,
                    start=collect.done, on_output=collect,
                    cache=None if run.cache is None else CacheUse(str(run.cache),
                                                                  tuple(compared.fixed)))
        else:
            run_local(scorer, source, collect.done, collect, plan)
    except BaseException:
        collect.finish(failed=True)
        raise
    collect.finish(failed=False)
    if collect.done == 0:
        skipped = "".join(f"; skipped {f.id}: {f.reason}" for f in source.faults[:3])
        raise InputDataError(f"no samples were read from {source.description}{skipped}")
    floors = [j for j, role in enumerate(compared.roles) if role == FLOOR]
    result = aggregate(collect.rows, collect.candidates, compared.names[1:],
                       metric, expected=collect.done, uncounted=floors)
    report = _report(original, compared, scorer, source, result, run, providers)
    if cache is not None:
        # On Ray the workers count their own hits; the driver knows only the directory.
        counts = cache.stats.to_dict() if run.ray is None else {}
        report.config["cache"] = {"directory": str(cache.directory), **counts}
    report.seconds = time.perf_counter() - started
    return report


@dataclass
class ComparedModels:
    """The models compared with the original: the pruned ones, then the random floor (if
    any), then the reference models; with their names and roles."""

    models: list[ModelLike]
    names: list[str]  # the original's first
    roles: list[str]
    checked: list[ModelLike]  # the user's models, whose sizes and classes are checked
    checked_names: list[str]  # the original's, then those of ``checked``
    notes: list[str]

    @classmethod
    def of(cls, original: ModelLike, pruned: Sequence[ModelLike],
           references: ReferenceOptions, seed: int) -> ComparedModels:
        given = [*pruned, *references.models]
        names = unique_names([original, *given])
        given_names = list(names)
        roles = [PRUNED] * len(pruned) + [REFERENCE] * len(references.models)
        models, notes = list(given), []
        if references.floor:
            floor, why = floor_model(original, seed)
            if floor is None:
                notes.append(f"no random floor: {why}; the scores have no floor to be read "
                             "against (--no-floor leaves it out without this note)")
            else:
                base = f"{names[0]}_randomized"
                name, suffix = base, 2
                while name in names:
                    name, suffix = f"{base}-{suffix}", suffix + 1
                models.insert(len(pruned), floor)
                names.insert(1 + len(pruned), name)
                roles.insert(len(pruned), FLOOR)
        return cls(models, names, roles, given, given_names, notes)

    @property
    def fixed(self) -> list[int]:
        """Positions of the models that are the same in every run with this original (the
        random floor, the references): the pass cache keeps their passes too."""
        return [j for j, role in enumerate(self.roles) if role != PRUNED]


def _fingerprint(scorer: BatchScorer, source: DataSource) -> dict[str, Any]:
    """What must match for a saved run to be resumed: the models, the data and every
    option that changes a row (the number of kept examples is checked on its own)."""
    spec = scorer.spec
    options = {
        "mode": spec.mode, "batch_size": spec.batch_size,
        **{k: v for k, v in vars(spec.cam).items() if k != "target"},
        **{k: v for k, v in vars(spec.data).items() if k not in ("limit", "classes")},
        "spatial": spec.metric.spatial, "spectral": spec.metric.spectral,
        # ROAD's imputation noise follows the seed; the bootstrap's is applied at the end.
        "faithfulness": spec.metric.faithfulness,
        "seed": spec.metric.seed if spec.metric.faithfulness else None,
    }
    return {
        "models": [model_hash(m) for m in (scorer.original, *scorer.pruned)],
        "data": source.description,
        "n": source.size_hint,
        "options": jsonable(options),
        "examples": spec.metric.examples,
    }


def _notes(source: DataSource, num_classes: int, result: Aggregate) -> list[str]:
    """What the user should know about this run beyond its numbers."""
    notes = []
    if source.faults:
        listed = ", ".join(f.id for f in source.faults[:5])
        more = f" and {len(source.faults) - 5} more" if len(source.faults) > 5 else ""
        notes.append(
            f"skipped {len(source.faults)} unreadable sample(s) or empty folder(s): "
            f"{listed}{more} (results.json lists each with its reason; --strict makes "
            "them an error)"
        )
    if source.class_names and len(source.class_names) != num_classes:
        notes.append(
            f"the data names {len(source.class_names)} classes but the model has "
            f"{num_classes}; labels are the positions in that list, so give "
            "--classes with all the model's class names in label order if they differ"
        )
    if result.faults.get("total"):
        counts = ", ".join(f"{count} {name.replace('_', ' ')}"
                           for name, count in result.faults["counts"].items() if count)
        notes.append(
            f"faults: {counts}; NaN/Inf outputs of the original leave the sample out, of a "
            "pruned model score h = 0; constant CAMs are scored by the metric's rule for "
            "constant maps (see model_faults in results.json; --strict makes them errors)"
        )
    return notes


def _config(scorer: BatchScorer, source: DataSource, run: RunOptions,
            providers: Sequence[str], compared: ComparedModels) -> dict[str, Any]:
    """The run's configuration as ``results.json`` records it."""
    spec, prep = scorer.spec, scorer.original_prep
    cam, data, metric = spec.cam, spec.data, spec.metric
    return {
        "method": cam.method,
        "eigen_smooth": cam.eigen_smooth,
        "aug_smooth": cam.aug_smooth,
        "layer": cam.layer,
        "pruned_layer": cam.pruned_layer,
        "original_layer": str(scorer.original.layer),
        "cam_layers": list(cam.cam_layers),
        "layers": cam.layers,
        "stages": None if scorer.stages is None else [
            {"resolution": list(resolution), "original_layer": layer}
            for resolution, layer in zip(scorer.stages.resolutions, scorer.stages.layers[0],
                                         strict=True)
        ],
        "target": spec.mode,
        "batch_size": spec.batch_size,
        "device": run.device,
        "providers": list(providers),
        "preset": data.preset,
        "mean": list(prep.mean),
        "std": list(prep.std),
        "size": list(scorer.map_size),
        "limit": data.limit,
        "data": source.description,
        "data_preprocessed": source.preprocessed,
        "spatial": metric.spatial,
        "spectral": metric.spectral,
        "aggregation": metric.aggregation,
        "n_bootstrap": metric.n_bootstrap,
        "seed": metric.seed,
        "strict": data.strict,
        "faithfulness": metric.faithfulness,
        "floor": FLOOR in compared.roles,
        "references": [name for name, role in zip(compared.names[1:], compared.roles,
                                                   strict=True) if role == REFERENCE],
        "backend": run.backend,
        "versions": package_versions(),
    }


def _report(
    original: ModelLike, compared: ComparedModels, scorer: BatchScorer, source: DataSource,
    result: Aggregate, run: RunOptions, providers: Sequence[str],
) -> ScoreReport:
    domains = scorer.spec.cam.allow_domains
    scores = []
    for j, (model, cam_model) in enumerate(zip(compared.models, scorer.pruned, strict=True)):
        info = model_info(model_source(model), cam_model, compared.names[1 + j], domains)
        scores.append(ModelScore(info, result.results[j], result.worst[j], result.best[j],
                                 result.rows[j], result.moved[j], compared.roles[j],
                                 faithfulness=result.faithfulness[j],
                                 stages=stage_scores(scorer.stages, result.stages, j)))
    pruned = [m for m in scores if m.role == PRUNED]
    references = [m for m in scores if m.role != PRUNED]
    floor = next((m.sp2ps for m in references if m.role == FLOOR), None)
    levels = [m.sp2ps for m in references if m.role == REFERENCE]
    for model in pruned:
        model.band = band_of(model.sp2ps, floor, levels)
    original_info = model_info(model_source(original), scorer.original, compared.names[0],
                               domains)
    accuracy = getattr(result.results[0], "accuracy_original", None)
    return ScoreReport(
        original=original_info,
        models=pruned,
        config=_config(scorer, source, run, providers, compared),
        n=result.n,
        class_names=source.class_names,
        accuracy_original=None if accuracy is None else float(accuracy),
        notes=compared.notes + _notes(source, int(scorer.original.num_classes), result),
        faults=[f.to_dict() for f in source.faults],
        model_faults=result.faults,
        references=references,
        correlations=rank_correlations(pruned),
        original_faithfulness=result.original_faithfulness,
    )
