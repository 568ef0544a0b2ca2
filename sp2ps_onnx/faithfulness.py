"""Faithfulness of a model's own CAM: does the map point at the pixels the model uses?

Every metric here perturbs the input according to the CAM and watches the model's score for
the explained class. The model is not imported: the caller passes ``score_fn(images) ->
outputs`` of shape ``(B, classes)`` and batches it through ONNX Runtime (or anything else).
This module only builds the perturbed images and reads the scores, with NumPy and SciPy.

The metrics
-----------
* **Deletion AUC** (Petsiuk, Das & Saenko, "RISE", BMVC 2018): the pixels are removed, most
  relevant first, in ``steps`` equal steps; a removed pixel takes the baseline value (0 by
  default, RISE's choice). The curve is the class score against the fraction of pixels
  removed; its area (trapezoid rule, x in [0, 1]) is low when the CAM is faithful.
* **Insertion AUC** (same paper): the pixels are put back, most relevant first, into a
  Gaussian blur of the image (RISE's start). High when the CAM is faithful.
* **CAM-multiplied confidence change** (pytorch-grad-cam's ``CamMultImageConfidenceChange``):
  ``score(image * cam) - score(image)``. Near 0 when the CAM keeps what the model needs.
* **ROAD** (Rong et al., "A Consistent and Efficient Evaluation Strategy for Attribution
  Methods", ICML 2022), as pytorch-grad-cam defines it: the pixels selected by a percentile
  threshold of the CAM are replaced by a *noisy linear imputation* (each one the weighted mean
  of its 8 neighbours, 1/6 for edge and 1/12 for corner neighbours, solved as one sparse linear
  system, plus Gaussian noise of standard deviation ``road_noise``), and the metric is
  ``score(imputed) - score(image)``.

  - *Most relevant first* (MoRF), ``percentile`` p (default 80): the pixels whose CAM value is
    at least the p-th percentile of the map (the top 100 - p %) are imputed. A faithful CAM
    gives a large drop (very negative).
  - *Least relevant first* (LeRF), ``percentile`` p (default 20): the pixels whose inverted map
    ``1 - cam`` is at least its p-th percentile (the least relevant 100 - p %) are imputed. A
    faithful CAM gives a small drop (near 0).
  - *Combined*: ``(mean LeRF - mean MoRF) / 2`` over percentiles 10, 20, ..., 90. Higher is
    more faithful.

The class score
---------------
``class_score="softmax"`` (the default) applies a softmax to ``score_fn``'s output and reads
the target class's probability, the quantity RISE plots; it is bounded, so the deletion and
insertion AUCs lie in [0, 1] and are comparable across models. ``class_score="raw"`` reads the
target column of ``score_fn``'s output as it is: the logit for a model that outputs logits, or
the probability for a model that ends in a Softmax (pass that model's output with ``"raw"``,
never ``"softmax"``, which would apply a second softmax). pytorch-grad-cam's
``ClassifierOutputSoftmaxTarget`` corresponds to ``"softmax"`` and ``ClassifierOutputTarget``
to ``"raw"``.

Inputs
------
``images`` as the model takes them, ``(N, C, H, W)`` (``layout="NCHW"``) or ``(N, H, W, C)``
(``layout="NHWC"``); ``cams`` ``(N, H, W)`` with values in [0, 1] (min-max normalised, as
:func:`sp2ps_onnx.metric.normalize_maps` gives them); ``targets`` ``(N,)`` the explained class
of every sample. Perturbed images keep the images' dtype and layout. Results are float64.

A CAM ranks pixels; ties are broken in raster order (row by row), so a constant CAM deletes
pixels top-left first. ROAD's threshold rule (``road_ties="threshold"``, pytorch-grad-cam's)
imputes every pixel tied at the threshold: when the lowest ``p`` % of a map are tied (the
exact zeros a ReLU leaves, on about one FMNIST Grad-CAM in eight at p = 10), MoRF at
percentile ``p`` would impute every pixel, which leaves nothing to impute from. That
percentile is then undefined (NaN, as in pytorch-grad-cam, not a guess) and averages over
percentiles use the defined ones. ``road_ties="rank"`` instead imputes exactly
``round((100 - p) % of the pixels)``, ties in raster order, and is always defined.

Options
-------
The settings the metrics share (layout, class score, steps, baselines, blur, ROAD noise,
ties and seed, batch size) are one :class:`FaithfulnessOptions`, passed to every metric
function after ``score_fn``; a function's keyword arguments are only what is its own (a
single-order ROAD ``percentile``, a ``baseline`` image, shared ``original_scores``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse import linalg as sparse_linalg

from .errors import FaithfulnessInputError

__all__ = [
    "DEFAULT_BLUR_SIGMA",
    "DEFAULT_ROAD_NOISE",
    "DEFAULT_ROAD_PERCENTILES",
    "DEFAULT_STEPS",
    "ClassScore",
    "FaithfulnessInputError",
    "FaithfulnessOptions",
    "FaithfulnessResult",
    "Layout",
    "PerturbationCurve",
    "RoadTies",
    "ScoreFn",
    "blurred",
    "cam_mult_image_confidence_change",
    "class_scores",
    "deletion",
    "evaluate_faithfulness",
    "insertion",
    "noisy_linear_impute",
    "road_combined",
    "road_least_relevant_first",
    "road_most_relevant_first",
]

ScoreFn = Callable[[np.ndarray], np.ndarray]
"""``score_fn(images) -> outputs``: a batch in the model's layout to its ``(B, classes)``
outputs (logits, or probabilities with ``class_score="raw"``)."""

Layout = Literal["NCHW", "NHWC"]
ClassScore = Literal["softmax", "raw"]
RoadTies = Literal["threshold", "rank"]

DEFAULT_STEPS = 16
"""Deletion/insertion steps: 16 steps of 1/16 of the pixels each (49 pixels at 28 x 28, 3,136
at 224 x 224). RISE used 224 px per step at 224 x 224 (224 steps); 16 keeps the cost at
2 x 16 + 1 model passes per image while the trapezoid error of the AUC stays small: on the
bundled Fashion-MNIST CNN, 64 steps move the mean deletion AUC by 0.003 and the insertion AUC
by 0.0002."""

DEFAULT_BLUR_SIGMA = 5.0
"""Insertion starts from a Gaussian blur of the image with this sigma in pixels, RISE's value
(RISE truncates its kernel at 11 x 11 and pads with zeros; here the Gaussian is truncated at
4 sigma and the border pixel is repeated, so the edges of the blurred image do not darken)."""

DEFAULT_ROAD_NOISE = 0.01
"""Standard deviation of the noise added to ROAD's imputed pixels (pytorch-grad-cam's and the
ROAD paper's default), in the units of the model's input."""

DEFAULT_ROAD_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)

DEFAULT_BATCH_SIZE = 32

# ROAD's imputation: each missing pixel is this weighted mean of its existing 8 neighbours
# (Rong et al. 2022): edge neighbours weigh twice as much as corner neighbours.
_NEIGHBOUR_WEIGHTS: tuple[tuple[int, int, float], ...] = (
    (-1, -1, 1 / 12),
    (-1, 0, 1 / 6),
    (-1, 1, 1 / 12),
    (0, -1, 1 / 6),
    (0, 1, 1 / 6),
    (1, -1, 1 / 12),
    (1, 0, 1 / 6),
    (1, 1, 1 / 12),
)


@dataclass(frozen=True)
class PerturbationCurve:
    """A deletion or insertion curve for every sample.

    ``fractions`` ``(steps + 1,)``: the fraction of pixels removed (deletion) or inserted
    (insertion) at each step, from 0 to 1. ``scores`` ``(N, steps + 1)``: the class score at
    each step. ``auc`` ``(N,)``: the area under each curve by the trapezoid rule over
    ``fractions``, so in [0, 1] for ``class_score="softmax"``.
    """

    fractions: np.ndarray
    scores: np.ndarray
    auc: np.ndarray


@dataclass(frozen=True)
class FaithfulnessOptions:
    """Settings shared by the faithfulness metrics; see the module docstring for each metric.

    Every metric function and :func:`evaluate_faithfulness` take one and read the fields they
    use; what belongs to one call only (a single-order ROAD ``percentile``, a per-image
    ``baseline`` array, shared ``original_scores``) is a keyword argument of that function.

    Attributes:
        layout: ``"NCHW"`` or ``"NHWC"``, the layout of the images and of ``score_fn``'s input.
        class_score: ``"softmax"`` (the target class's softmax probability) or ``"raw"``
            (``score_fn``'s target column as it is).
        steps: deletion/insertion steps, each changing ``1 / steps`` of the pixels.
        deletion_baseline: the value deleted pixels take, in the model's input units (RISE:
            0); :func:`deletion`'s ``baseline`` argument overrides it with an image or one
            image per sample.
        blur_sigma: sigma in pixels of the Gaussian blur that insertion starts from.
        road_percentiles: the percentiles that :func:`road_combined` and
            :func:`evaluate_faithfulness` average ROAD over.
        road_noise: standard deviation of the noise added to ROAD's imputed pixels, in input
            units.
        road_ties: ``"threshold"`` (pytorch-grad-cam's rule: pixels tied at the threshold are
            imputed) or ``"rank"`` (impute exactly the stated share, ties in raster order).
        seed: seed of ROAD's noise generator (``None``: fresh entropy, not reproducible).
        batch_size: perturbed images per ``score_fn`` call.
    """

    layout: Layout = "NCHW"
    class_score: ClassScore = "softmax"
    steps: int = DEFAULT_STEPS
    deletion_baseline: float = 0.0
    blur_sigma: float = DEFAULT_BLUR_SIGMA
    road_percentiles: tuple[float, ...] = DEFAULT_ROAD_PERCENTILES
    road_noise: float = DEFAULT_ROAD_NOISE
    road_ties: RoadTies = "threshold"
    seed: int | None = 0
    batch_size: int = DEFAULT_BATCH_SIZE


@dataclass(frozen=True)
class FaithfulnessResult:
    """Per-sample faithfulness figures of one model's CAMs (each ``(N,)``, float64).

    ``deletion_auc`` (lower is more faithful), ``insertion_auc`` (higher is more faithful),
    ``cam_mult_change`` (score change when the image is multiplied by its CAM; near 0 or above
    is faithful), ``road_morf`` and ``road_lerf`` (ROAD score change averaged over
    ``road_percentiles``; MoRF very negative and LeRF near 0 is faithful), ``road_combined``
    (``(road_lerf - road_morf) / 2``, higher is more faithful). ``original_score`` is the class
    score of the unperturbed image. :meth:`means` averages each over the samples, ignoring NaN.
    """

    original_score: np.ndarray
    deletion_auc: np.ndarray
    insertion_auc: np.ndarray
    cam_mult_change: np.ndarray
    road_morf: np.ndarray
    road_lerf: np.ndarray
    road_combined: np.ndarray

    def means(self) -> dict[str, float]:
        """Mean of every figure over the samples (NaN samples left out; NaN if all are)."""
        out: dict[str, float] = {}
        for name in self.__dataclass_fields__:
            values = getattr(self, name)
            finite = values[np.isfinite(values)]
            out[name] = float(finite.mean()) if finite.size else float("nan")
        return out


# --------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class _Batch:
    """Validated inputs, images channel-first internally."""

    images: np.ndarray  # (N, C, H, W), the caller's dtype
    cams: np.ndarray  # (N, H, W), the caller's float dtype
    targets: np.ndarray  # (N,) int64
    layout: Layout


def _validate(
    images: np.ndarray, cams: np.ndarray | None, targets: Sequence[int] | np.ndarray, layout: str
) -> _Batch:
    """Check the inputs; ``cams=None`` checks the images and targets only."""
    if layout not in ("NCHW", "NHWC"):
        raise FaithfulnessInputError(
            f"layout={layout!r} is not a known image layout; pass 'NCHW' for (N, C, H, W) "
            f"images or 'NHWC' for (N, H, W, C)"
        )
    images = np.asarray(images)
    targets_array = np.asarray(targets)
    if images.ndim != 4:
        raise FaithfulnessInputError(
            f"images have shape {images.shape}; expected 4 axes, (N, C, H, W) with "
            f"layout='NCHW' or (N, H, W, C) with layout='NHWC'"
        )
    if not np.issubdtype(images.dtype, np.floating):
        raise FaithfulnessInputError(
            f"images have dtype {images.dtype}; pass them as the model takes them, as floats "
            f"after preprocessing"
        )
    channel_first = images if layout == "NCHW" else np.moveaxis(images, 3, 1)
    n, _, height, width = channel_first.shape
    if cams is not None:
        cams = _validate_cams(np.asarray(cams), n, height, width, images.shape, layout)
    if targets_array.shape != (n,) or (n and not np.issubdtype(targets_array.dtype, np.integer)):
        raise FaithfulnessInputError(
            f"targets have shape {targets_array.shape} and dtype {targets_array.dtype}; "
            f"expected {n} integer class indices, one per image"
        )
    if n and targets_array.min() < 0:
        raise FaithfulnessInputError(
            f"targets contain {int(targets_array.min())}; class indices start at 0"
        )
    return _Batch(channel_first, cams, targets_array.astype(np.int64), layout)  # type: ignore[arg-type]


def _validate_cams(
    cams: np.ndarray, n: int, height: int, width: int, image_shape: tuple, layout: str
) -> np.ndarray:
    if cams.shape != (n, height, width):
        raise FaithfulnessInputError(
            f"cams have shape {cams.shape} but the {layout} images {image_shape} need "
            f"({n}, {height}, {width}): one map per image at input resolution; check the "
            f"layout argument, or upsample the maps to the input size"
        )
    if not np.issubdtype(cams.dtype, np.floating):
        cams = cams.astype(np.float64)
    if n and (not np.all(np.isfinite(cams)) or cams.min() < 0 or cams.max() > 1):
        raise FaithfulnessInputError(
            "cams must be finite and in [0, 1]; normalise each map first "
            "(sp2ps_onnx.metric.normalize_maps)"
        )
    return cams


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise FaithfulnessInputError(f"batch_size={batch_size!r}; pass a positive integer")


def _check_class_score(class_score: str) -> None:
    if class_score not in ("softmax", "raw"):
        raise FaithfulnessInputError(
            f"class_score={class_score!r}; pass 'softmax' (softmax probability of the target "
            f"class) or 'raw' (the model output's target column as it is)"
        )


def _baseline_nchw(baseline: float | np.ndarray, batch: _Batch, what: str) -> np.ndarray:
    """The baseline broadcast to (N, C, H, W) (a read-only view where possible)."""
    images = batch.images
    value = np.asarray(baseline, dtype=images.dtype)
    if value.ndim == 0:
        return np.broadcast_to(value, images.shape)
    channel_first = value
    if batch.layout == "NHWC" and value.ndim in (3, 4):
        channel_first = np.moveaxis(value, -1, -3)
    if channel_first.shape == images.shape[1:]:
        return np.broadcast_to(channel_first, images.shape)
    if channel_first.shape == images.shape:
        return channel_first
    one = images.shape[1:] if batch.layout == "NCHW" else np.moveaxis(images[:1], 1, 3).shape[1:]
    raise FaithfulnessInputError(
        f"{what} has shape {value.shape}; pass a number, one image {one} or one per image "
        f"({len(images)}, *{one}) in the images' layout"
    )


# --------------------------------------------------------------------------- scoring


def _to_model_layout(channel_first: np.ndarray, layout: Layout) -> np.ndarray:
    if layout == "NHWC":
        channel_first = np.moveaxis(channel_first, 1, 3)
    return np.ascontiguousarray(channel_first)


def _class_scores(outputs: np.ndarray, targets: np.ndarray, class_score: ClassScore) -> np.ndarray:
    """Target-class score of every row of ``outputs`` (B, classes), float64."""
    outputs = np.asarray(outputs, dtype=np.float64)
    if class_score == "softmax":
        shifted = outputs - outputs.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        picked = exp[np.arange(len(targets)), targets]
        return picked / exp.sum(axis=1)
    return outputs[np.arange(len(targets)), targets]


def _score_rows(
    build_rows: Callable[[int, int], np.ndarray],
    row_targets: np.ndarray,
    score_fn: ScoreFn,
    layout: Layout,
    class_score: ClassScore,
    batch_size: int,
) -> np.ndarray:
    """Class score of ``len(row_targets)`` perturbed images, built ``batch_size`` at a time
    by ``build_rows(start, stop) -> (stop - start, C, H, W)``."""
    total = len(row_targets)
    scores = np.empty(total, dtype=np.float64)
    for start in range(0, total, batch_size):
        stop = min(start + batch_size, total)
        rows = build_rows(start, stop)
        outputs = np.asarray(score_fn(_to_model_layout(rows, layout)))
        if outputs.ndim != 2 or outputs.shape[0] != stop - start:
            raise FaithfulnessInputError(
                f"score_fn returned shape {outputs.shape} for a batch of {stop - start} "
                f"images; it must return one row of class outputs per image, "
                f"({stop - start}, classes)"
            )
        targets = row_targets[start:stop]
        if targets.max() >= outputs.shape[1]:
            raise FaithfulnessInputError(
                f"target class {int(targets.max())} is out of range for a model with "
                f"{outputs.shape[1]} outputs; targets must be in [0, {outputs.shape[1] - 1}]"
            )
        scores[start:stop] = _class_scores(outputs, targets, class_score)
    return scores


def _original_scores(
    batch: _Batch, score_fn: ScoreFn, class_score: ClassScore, batch_size: int
) -> np.ndarray:
    return _score_rows(
        lambda start, stop: batch.images[start:stop],
        batch.targets,
        score_fn,
        batch.layout,
        class_score,
        batch_size,
    )


def _given_or_computed_scores(
    original_scores: np.ndarray | None,
    batch: _Batch,
    score_fn: ScoreFn,
    class_score: ClassScore,
    batch_size: int,
) -> np.ndarray:
    """The caller's unperturbed class scores, checked, or one pass to compute them."""
    if original_scores is None:
        return _original_scores(batch, score_fn, class_score, batch_size)
    given = np.asarray(original_scores, dtype=np.float64)
    if given.shape != batch.targets.shape:
        raise FaithfulnessInputError(
            f"original_scores have shape {given.shape}; expected {batch.targets.shape}, the "
            f"class score of every image (sp2ps_onnx.faithfulness.class_scores gives them)"
        )
    return given


def class_scores(
    images: np.ndarray,
    targets: Sequence[int] | np.ndarray,
    score_fn: ScoreFn,
    options: FaithfulnessOptions = FaithfulnessOptions(),
) -> np.ndarray:
    """The target-class score of every unperturbed image (N,), float64: pass it as
    ``original_scores`` to several metrics (with the same ``options``) so that the
    unperturbed pass runs once. Reads ``layout``, ``class_score`` and ``batch_size``."""
    _check_class_score(options.class_score)
    _check_batch_size(options.batch_size)
    return _original_scores(
        _validate(images, None, targets, options.layout),
        score_fn,
        options.class_score,
        options.batch_size,
    )


# --------------------------------------------------------------------------- deletion / insertion


def _step_pixel_counts(pixels: int, steps: int) -> np.ndarray:
    """Pixels changed after step k = 0..steps: round(k * pixels / steps), halves rounded up."""
    k = np.arange(steps + 1, dtype=np.int64)
    return (2 * k * pixels + steps) // (2 * steps)


def _relevance_rank(cams: np.ndarray) -> np.ndarray:
    """(N, H*W) position of every pixel when sorted by decreasing CAM value, ties in raster
    order."""
    n, height, width = cams.shape
    flat = cams.reshape(n, height * width)
    order = np.argsort(-flat, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(height * width)[None, :], axis=1)
    return rank


def _curve(
    batch: _Batch,
    start_images: np.ndarray,
    end_images: np.ndarray,
    score_fn: ScoreFn,
    options: FaithfulnessOptions,
    known: dict[int, np.ndarray],
) -> PerturbationCurve:
    """Class score as the most relevant pixels switch from ``start_images`` to
    ``end_images`` in ``steps`` steps. ``known`` gives scores already computed for a step
    (the unperturbed image), so those passes are not repeated."""
    steps = options.steps
    n, _, height, width = batch.images.shape
    pixels = height * width
    if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= pixels:
        raise FaithfulnessInputError(
            f"steps={steps!r}; pass an integer between 1 and the number of pixels ({pixels})"
        )
    counts = _step_pixel_counts(pixels, int(steps))
    rank = _relevance_rank(batch.cams)
    todo = np.array([k for k in range(steps + 1) if k not in known], dtype=np.int64)
    row_image = np.repeat(np.arange(n), len(todo))
    row_step = np.tile(todo, n)

    def build_rows(start: int, stop: int) -> np.ndarray:
        images = row_image[start:stop]
        switched = rank[images] < counts[row_step[start:stop]][:, None]
        switched = switched.reshape(len(images), 1, height, width)
        return np.where(switched, end_images[images], start_images[images])

    scores = np.empty((n, steps + 1), dtype=np.float64)
    computed = _score_rows(
        build_rows,
        batch.targets[row_image],
        score_fn,
        batch.layout,
        options.class_score,
        options.batch_size,
    )
    scores[:, todo] = computed.reshape(n, len(todo))
    for step, values in known.items():
        scores[:, step] = values
    fractions = counts / pixels
    auc = ((scores[:, 1:] + scores[:, :-1]) / 2 * np.diff(fractions)).sum(axis=1)
    return PerturbationCurve(fractions=fractions, scores=scores, auc=auc)


def deletion(
    images: np.ndarray,
    cams: np.ndarray,
    targets: Sequence[int] | np.ndarray,
    score_fn: ScoreFn,
    options: FaithfulnessOptions = FaithfulnessOptions(),
    *,
    baseline: float | np.ndarray | None = None,
    original_scores: np.ndarray | None = None,
) -> PerturbationCurve:
    """RISE deletion: the class score as the CAM's most relevant pixels are replaced by the
    baseline, ``round(k * H * W / steps)`` pixels after step k (``options.steps``).

    The baseline is ``options.deletion_baseline`` (a number in the model's input units; RISE
    uses 0), or ``baseline`` when given: a number, an image or one image per sample, in the
    images' layout. A low AUC means the score collapses once the few pixels the CAM ranks
    highest are gone: the CAM found the evidence. ``original_scores`` (the class scores of
    ``images``, as :func:`class_scores` gives them) saves one model pass per image.
    """
    _check_class_score(options.class_score)
    _check_batch_size(options.batch_size)
    batch = _validate(images, cams, targets, options.layout)
    chosen = options.deletion_baseline if baseline is None else baseline
    end = _baseline_nchw(chosen, batch, "baseline")
    known = {}
    if original_scores is not None:
        known[0] = _given_or_computed_scores(original_scores, batch, score_fn,
                                             options.class_score, 1)
    return _curve(batch, batch.images, end, score_fn, options, known)


def blurred(
    images: np.ndarray, sigma: float = DEFAULT_BLUR_SIGMA, layout: Layout = "NCHW"
) -> np.ndarray:
    """Gaussian blur of every image over its two spatial axes (insertion's start): ``sigma``
    in pixels, truncated at 4 sigma, the border pixel repeated beyond the edge."""
    if not np.isfinite(sigma) or sigma < 0:
        raise FaithfulnessInputError(f"blur_sigma={sigma!r}; pass a non-negative number")
    spatial = (0, 0, sigma, sigma) if layout == "NCHW" else (0, sigma, sigma, 0)
    return ndimage.gaussian_filter(images, sigma=spatial, mode="nearest")


def insertion(
    images: np.ndarray,
    cams: np.ndarray,
    targets: Sequence[int] | np.ndarray,
    score_fn: ScoreFn,
    options: FaithfulnessOptions = FaithfulnessOptions(),
    *,
    baseline: float | np.ndarray | None = None,
    original_scores: np.ndarray | None = None,
) -> PerturbationCurve:
    """RISE insertion: starting from the images blurred with a Gaussian of
    ``options.blur_sigma`` pixels (RISE's start), or from ``baseline`` when given (a number,
    an image or one image per sample, in the images' layout), the CAM's most relevant pixels
    are restored first, ``round(k * H * W / steps)`` of them after step k.

    A high AUC means the score recovers from only the few pixels the CAM ranks highest.
    """
    _check_class_score(options.class_score)
    _check_batch_size(options.batch_size)
    batch = _validate(images, cams, targets, options.layout)
    if baseline is None:
        start = blurred(batch.images, options.blur_sigma, "NCHW")
        start = start.astype(batch.images.dtype, copy=False)
    else:
        start = _baseline_nchw(baseline, batch, "baseline")
    known = {}
    if original_scores is not None:
        known[options.steps] = _given_or_computed_scores(original_scores, batch, score_fn,
                                                         options.class_score, 1)
    return _curve(batch, start, batch.images, score_fn, options, known)


# --------------------------------------------------------------------------- CAM x image


def cam_mult_image_confidence_change(
    images: np.ndarray,
    cams: np.ndarray,
    targets: Sequence[int] | np.ndarray,
    score_fn: ScoreFn,
    options: FaithfulnessOptions = FaithfulnessOptions(),
    *,
    original_scores: np.ndarray | None = None,
) -> np.ndarray:
    """``score(image * cam) - score(image)`` per sample, the CAM broadcast over the channels
    (pytorch-grad-cam's ``CamMultImageConfidenceChange``). Near 0 or positive: the pixels the
    CAM keeps carry the class; strongly negative: the CAM dropped the evidence. Reads
    ``layout``, ``class_score`` and ``batch_size`` from ``options``."""
    _check_class_score(options.class_score)
    _check_batch_size(options.batch_size)
    batch = _validate(images, cams, targets, options.layout)
    original_scores = _given_or_computed_scores(
        original_scores, batch, score_fn, options.class_score, options.batch_size
    )
    masked = _score_rows(
        lambda start, stop: (
            batch.images[start:stop]
            * batch.cams[start:stop, None].astype(batch.images.dtype, copy=False)
        ),
        batch.targets,
        score_fn,
        batch.layout,
        options.class_score,
        options.batch_size,
    )
    return masked - original_scores


# --------------------------------------------------------------------------- ROAD


def noisy_linear_impute(
    image: np.ndarray, keep: np.ndarray, noise: float = 0.0, rng: np.random.Generator | None = None
) -> np.ndarray:
    """ROAD's noisy linear imputation of one channel-first image ``(C, H, W)``.

    Every pixel with ``keep`` False becomes the weighted mean of its (up to 8) neighbours
    inside the image, edge neighbours weighing 1/6 and corner neighbours 1/12, where missing
    neighbours are themselves unknowns: one sparse linear system for all missing pixels,
    solved for all channels at once, then Gaussian noise of standard deviation ``noise`` is
    added to the imputed values. Raises :class:`FaithfulnessInputError` when no pixel is
    kept (nothing to impute from).
    """
    channels, height, width = image.shape
    keep_flat = np.asarray(keep, dtype=bool).reshape(-1)
    if keep_flat.size != height * width:
        raise FaithfulnessInputError(
            f"keep mask has {keep_flat.size} pixels, the image {height} x {width}"
        )
    missing = np.flatnonzero(~keep_flat)
    result = image.reshape(channels, -1).copy()
    if missing.size == 0:
        return result.reshape(image.shape)
    if missing.size == keep_flat.size:
        raise FaithfulnessInputError(
            "every pixel is to be imputed, so there is nothing to impute from"
        )
    values = image.reshape(channels, -1).astype(np.float64)
    unknown_index = np.full(keep_flat.size, -1, dtype=np.int64)
    unknown_index[missing] = np.arange(missing.size)
    rows, cols = np.divmod(missing, width)
    weight_sum = np.zeros(missing.size)
    rhs = np.zeros((missing.size, channels))
    coupled_eq, coupled_var, coupled_weight = [], [], []
    for d_row, d_col, weight in _NEIGHBOUR_WEIGHTS:
        n_row, n_col = rows + d_row, cols + d_col
        inside = (n_row >= 0) & (n_row < height) & (n_col >= 0) & (n_col < width)
        equation = np.flatnonzero(inside)
        neighbour = n_row[inside] * width + n_col[inside]
        weight_sum[equation] += weight
        is_known = keep_flat[neighbour]
        # Known neighbours are constants: they move to the right-hand side.
        rhs[equation[is_known]] += weight * values[:, neighbour[is_known]].T
        coupled_eq.append(equation[~is_known])
        coupled_var.append(unknown_index[neighbour[~is_known]])
        coupled_weight.append(np.full(int((~is_known).sum()), -weight))
    # weight_sum * x_i - sum_j w_ij x_j = sum_k w_ik v_k  for unknown j and known k.
    eq = np.concatenate([np.arange(missing.size), *coupled_eq])
    var = np.concatenate([np.arange(missing.size), *coupled_var])
    coefficient = np.concatenate([weight_sum, *coupled_weight])
    system = sparse.csc_matrix((coefficient, (eq, var)), shape=(missing.size, missing.size))
    # The system is symmetric (neighbour weights are) and diagonally dominant, so it factors
    # without pivoting, and a symmetric ordering has less fill-in than the default COLAMD:
    # twice as fast at 90 % of the pixels missing, equal to 1e-14.
    solution = sparse_linalg.splu(
        system,
        permc_spec="MMD_AT_PLUS_A",
        diag_pivot_thresh=0.0,
        options={"SymmetricMode": True},
    ).solve(rhs)  # (missing, C)
    if noise:
        generator = rng if rng is not None else np.random.default_rng()
        solution = solution + noise * generator.standard_normal(solution.shape)
    result[:, missing] = solution.T.astype(result.dtype, copy=False)
    return result.reshape(image.shape)


def _road_keep_mask(
    cam: np.ndarray, percentile: float, most_relevant_first: bool, ties: RoadTies
) -> np.ndarray:
    """Pixels ROAD keeps (the others are imputed).

    ``"threshold"`` (pytorch-grad-cam): keep the pixels below the ``percentile``-th
    percentile of the map (MoRF) or of the inverted map ``1 - cam`` (LeRF), compared in the
    map's own dtype; pixels tied at the threshold are imputed. ``"rank"``: impute exactly
    ``round((100 - percentile) / 100 * H * W)`` pixels, the most (MoRF) or least (LeRF)
    relevant ones, ties in raster order.
    """
    if ties == "threshold":
        ranked = cam if most_relevant_first else (1 - cam).astype(cam.dtype, copy=False)
        threshold = np.asarray(np.percentile(ranked, percentile)).astype(cam.dtype)
        return ranked < threshold
    pixels = cam.size
    removed = int(np.floor((100 - percentile) / 100 * pixels + 0.5))
    rank = _relevance_rank(cam[None])[0].reshape(cam.shape)
    if most_relevant_first:
        return rank >= removed
    return rank < pixels - removed


@dataclass(frozen=True)
class _RoadSettings:
    noise: float
    rng: np.random.Generator
    ties: RoadTies
    class_score: ClassScore
    batch_size: int


def _road_changes(
    batch: _Batch,
    score_fn: ScoreFn,
    percentiles: Sequence[float],
    most_relevant_first: bool,
    settings: _RoadSettings,
    original_scores: np.ndarray,
) -> np.ndarray:
    """ROAD score change (N, P) for every sample and percentile; NaN where every pixel
    would be imputed."""
    n = len(batch.images)
    row_image = np.repeat(np.arange(n), len(percentiles))
    row_percentile = np.tile(np.arange(len(percentiles)), n)
    undefined = np.zeros(n * len(percentiles), dtype=bool)

    def build_rows(start: int, stop: int) -> np.ndarray:
        rows = np.empty((stop - start, *batch.images.shape[1:]), dtype=batch.images.dtype)
        for out, row in enumerate(range(start, stop)):
            image = row_image[row]
            keep = _road_keep_mask(
                batch.cams[image],
                percentiles[row_percentile[row]],
                most_relevant_first,
                settings.ties,
            )
            if not keep.any():
                undefined[row] = True
                rows[out] = batch.images[image]  # scored, then discarded as NaN
                continue
            rows[out] = noisy_linear_impute(batch.images[image], keep, settings.noise, settings.rng)
        return rows

    imputed = _score_rows(
        build_rows,
        batch.targets[row_image],
        score_fn,
        batch.layout,
        settings.class_score,
        settings.batch_size,
    )
    change = imputed - original_scores[row_image]
    change[undefined] = np.nan
    return change.reshape(n, len(percentiles))


def _mean_over_percentiles(changes: np.ndarray) -> np.ndarray:
    """Mean over the percentiles where ROAD is defined; NaN where it is defined at none."""
    defined = np.isfinite(changes)
    counts = defined.sum(axis=1)
    sums = np.where(defined, changes, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.nan)


def _road_setup(
    images: np.ndarray,
    cams: np.ndarray,
    targets: Sequence[int] | np.ndarray,
    score_fn: ScoreFn,
    options: FaithfulnessOptions,
    original_scores: np.ndarray | None,
) -> tuple[_Batch, _RoadSettings, np.ndarray]:
    _check_class_score(options.class_score)
    _check_batch_size(options.batch_size)
    if not np.isfinite(options.road_noise) or options.road_noise < 0:
        raise FaithfulnessInputError(
            f"road_noise={options.road_noise!r}; pass a non-negative number"
        )
    if options.road_ties not in ("threshold", "rank"):
        raise FaithfulnessInputError(
            f"road_ties={options.road_ties!r}; pass 'threshold' (pytorch-grad-cam's rule) "
            f"or 'rank' (impute exactly the stated share of pixels)"
        )
    batch = _validate(images, cams, targets, options.layout)
    original_scores = _given_or_computed_scores(
        original_scores, batch, score_fn, options.class_score, options.batch_size
    )
    settings = _RoadSettings(
        noise=float(options.road_noise),
        rng=np.random.default_rng(options.seed),
        ties=options.road_ties,
        class_score=options.class_score,
        batch_size=options.batch_size,
    )
    return batch, settings, np.asarray(original_scores, np.float64)


def _percentile_list(percentiles: float | Sequence[float]) -> list[float]:
    values = [percentiles] if np.ndim(percentiles) == 0 else list(percentiles)  # type: ignore[arg-type]
    if not values or any(not (np.isfinite(p) and 0 <= p <= 100) for p in values):
        raise FaithfulnessInputError(
            f"ROAD percentiles {values}; pass one or more numbers in [0, 100]"
        )
    return [float(p) for p in values]


def _road_one_order(
    most_relevant_first: bool,
    images: np.ndarray,
    cams: np.ndarray,
    targets: Sequence[int] | np.ndarray,
    score_fn: ScoreFn,
    options: FaithfulnessOptions,
    percentile: float | Sequence[float],
    original_scores: np.ndarray | None,
) -> np.ndarray:
    percentiles = _percentile_list(percentile)
    batch, settings, original = _road_setup(
        images, cams, targets, score_fn, options, original_scores
    )
    changes = _road_changes(batch, score_fn, percentiles, most_relevant_first, settings, original)
    return _mean_over_percentiles(changes)


def road_most_relevant_first(
    images: np.ndarray,
    cams: np.ndarray,
    targets: Sequence[int] | np.ndarray,
    score_fn: ScoreFn,
    options: FaithfulnessOptions = FaithfulnessOptions(),
    *,
    percentile: float | Sequence[float] = 80,
    original_scores: np.ndarray | None = None,
) -> np.ndarray:
    """ROAD, most relevant first: impute the pixels whose CAM value is at least the
    ``percentile``-th percentile of the map and return ``score(imputed) - score(image)``
    per sample (pytorch-grad-cam's ``ROADMostRelevantFirst``). A sequence of percentiles
    averages over them (``ROADMostRelevantFirstAverage``). The more negative, the more
    faithful.

    With ``options.road_ties="threshold"`` a map whose lowest ``percentile`` % are tied (e.g.
    ReLU zeros) would have every pixel imputed: that percentile is undefined (pytorch-grad-cam
    returns NaN there too) and the average is over the defined ones; NaN if none is defined.
    ``road_ties="rank"`` always imputes exactly the stated share. ``options.road_noise`` and
    ``options.seed``: the imputation noise (standard deviation, input units) and its
    generator's seed. ``options.road_percentiles`` is not used: ``percentile`` is this
    function's own.
    """
    return _road_one_order(
        True, images, cams, targets, score_fn, options, percentile, original_scores
    )


def road_least_relevant_first(
    images: np.ndarray,
    cams: np.ndarray,
    targets: Sequence[int] | np.ndarray,
    score_fn: ScoreFn,
    options: FaithfulnessOptions = FaithfulnessOptions(),
    *,
    percentile: float | Sequence[float] = 20,
    original_scores: np.ndarray | None = None,
) -> np.ndarray:
    """ROAD, least relevant first: impute the pixels whose inverted map ``1 - cam`` is at
    least its ``percentile``-th percentile (the least relevant ``100 - percentile`` %) and
    return ``score(imputed) - score(image)`` (pytorch-grad-cam's ``ROADLeastRelevantFirst``;
    a sequence averages, ``ROADLeastRelevantFirstAverage``). Near 0 is faithful. Ties,
    noise and undefined percentiles as in :func:`road_most_relevant_first`."""
    return _road_one_order(
        False, images, cams, targets, score_fn, options, percentile, original_scores
    )


def road_combined(
    images: np.ndarray,
    cams: np.ndarray,
    targets: Sequence[int] | np.ndarray,
    score_fn: ScoreFn,
    options: FaithfulnessOptions = FaithfulnessOptions(),
    *,
    original_scores: np.ndarray | None = None,
) -> np.ndarray:
    """``(mean LeRF - mean MoRF) / 2`` over ``options.road_percentiles`` (pytorch-grad-cam's
    ``ROADCombined``): higher is more faithful."""
    morf, lerf = _road_pair(images, cams, targets, score_fn, options, original_scores)
    return (lerf - morf) / 2


def _road_pair(
    images: np.ndarray,
    cams: np.ndarray,
    targets: Sequence[int] | np.ndarray,
    score_fn: ScoreFn,
    options: FaithfulnessOptions,
    original_scores: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean MoRF and mean LeRF change over ``options.road_percentiles``, one noise stream."""
    percentiles = _percentile_list(options.road_percentiles)
    batch, settings, original = _road_setup(
        images, cams, targets, score_fn, options, original_scores
    )
    morf = _road_changes(batch, score_fn, percentiles, True, settings, original)
    lerf = _road_changes(batch, score_fn, percentiles, False, settings, original)
    return _mean_over_percentiles(morf), _mean_over_percentiles(lerf)


# --------------------------------------------------------------------------- all together


def evaluate_faithfulness(
    images: np.ndarray,
    cams: np.ndarray,
    targets: Sequence[int] | np.ndarray,
    score_fn: ScoreFn,
    options: FaithfulnessOptions | None = None,
) -> FaithfulnessResult:
    """Every faithfulness figure of one model's CAMs on one batch, sharing the unperturbed
    pass. Model passes per image: 1 + 2 * steps (deletion, insertion) + 1 (CAM x image) +
    2 * len(road_percentiles) (ROAD), i.e. 52 with the defaults."""
    options = options or FaithfulnessOptions()
    _check_class_score(options.class_score)
    _check_batch_size(options.batch_size)
    batch = _validate(images, cams, targets, options.layout)
    original = _original_scores(batch, score_fn, options.class_score, options.batch_size)
    deleted = deletion(images, cams, targets, score_fn, options, original_scores=original)
    inserted = insertion(images, cams, targets, score_fn, options, original_scores=original)
    mult = cam_mult_image_confidence_change(
        images, cams, targets, score_fn, options, original_scores=original
    )
    morf, lerf = _road_pair(images, cams, targets, score_fn, options, original)
    return FaithfulnessResult(
        original_score=original,
        deletion_auc=deleted.auc,
        insertion_auc=inserted.auc,
        cam_mult_change=mult,
        road_morf=morf,
        road_lerf=lerf,
        road_combined=(lerf - morf) / 2,
    )
