"""The options of a scoring run, as typed groups.

:func:`~sp2ps_onnx.scoring.score_models` takes one of each; the ``sp2ps score`` command
builds the same objects from its flags, and the Ray workers receive them as they are. Each
group is a frozen dataclass that checks its values when it is made, so a wrong name or
number is reported before any model is opened.

- :class:`CamOptions`: which CAM is computed, where, for which class.
- :class:`DataOptions`: how the data is read and preprocessed for each model.
- :class:`MetricOptions`: how two CAMs are compared and the per-sample scores aggregated.
- :class:`ReferenceOptions`: the models that put the scores on a scale (random floor,
  independently trained references).
- :class:`RunOptions`: where and how the run executes (device, batches, checkpoint, Ray).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx

from .. import cam, metric
from ..data import PRESETS
from ..errors import InputDataError
from ..progress import Progress

TARGET_MODES = ("label", "original", "self")
"""``label``: the true class; ``original``: the original model's top-1 class, for both
models; ``self``: each model's own top-1 class."""

DEVICES = ("auto", "cpu", "cuda")

Size = str | int | Sequence[int] | None
Floats = str | Sequence[float] | None


def _tuple(value: Any) -> Any:
    # Sequences become tuples so that the options stay hashable and compare by value.
    if value is None or isinstance(value, (str, int, float)):
        return value
    return tuple(value)


def _choose(value: str, allowed: Sequence[str], what: str) -> None:
    if value not in allowed:
        raise InputDataError(f"unknown {what} {value!r}; choose one of: {', '.join(allowed)}")


def _at_least(value: float | None, low: float, what: str) -> None:
    if value is not None and value < low:
        raise InputDataError(f"{what} must be at least {low:g}, not {value}")


@dataclass(frozen=True)
class CamOptions:
    """Which CAM every model gets.

    Attributes:
        method: a CAM method of :data:`sp2ps_onnx.cam.METHODS`.
        layer: target tensor or node name (default: the last spatial feature map before
            the classifier head).
        pruned_layer: the pruned models' target layer when it differs from ``layer``.
        target: ``label``, ``original`` or ``self`` (:data:`TARGET_MODES`); ``None``:
            ``label`` when the data has labels, else ``original``.
        allow_domains: custom-op domains to accept (refused by default: their ops run code
            from outside ONNX Runtime).
        grid: (H, W) patch grid of a token-sequence layer (N, T, C) that the graph does not
            prove (vision transformers); the T - H*W leading class tokens are dropped.
        eigen_smooth: pytorch-grad-cam's option: the first principal component of the
            weighted activations replaces their channel sum (methods of
            :data:`sp2ps_onnx.cam.EIGEN_SMOOTH_METHODS`; refused for the others).
        aug_smooth: pytorch-grad-cam's option: each map is the mean of those of the image
            and its horizontal flip, pixel values times 0.9, 1 and 1.1 (six times the cost;
            methods of :data:`sp2ps_onnx.cam.AUG_SMOOTH_METHODS`; refused for the others).
        cam_layers: several target layers (tensor or node names, the same in every model):
            each model's CAM is the average of its maps at these layers, all from one run,
            as pytorch-grad-cam aggregates a list of target layers
            (:func:`sp2ps_onnx.cam.explain_layers`).
        layers: ``"stages"``: also score the last map of each resolution stage
            (:func:`sp2ps_onnx.graph.stage_layers`), the stages of the original and of each
            compared model matched by resolution (per-stage Sp2PS in
            :attr:`~sp2ps_onnx.scoring.ModelScore.stages`); ``None``: the one layer only.
    """

    method: str = "gradcam"
    layer: str | None = None
    pruned_layer: str | None = None
    target: str | None = None
    allow_domains: tuple[str, ...] = ()
    grid: tuple[int, int] | None = None
    eigen_smooth: bool = False
    aug_smooth: bool = False
    cam_layers: tuple[str, ...] = ()
    layers: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "allow_domains", tuple(self.allow_domains))
        self._check_layers()
        if self.grid is not None:
            grid = tuple(int(v) for v in self.grid)
            if len(grid) != 2 or min(grid) < 1:
                raise InputDataError(f"grid {self.grid!r} is not valid; give (rows, columns)")
            object.__setattr__(self, "grid", grid)
        # An unknown name is the registry's clear error; an option the method does not
        # take is refused here, before any model is opened.
        cam.check_smoothing(self.method, self.eigen_smooth, self.aug_smooth)
        if self.target not in (None, "auto"):
            _choose(self.target, TARGET_MODES, "target")

    def _check_layers(self) -> None:
        cam_layers = (self.cam_layers,) if isinstance(self.cam_layers, str) else self.cam_layers
        object.__setattr__(self, "cam_layers", tuple(str(name) for name in cam_layers))
        several = self.cam_layers or self.layers
        if several and self.method not in (*cam.LAYER_METHODS, "refinecam"):
            raise InputDataError(
                f"CAM method {self.method!r} cannot be computed at several layers from one "
                f"run; with cam_layers or layers='stages' use one of: "
                f"{', '.join(cam.LAYER_METHODS)}"
            )
        if self.layers is None:
            return
        if self.layers != "stages":
            raise InputDataError(
                f"layers={self.layers!r} is not known; layers='stages' scores every "
                "resolution stage (to average a CAM over named layers, give cam_layers)"
            )
        if self.aug_smooth:
            raise InputDataError(
                "layers='stages' scores each stage's map from one run; aug_smooth would need "
                "six runs per stage: drop one of them"
            )
        if self.cam_layers or self.method == "refinecam":
            raise InputDataError(
                "layers='stages' scores one layer's CAM per stage; it cannot be combined "
                "with cam_layers or refinecam, which combine several layers into one CAM"
            )


@dataclass(frozen=True)
class DataOptions:
    """How the data is read, and preprocessed for each model.

    Attributes:
        preset: normalisation preset of :data:`sp2ps_onnx.data.PRESETS`.
        mean, std: per-channel values on the [0, 1] pixel scale (override the preset).
        size: input (H, W) for models whose spatial input size is dynamic.
        limit: use only the first ``limit`` samples.
        classes: class names in label order (a file, a comma-separated string or a list).
        classes_partial: accept a class list (``classes`` or the class folders) whose
            length differs from the model's class count; its positions are then taken as
            the model's class indices (by default such a list is an error).
        strict: stop at the first unreadable sample, NaN/Inf output or constant CAM
            instead of skipping it (data) or scoring it by a defined rule (models).
    """

    preset: str = "imagenet"
    mean: Floats = None
    std: Floats = None
    size: Size = None
    limit: int | None = None
    classes: str | Sequence[str] | None = None
    strict: bool = False
    classes_partial: bool = False

    def __post_init__(self) -> None:
        for name in ("mean", "std", "size", "classes"):
            object.__setattr__(self, name, _tuple(getattr(self, name)))
        _choose(self.preset, tuple(PRESETS), "preset")
        _at_least(self.limit, 1, "limit")


@dataclass(frozen=True)
class MetricOptions:
    """How CAMs are compared and per-sample scores aggregated.

    Attributes:
        spatial, spectral: component names of :data:`sp2ps_onnx.metric.SPATIAL` and
            :data:`~sp2ps_onnx.metric.SPECTRAL`.
        aggregation: a name of :data:`sp2ps_onnx.metric.AGGREGATIONS`.
        n_bootstrap: bootstrap resamples of the 95 % confidence interval (0: none).
        seed: seed of the bootstrap.
        examples: worst and best samples per model kept for the report.
        faithfulness: also measure how faithfully each model's own CAM explains it
            (:mod:`sp2ps_onnx.faithfulness`: deletion and insertion AUC, CAM-multiplied
            confidence change, ROAD); costs about 40 model passes per image and model.
    """

    spatial: str = "ssim"
    spectral: str = "tv"
    aggregation: str = "mean"
    n_bootstrap: int = 1000
    seed: int = 0
    examples: int = 4
    faithfulness: bool = False

    def __post_init__(self) -> None:
        for registry, name in ((metric.SPATIAL, self.spatial), (metric.SPECTRAL, self.spectral),
                               (metric.AGGREGATIONS, self.aggregation)):
            registry.get(name)  # an unknown name: the registry's clear error
        _at_least(self.n_bootstrap, 0, "n_bootstrap")
        _at_least(self.examples, 0, "examples")

    def component_config(self) -> dict[str, Any]:
        """The metric configuration recorded with every result."""
        return {"spatial": self.spatial, "spectral": self.spectral, "normalize": True}


@dataclass(frozen=True)
class ReferenceOptions:
    """The reference models of a run.

    Attributes:
        floor: score a random floor (the original with cascading randomisation of its
            weights, seeded by ``MetricOptions.seed``); costs one more model pass.
        models: independently trained models of the same classifier task (paths or
            ModelProtos), scored like pruned models, shown as references and not ranked.
    """

    floor: bool = True
    models: tuple[str | os.PathLike[str] | onnx.ModelProto, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", tuple(self.models))


@dataclass(frozen=True)
class RayOptions:
    """Where a Ray run goes (docs/scale.md).

    Attributes:
        address: ``None`` for a Ray started on this machine, ``"auto"`` or
            ``"ray://host:port"`` for a cluster.
        workers: actors scoring in parallel (default: one per free CPU, or per GPU).
        gpus_per_worker: GPUs each actor reserves (it then runs ONNX Runtime on CUDA).
        connect_timeout: seconds to wait for the cluster at ``address`` to answer before
            giving up with an error (Ray alone retries for minutes).
    """

    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float = 0.0
    connect_timeout: float = 30.0

    def __post_init__(self) -> None:
        _at_least(self.workers, 1, "workers")
        _at_least(self.gpus_per_worker, 0, "gpus_per_worker")
        if not self.connect_timeout > 0:
            raise InputDataError(f"connect_timeout must be positive, not {self.connect_timeout}")


@dataclass(frozen=True)
class RunOptions:
    """Where and how the run executes; none of these change a number.

    Attributes:
        batch_size: samples per batch.
        device: ``auto``, ``cpu`` or ``cuda``.
        progress: ``True`` draws a tqdm bar; a callable is called as
            ``progress(done, total)`` after each batch.
        quiet: no notes on stderr.
        checkpoint: a directory where the per-sample rows are saved as they come.
        resume: continue the interrupted run saved in ``checkpoint``.
        checkpoint_every: seconds between two saves.
        ray: run the batches on Ray (``None``: on this machine).
        cache: a directory where the passes of the models that do not change between runs
            (the original, the random floor, the references) are kept, so that a later run
            with new pruned models runs only those (:mod:`sp2ps_onnx.scoring.cache`).
    """

    batch_size: int = 32
    device: str = "auto"
    progress: Progress = False
    quiet: bool = True
    checkpoint: str | os.PathLike[str] | None = None
    resume: bool = False
    checkpoint_every: float = 10.0
    ray: RayOptions | None = field(default=None)
    cache: str | os.PathLike[str] | None = None

    def __post_init__(self) -> None:
        _at_least(self.batch_size, 1, "batch_size")
        _choose(self.device, DEVICES, "device")
        if self.resume and self.checkpoint is None:
            raise InputDataError("resume=True continues the rows saved in checkpoint=; give it")

    @property
    def backend(self) -> str:
        """``local`` or ``ray``."""
        return "local" if self.ray is None else "ray"
