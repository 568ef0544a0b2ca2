"""Class activation map (CAM) methods as pure, vectorised NumPy functions.

Every method follows the formulas and the post-processing of pytorch-grad-cam (Gildenblat et
al.), so that a map computed here from an ONNX graph can be compared with one computed there
from the PyTorch model:

==========================  =============================================================
method                      raw map for one image, activations ``A`` and gradients ``g``
==========================  =============================================================
``gradcam``                 ``sum_c mean_hw(g) * A``
``gradcam++``               ``sum_c w * A``, ``w = sum_hw relu(g) * a`` with
                            ``a = g^2 / (2 g^2 + sum_hw(A) g^3 + 1e-6)`` (``a = 0`` where
                            ``g = 0``)
``xgradcam``                ``sum_c w * A``, ``w = sum_hw g A / (sum_hw(A) + 1e-7)``
``hirescam``                ``sum_c g * A``
``gradcam-elementwise``     ``sum_c relu(g * A)``
``layercam``                ``sum_c relu(g) * A``
``eigencam``                projection of the centred (hw x C) activations on their first
                            right-singular vector
``eigengradcam``            the same projection of ``g * A``
``scorecam``                ``sum_c softmax_c(s_c) * A``, ``s_c`` the target score of the
                            input masked by the min-max scaled, upsampled channel ``c``
``ablationcam``             ``sum_c (s_0 - s_c) / s_0 * A``, ``s_c`` the target score with
                            channel ``c`` ablated
``kpcacam``                 projection of the centred (hw x C) activations on their first
                            kernel principal component (sigmoid kernel)
``fem``                     ``sum_c w * A``, ``w`` the share of positions where ``A`` exceeds
                            its mean by two standard deviations
``randomcam``               ``sum_c w * A``, ``w ~ U(-1, 1)`` (a baseline)
``sobelcam``                ``0.5 |S_x * gray| + 0.5 |S_y * gray|`` of the input image (a
                            baseline that ignores the model)
``dff``                     Deep Feature Factorization: the NMF map of the concept the head
                            scores highest for the target
``reciprocam``              ``s_p``, the target score of the head run on the activations
                            masked to position ``p`` (ReciproCAM, Byun & Lee 2022)
``finercam``                Grad-CAM of ``T = sum_j p_j (z_t - z_j) / sum_j p_j``, ``j`` the
                            three classes with logits nearest the target's
``fullgrad``                ``sum_c S(|x dz/dx|)_c + sum_l sum_c S(|b_l dz/da_l|)_c`` over
                            every Conv and BatchNorm bias ``b_l``, ``S`` per-channel min-max
                            scaling and resizing to the input (at the input's resolution)
``guidedbackprop``          ``max_c |G_c|``, ``G`` the input gradient through guided ReLUs
``guidedgradcam``           ``M * max_c |G_c|``, ``M`` the Grad-CAM map at the input size
``refinecam``               ``prod_l M_l``, ``M_l`` the post-processed Grad-CAM++ map of
                            layer ``l`` of ``layers=[...]`` (RefineCAM)
``shapleycam``              ``sum_c mean_hw(g - H A / 2) * A``, ``H A`` the Hessian of the
                            target score at the layer times the activations
==========================  =============================================================

Several target layers (:func:`explain_layers`, pytorch-grad-cam's list of
``target_layers``): for a method of :data:`LAYER_METHODS` the maps of every layer, from one
run, are each ReLU'd, min-max scaled and resized to the output size, then averaged and
min-max scaled. :func:`layer_cams` gives each layer's own map instead.

Options, as in pytorch-grad-cam: ``eigen_smooth`` replaces the channel sum of the weighted
activations by their first principal component (:data:`EIGEN_SMOOTH_METHODS`);
``aug_smooth`` averages the maps of flipped and scaled inputs (:data:`AUG_SMOOTH_METHODS`).

The sign of an SVD is arbitrary; EigenCAM and EigenGradCAM use the LAPACK routine that
pytorch-grad-cam's ``get_2d_projection`` uses (single precision, NumPy's ``svd``), so that on
the same arrays both choose the same sign. Because the post-processing applies a ReLU, the
sign matters for the final map. The same holds for ``eigen_smooth``: weights that differ from
pytorch-grad-cam's in the last bit can make LAPACK pick the other sign.

Every method is one small function registered in :data:`CAM_METHODS` (a
:class:`~sp2ps_onnx.registry.Registry`, like the graph's VJP rules and the metric's
components), with the formula in its docstring. The entry declares what the method needs
(:class:`CamMethod`): ``"gradient"`` methods get the activations and the gradients of the
target score, ``"activations"`` methods the activations alone, ``"perturbation"`` methods
re-run (part of) the model through the CAM model, ``"input"`` methods see the images alone;
``eigen_smooth=True`` and ``aug_smooth=False`` say which options apply, and ``backward=(...)``
which outputs of the backward pass beyond the layer it reads (its one run is then made with
the model built with them). :data:`METHODS`,
:data:`GRADIENT_METHODS`, :data:`EIGEN_METHODS`, :data:`PERTURBATION_METHODS`,
:data:`INPUT_METHODS` and the option lists are derived from the registry once its entries
below are registered; :func:`explain` looks names up in the registry itself. Adding a method
is one entry and one test: decorate a function with ``@CAM_METHODS.register("name",
needs=...)`` below the others, and compare it with an independent reference
(pytorch-grad-cam, or the method's definition written out) in tests/test_cam_methods.py.

:func:`postprocess` reproduces pytorch-grad-cam's ``BaseCAM`` post-processing: ReLU, per-image
min-max scaling ``(x - min) / (max(x - min) + 1e-7)``, bilinear resizing with half-pixel
centres (OpenCV's ``INTER_LINEAR``) and a second min-max scaling. A constant map becomes all
zeros.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import numpy as np
from scipy import linalg, ndimage, special

# UnknownMethodError lives in errors.py; importing it here keeps ``cam.UnknownMethodError``
# working for callers.
from .errors import InputDataError, RuntimeMissingError, UnknownMethodError, UnsupportedModelError
from .registry import Registry

__all__ = [
    "AUG_SMOOTH_METHODS",
    "CAM_METHODS",
    "EIGEN_METHODS",
    "EIGEN_SMOOTH_METHODS",
    "GRADIENT_METHODS",
    "INPUT_METHODS",
    "KPCA_KERNELS",
    "LAYER_METHODS",
    "METHODS",
    "PERTURBATION_METHODS",
    "CamMethod",
    "UnknownMethodError",
    "ablation_cam",
    "check_smoothing",
    "deep_feature_factorization",
    "eigen_cam",
    "explain",
    "explain_layers",
    "finer_weights",
    "gradient_weighted_cam",
    "guided_backprop",
    "kernel_pca_projection",
    "layer_cams",
    "postprocess",
    "recipro_cam",
    "score_cam",
    "sobel_cam",
]

# Constants of pytorch-grad-cam, kept so that maps agree with it.
_GRADCAM_PLUSPLUS_EPS = 1e-6
_XGRADCAM_EPS = 1e-7
_MINMAX_EPS = 1e-7
_SCORECAM_MASK_EPS = 1e-8
_ABLATION_OFFSET = np.float32(1e7)

ScoreFunction = Callable[[np.ndarray], np.ndarray]
Needs = Literal["gradient", "activations", "perturbation", "input"]
_NEEDS: tuple[str, ...] = ("gradient", "activations", "perturbation", "input")


@dataclass(frozen=True)
class CamMethod:
    """A registered CAM method: ``compute`` returns raw maps ``(N, h, w)`` at feature
    resolution, before :func:`postprocess`. What it is called with depends on ``needs``:

    * ``"gradient"``: ``compute(activations, gradients)``, both ``(N, C, h, w)`` of the same
      shape, in the dtype they were given;
    * ``"activations"``: ``compute(activations)``, ``(N, C, h, w)``;
    * ``"perturbation"``: ``compute(cam_model, x, result, targets, batch_size)``: the images
      in the model's layout, the model's run on them (a
      :class:`~sp2ps_onnx.runtime.CamResult`: activations, and a token layer's class tokens),
      one class per image and the number of perturbed inputs per model call;
    * ``"input"``: ``compute(x, input_layout)``, the images alone (a baseline that does not
      look at the model); its maps have the input's resolution.

    ``eigen_smooth``: the method takes ``eigen_smooth=True`` (pytorch-grad-cam's option:
    the first principal component of the weighted activations replaces their channel sum).
    ``aug_smooth``: :func:`explain` may average its maps over flipped and scaled inputs.
    ``backward``: :class:`~sp2ps_onnx.graph.BackwardOptions` flags whose outputs the method
    reads from the run (FullGrad's bias terms, Guided Backprop's input gradient,
    ShapleyCAM's Hessian-vector product): :func:`explain` then makes its one run with the
    model built with them (:meth:`~sp2ps_onnx.runtime.CamModel.with_backward`), and
    ``result`` holds them.
    """

    name: str
    compute: Callable[..., np.ndarray]
    needs: Needs
    eigen_smooth: bool = False
    aug_smooth: bool = True
    backward: tuple[str, ...] = ()

    @classmethod
    def of(
        cls,
        name: str,
        compute: Any,
        needs: Needs | None = None,
        eigen_smooth: bool = False,
        aug_smooth: bool = True,
        backward: tuple[str, ...] = (),
    ) -> CamMethod:
        """The registry entry for ``compute`` (a :class:`CamMethod` as it is)."""
        if isinstance(compute, CamMethod):
            return compute
        if needs not in _NEEDS:
            raise TypeError(
                f"CAM method {name!r}: needs must be 'gradient', 'activations', "
                f"'perturbation' or 'input', got {needs!r}"
            )
        if backward and needs != "perturbation":
            raise TypeError(
                f"CAM method {name!r}: backward outputs reach only 'perturbation' methods "
                f"(which get the run's result), not {needs!r} ones"
            )
        return cls(name, compute, needs, bool(eigen_smooth), bool(aug_smooth), tuple(backward))


#: Every CAM method: name -> :class:`CamMethod`, in the order of :data:`METHODS`.
CAM_METHODS: Registry[CamMethod] = Registry(
    "CAM method", entry=CamMethod.of, error=UnknownMethodError
)


def _methods_needing(needs: Needs) -> tuple[str, ...]:
    return tuple(name for name, entry in CAM_METHODS.items() if entry.needs == needs)


def _as_feature_maps(array: Any, name: str) -> np.ndarray:
    maps = np.asarray(array)
    if maps.ndim != 4:
        raise InputDataError(
            f"{name} must have shape (N, C, h, w), got shape {maps.shape}; pass the "
            f"channels-first feature maps of the target layer"
        )
    return maps


def _spatial_sum(array: np.ndarray) -> np.ndarray:
    return array.sum(axis=(2, 3), keepdims=True)


def _spatial_mean(array: np.ndarray) -> np.ndarray:
    # One matrix-vector product: several times faster than mean(axis=(2, 3)), whose short
    # inner reductions (h * w values each) do not vectorise.
    n, c, h, w = array.shape
    if array.strides[2] == 0 and array.strides[3] == 0:
        return array[:, :, 0, 0]  # a gradient broadcast over the map: its mean is its value
    return array.reshape(n, c, h * w) @ np.full(h * w, 1.0 / (h * w), dtype=array.dtype)


def _channel_weighted_sum(weights: np.ndarray, activations: np.ndarray) -> np.ndarray:
    # A batched (1 x C) @ (C x hw) product: one BLAS call per image instead of einsum's loop.
    n, c, h, w = activations.shape
    weights = weights.astype(activations.dtype)
    return (weights[:, None, :] @ activations.reshape(n, c, h * w)).reshape(n, h, w)


def _weighted_sum(weights: np.ndarray, activations: np.ndarray, eigen_smooth: bool) -> np.ndarray:
    """``sum_c weights * A``, or with ``eigen_smooth`` the first principal component of the
    weighted activations ``weights * A`` (pytorch-grad-cam's BaseCAM)."""
    if eigen_smooth:
        weights = weights.astype(activations.dtype)
        return _eigen_projection(weights[:, :, None, None] * activations)
    return _channel_weighted_sum(weights, activations)


def _channel_sum(weighted: np.ndarray, eigen_smooth: bool) -> np.ndarray:
    """``sum_c`` of element-wise weighted activations, or their first principal component."""
    return _eigen_projection(weighted) if eigen_smooth else weighted.sum(axis=1)


def _eigen_projection(feature_maps: np.ndarray) -> np.ndarray:
    # pytorch-grad-cam zeroes NaNs, centres each channel over the positions and runs NumPy's
    # single-precision SVD; the same routine here makes both pick the same singular-vector
    # sign. The reduced SVD returns the same first vector as the full one at a fraction of
    # the cost when C >> hw.
    maps = np.where(np.isnan(feature_maps), 0, feature_maps).astype(np.float32)
    n, c, h, w = maps.shape
    positions_by_channels = maps.reshape(n, c, h * w).transpose(0, 2, 1)
    centred = positions_by_channels - positions_by_channels.mean(axis=1, keepdims=True)
    _, _, right_vectors = np.linalg.svd(centred, full_matrices=False)
    projection = np.einsum("npc,nc->np", centred, right_vectors[:, 0, :])
    return projection.reshape(n, h, w).astype(np.float32)


def eigen_cam(activations: Any) -> np.ndarray:
    """EigenCAM raw maps ``(N, h, w)``: first principal component of the activations.

    Args:
        activations: target-layer feature maps, shape ``(N, C, h, w)``.

    Returns:
        The projection of every position's (channel-centred) activation vector on the first
        right-singular vector, float32. Its sign follows LAPACK, as in pytorch-grad-cam.
    """
    return _eigen_projection(_as_feature_maps(activations, "activations"))


def gradient_weighted_cam(
    method: str, activations: Any, gradients: Any, eigen_smooth: bool = False
) -> np.ndarray:
    """Raw maps ``(N, h, w)`` of a gradient-based method, at feature resolution.

    Args:
        method: one of :data:`GRADIENT_METHODS`.
        activations: target-layer feature maps ``A``, shape ``(N, C, h, w)``.
        gradients: ``d score[target] / d A``, same shape.
        eigen_smooth: the first principal component of the weighted activations instead
            of their channel sum, where the method allows it (:data:`EIGEN_SMOOTH_METHODS`).

    Returns:
        The un-normalised map (before ReLU and scaling), float32.
    """
    entry: CamMethod = CAM_METHODS.get(method)
    if entry.needs != "gradient":
        raise UnknownMethodError(
            f"CAM method {method!r} does not use gradients; gradient_weighted_cam takes one "
            f"of: {', '.join(GRADIENT_METHODS)}; compute {method!r} with explain()"
        )
    acts = _as_feature_maps(activations, "activations")
    grads = _as_feature_maps(gradients, "gradients")
    if acts.shape != grads.shape:
        raise InputDataError(
            f"activations {acts.shape} and gradients {grads.shape} must have the same shape"
        )
    return entry.compute(acts, grads, **_smoothing(entry, eigen_smooth)).astype(np.float32)


def _smoothing(entry: CamMethod, eigen_smooth: bool) -> dict[str, bool]:
    if not eigen_smooth:
        return {}
    if not entry.eigen_smooth:
        raise InputDataError(
            f"eigen_smooth does not apply to CAM method {entry.name!r} (pytorch-grad-cam "
            f"ignores it there); use it (CLI: --eigen-smooth) with one of: "
            f"{', '.join(EIGEN_SMOOTH_METHODS)}"
        )
    return {"eigen_smooth": True}


def check_smoothing(
    method: str, eigen_smooth: bool = False, aug_smooth: bool = False, raw: bool = False
) -> None:
    """Refuse options that do not apply to ``method``, before any model runs.

    ``eigen_smooth`` needs a method of :data:`EIGEN_SMOOTH_METHODS` and ``aug_smooth`` one of
    :data:`AUG_SMOOTH_METHODS` (where pytorch-grad-cam has them; the registry entry's
    ``eigen_smooth`` and ``aug_smooth`` flags); ``aug_smooth`` averages post-processed maps,
    so it cannot give ``raw`` ones. An unknown method is the registry's error.

    Raises:
        InputDataError: naming the option, the method and the methods it applies to.
    """
    entry: CamMethod = CAM_METHODS.get(method)
    _smoothing(entry, eigen_smooth)
    if aug_smooth and not entry.aug_smooth:
        raise InputDataError(
            f"aug_smooth does not apply to CAM method {method!r}; use it (CLI: --aug-smooth) "
            f"with one of: {', '.join(AUG_SMOOTH_METHODS)}"
        )
    if aug_smooth and raw:
        raise InputDataError(
            "aug_smooth averages post-processed maps; it cannot give raw maps (raw=True)"
        )


@lru_cache(maxsize=64)
def _interpolation_matrix(source: int, target: int, corners_aligned: bool) -> np.ndarray:
    """The (target x source) matrix of 1-D linear resampling, as scipy.ndimage.zoom does it.

    ``corners_aligned=False`` is half-pixel centres with edge replication (OpenCV's
    INTER_LINEAR, skimage's resize with order=1, mode="edge"); ``True`` maps the corner pixel
    centres onto each other (torch's UpsamplingBilinear2d). Each output sample mixes the two
    source samples around its source coordinate, so bilinear resizing is two small matrix
    products. The weights are those of ``ndimage.zoom(np.eye(source), ..., order=1,
    mode="nearest")`` (a test checks it), built without that identity, whose source x
    source size would not fit in memory for a tall feature map.
    """
    out = np.arange(target, dtype=np.float64)
    if corners_aligned:
        coords = out * ((source - 1) / (target - 1)) if target > 1 else np.zeros(1)
    else:
        coords = (out + 0.5) * (source / target) - 0.5
    coords = np.clip(coords, 0, source - 1)
    low = np.floor(coords).astype(np.int64)
    high = np.minimum(low + 1, source - 1)
    fraction = coords - low
    matrix = np.zeros((target, source))
    rows = np.arange(target)
    np.add.at(matrix, (rows, low), 1.0 - fraction)
    np.add.at(matrix, (rows, high), fraction)
    matrix.setflags(write=False)
    return matrix


def _resize_bilinear(maps: np.ndarray, size: tuple[int, int], corners_aligned: bool) -> np.ndarray:
    """Resize a stack ``(N, h, w)`` to ``(N, H, W)``, separably (bilinear is separable)."""
    height, width = (int(s) for s in size)
    rows = _interpolation_matrix(maps.shape[1], height, corners_aligned).astype(maps.dtype)
    columns = _interpolation_matrix(maps.shape[2], width, corners_aligned).astype(maps.dtype)
    return rows @ maps @ columns.T


def _upsample_align_corners(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return _resize_bilinear(maps, size, corners_aligned=True)


def _spatial_size(x: np.ndarray, input_layout: str) -> tuple[int, int]:
    if input_layout == "NCHW":
        return int(x.shape[2]), int(x.shape[3])
    if input_layout == "NHWC":
        return int(x.shape[1]), int(x.shape[2])
    raise InputDataError(f"input_layout must be 'NCHW' or 'NHWC', got {input_layout!r}")


def _as_targets(targets: Any, count: int) -> np.ndarray:
    indices = np.asarray(targets, dtype=np.int64).reshape(-1)
    if indices.shape[0] != count:
        raise InputDataError(f"got {indices.shape[0]} targets for {count} images; pass one each")
    return indices


def _target_scores(logits: Any, targets: np.ndarray) -> np.ndarray:
    scores = np.asarray(logits, dtype=np.float64)
    return scores[np.arange(targets.shape[0]), targets]


def score_cam(
    x: Any,
    activations: Any,
    targets: Any,
    forward_scores: ScoreFunction,
    *,
    input_layout: str = "NCHW",
    batch_size: int = 32,
    eigen_smooth: bool = False,
) -> np.ndarray:
    """Score-CAM raw maps ``(N, h, w)``.

    Each channel is upsampled to the input size (bilinear, corners aligned), min-max scaled
    to a mask in [0, 1], multiplied into its image, and the masked images are scored by
    ``forward_scores`` in batches of ``batch_size`` (a batch may mix images). The channel
    weights are the softmax over channels of the target logits.

    Args:
        x: input images in the model's layout (``input_layout``), shape ``(N, ...)``.
        activations: target-layer feature maps of ``x``, shape ``(N, C, h, w)``.
        targets: one class index per image.
        forward_scores: maps a batch in the model's layout to logits ``(B, K)``.
        input_layout: ``"NCHW"`` or ``"NHWC"``.
        batch_size: number of masked images per forward call.
        eigen_smooth: the first principal component of the weighted activations instead
            of their channel sum.
    """
    images = np.asarray(x, dtype=np.float32)
    acts = _as_feature_maps(activations, "activations").astype(np.float32)
    count, channels, height, width = acts.shape
    target_indices = _as_targets(targets, count)
    input_size = _spatial_size(images, input_layout)
    flat_maps = acts.reshape(count * channels, height, width)
    target_scores = np.empty(count * channels, dtype=np.float64)
    for start in range(0, count * channels, max(1, int(batch_size))):
        pairs = np.arange(start, min(start + batch_size, count * channels))
        image_of_pair = pairs // channels
        upsampled = _upsample_align_corners(flat_maps[pairs], input_size)
        low = upsampled.min(axis=(1, 2), keepdims=True)
        high = upsampled.max(axis=(1, 2), keepdims=True)
        masks = (upsampled - low) / (high - low + _SCORECAM_MASK_EPS)
        if input_layout == "NCHW":
            masked = images[image_of_pair] * masks[:, None, :, :]
        else:
            masked = images[image_of_pair] * masks[:, :, :, None]
        logits = forward_scores(masked.astype(np.float32))
        target_scores[pairs] = _target_scores(logits, target_indices[image_of_pair])
    weights = special.softmax(target_scores.reshape(count, channels), axis=1)
    return _weighted_sum(weights, acts, eigen_smooth).astype(np.float32)


def _ablation_values(acts: np.ndarray, extra: np.ndarray | None = None) -> np.ndarray:
    # pytorch-grad-cam's AblationLayer zeroes a channel when the layer's minimum is 0 (ReLU
    # outputs) and otherwise sets it to min - 1e7 (float32). Its loop recomputes the minimum
    # after each ablated row of a batch, so row i of a batch gets min - (i + 1) * 1e7; here
    # every channel gets min - 1e7, which equals its result with batch_size=1. For token
    # layers the minimum runs over all tokens, class tokens included (AblationLayerVit).
    minima = acts.reshape(acts.shape[0], -1).min(axis=1)
    if extra is not None and extra.size:
        minima = np.minimum(minima, extra.reshape(extra.shape[0], -1).min(axis=1))
    return np.where(minima == 0, np.float32(0), minima - _ABLATION_OFFSET).astype(np.float32)


def ablation_cam(
    activations: Any,
    targets: Any,
    head_scores: ScoreFunction,
    *,
    batch_size: int = 64,
    extra_tokens: Any = None,
    images: Any = None,
    eigen_smooth: bool = False,
) -> np.ndarray:
    """Ablation-CAM raw maps ``(N, h, w)``.

    For each channel ``c`` the activations are copied with channel ``c`` replaced by the
    ablation value (0 when the image's activation minimum is 0, else ``min - 1e7``), the head
    of the model is re-run on them, and the weight is the relative score drop
    ``(s_0 - s_c) / s_0``. Where ``s_0 == 0`` the drop itself is used (the limit up to a
    positive factor, which the min-max scaling removes).

    Args:
        activations: target-layer feature maps, shape ``(N, C, h, w)``.
        targets: one class index per image.
        head_scores: maps channels-first activations ``(B, C, h, w)`` to logits ``(B, K)``;
            called with ``extra_tokens=`` and ``images=`` (the rows' own) where given.
        batch_size: number of ablated copies per head call (a batch may mix images).
        extra_tokens: a token layer's tokens outside the grid (class tokens), ``(N, C, k)``:
            channel ``c`` is ablated in them too, and they count for the minimum.
        images: the model inputs, for a head that also reads tensors computed before the
            layer.
        eigen_smooth: the first principal component of the weighted activations instead
            of their channel sum.
    """
    acts = _as_feature_maps(activations, "activations").astype(np.float32)
    count, channels = acts.shape[:2]
    target_indices = _as_targets(targets, count)
    extra = None if extra_tokens is None else np.asarray(extra_tokens, dtype=np.float32)

    def scores_of(batch: np.ndarray, rows: np.ndarray, extra_batch: np.ndarray | None):
        inputs = {}
        if extra_batch is not None:
            inputs["extra_tokens"] = extra_batch
        if images is not None:
            inputs["images"] = np.asarray(images)[rows]
        return head_scores(batch, **inputs)

    every = np.arange(count)
    original = _target_scores(scores_of(acts, every, extra), target_indices)
    fill_values = _ablation_values(acts, extra)
    ablated_scores = np.empty(count * channels, dtype=np.float64)
    for start in range(0, count * channels, max(1, int(batch_size))):
        pairs = np.arange(start, min(start + batch_size, count * channels))
        image_of_pair = pairs // channels
        batch = acts[image_of_pair]  # fancy indexing copies
        rows = np.arange(pairs.shape[0])
        batch[rows, pairs % channels] = fill_values[image_of_pair, None, None]
        extra_batch = None
        if extra is not None:
            extra_batch = extra[image_of_pair]
            extra_batch[rows, pairs % channels] = fill_values[image_of_pair, None]
        logits = scores_of(batch, image_of_pair, extra_batch)
        ablated_scores[pairs] = _target_scores(logits, target_indices[image_of_pair])
    drops = original[:, None] - ablated_scores.reshape(count, channels)
    scale = np.where(original == 0, 1.0, original)[:, None]
    return _weighted_sum((drops / scale).astype(np.float32), acts, eigen_smooth).astype(np.float32)


# --------------------------------------------------------------------------- the methods
# One registered function per method, in the order of METHODS. Gradient methods run in
# single precision, like pytorch-grad-cam on torch's float32 tensors (and twice as fast).


def _single(activations: np.ndarray, gradients: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return activations.astype(np.float32, copy=False), gradients.astype(np.float32, copy=False)


@CAM_METHODS.register("gradcam", needs="gradient", eigen_smooth=True)
def _gradcam(activations: np.ndarray, gradients: np.ndarray, eigen_smooth: bool = False):
    """``sum_c mean_hw(g) * A``."""
    acts, grads = _single(activations, gradients)
    return _weighted_sum(_spatial_mean(grads), acts, eigen_smooth)


@CAM_METHODS.register("gradcam++", needs="gradient", eigen_smooth=True)
def _gradcam_plusplus(activations: np.ndarray, gradients: np.ndarray, eigen_smooth: bool = False):
    """``sum_c w * A``, ``w = sum_hw relu(g) * a``, ``a = g^2 / (2 g^2 + sum_hw(A) g^3 +
    1e-6)`` (``a = 0`` where ``g = 0``)."""
    acts, grads = _single(activations, gradients)
    grads_squared = grads * grads
    denominator = grads_squared * (2.0 + _spatial_sum(acts) * grads) + _GRADCAM_PLUSPLUS_EPS
    usable = (grads != 0) & (denominator != 0)
    alpha = np.divide(grads_squared, denominator, out=np.zeros_like(grads), where=usable)
    weights = (np.maximum(grads, 0) * alpha).sum(axis=(2, 3))
    return _weighted_sum(weights, acts, eigen_smooth)


@CAM_METHODS.register("xgradcam", needs="gradient", eigen_smooth=True)
def _xgradcam(activations: np.ndarray, gradients: np.ndarray, eigen_smooth: bool = False):
    """``sum_c w * A``, ``w = sum_hw g A / (sum_hw(A) + 1e-7)``."""
    acts, grads = _single(activations, gradients)
    denominator = _spatial_sum(acts) + _XGRADCAM_EPS
    share = np.divide(acts, denominator, out=np.zeros_like(acts), where=denominator != 0)
    return _weighted_sum((grads * share).sum(axis=(2, 3)), acts, eigen_smooth)


@CAM_METHODS.register("hirescam", needs="gradient", eigen_smooth=True)
def _hirescam(activations: np.ndarray, gradients: np.ndarray, eigen_smooth: bool = False):
    """``sum_c g * A``."""
    acts, grads = _single(activations, gradients)
    return _channel_sum(grads * acts, eigen_smooth)


@CAM_METHODS.register("gradcam-elementwise", needs="gradient", eigen_smooth=True)
def _gradcam_elementwise(
    activations: np.ndarray, gradients: np.ndarray, eigen_smooth: bool = False
) -> np.ndarray:
    """``sum_c relu(g * A)``."""
    acts, grads = _single(activations, gradients)
    return _channel_sum(np.maximum(grads * acts, 0), eigen_smooth)


@CAM_METHODS.register("layercam", needs="gradient", eigen_smooth=True)
def _layercam(activations: np.ndarray, gradients: np.ndarray, eigen_smooth: bool = False):
    """``sum_c relu(g) * A``."""
    acts, grads = _single(activations, gradients)
    return _channel_sum(np.maximum(grads, 0) * acts, eigen_smooth)


@CAM_METHODS.register("eigencam", needs="activations")
def _eigencam(activations: np.ndarray) -> np.ndarray:
    """Projection of the centred (hw x C) activations on their first right-singular
    vector."""
    return _eigen_projection(activations)


@CAM_METHODS.register("eigengradcam", needs="gradient")
def _eigengradcam(activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """The EigenCAM projection of ``g * A`` (in the inputs' precision, as pytorch-grad-cam
    multiplies them)."""
    return _eigen_projection(gradients * activations)


@CAM_METHODS.register("scorecam", needs="perturbation", eigen_smooth=True)
def _scorecam(
    cam_model: Any,
    x: np.ndarray,
    result: Any,
    targets: np.ndarray,
    batch_size: int,
    eigen_smooth: bool = False,
) -> np.ndarray:
    """``sum_c softmax_c(s_c) * A``, ``s_c`` the target score of the input masked by the
    min-max scaled, upsampled channel ``c`` (:func:`score_cam`)."""
    return score_cam(
        x, result.activations, targets, cam_model.scores, input_layout=cam_model.layout,
        batch_size=batch_size, eigen_smooth=eigen_smooth,
    )  # fmt: skip


@CAM_METHODS.register("ablationcam", needs="perturbation", eigen_smooth=True)
def _ablationcam(
    cam_model: Any,
    x: np.ndarray,
    result: Any,
    targets: np.ndarray,
    batch_size: int,
    eigen_smooth: bool = False,
) -> np.ndarray:
    """``sum_c (s_0 - s_c) / s_0 * A``, ``s_c`` the target score with channel ``c`` ablated
    (:func:`ablation_cam`); a token layer's class tokens are ablated with the patches, and a
    head that reads the block's input is re-run from the image."""
    return ablation_cam(
        result.activations, targets, cam_model.head_scores, batch_size=batch_size,
        eigen_smooth=eigen_smooth, **_head_extras(cam_model, x, result),
    )  # fmt: skip


def _head_extras(cam_model: Any, x: np.ndarray, result: Any) -> dict[str, Any]:
    """What the head reads besides the activations: a token layer's class tokens, the
    images."""
    needs = getattr(cam_model, "head_inputs", ())
    return {
        "extra_tokens": getattr(result, "extra_tokens", None) if "extra_tokens" in needs else None,
        "images": x if "images" in needs else None,
    }


# --- methods added after pytorch-grad-cam 1.5's base set (issue 20)

_FEM_SIGMAS = 2.0
_KPCA_COEF0 = 1.0
_KPCA_DEGREE = 3
_DFF_COMPONENTS = 5
_AUG_FACTORS = (0.9, 1.0, 1.1)
# OpenCV's COLOR_RGB2GRAY (ITU-R BT.601), which pytorch-grad-cam's sobel_cam uses.
_RGB_TO_GRAY = np.array([0.299, 0.587, 0.114], dtype=np.float32)
KPCA_KERNELS: tuple[str, ...] = ("sigmoid", "rbf", "poly", "linear", "cosine")


def _kernel_matrix(points: np.ndarray, kernel: str, gamma: float) -> np.ndarray:
    # scikit-learn's pairwise kernels with KernelPCA's defaults (coef0 = 1, degree = 3).
    gram = points @ points.T
    if kernel == "sigmoid":
        return np.tanh(gamma * gram + _KPCA_COEF0)
    if kernel == "poly":
        return (gamma * gram + _KPCA_COEF0) ** _KPCA_DEGREE
    if kernel == "rbf":
        squared = np.diag(gram)
        distances = np.maximum(squared[:, None] + squared[None, :] - 2 * gram, 0)
        return np.exp(-gamma * distances)
    if kernel == "cosine":
        norms = np.sqrt(np.diag(gram))
        norms[norms == 0] = 1
        return gram / norms[:, None] / norms[None, :]
    return gram  # linear


def kernel_pca_projection(
    activations: Any, kernel: str = "sigmoid", gamma: float | None = None
) -> np.ndarray:
    """KPCA-CAM raw maps ``(N, h, w)``: each position's score on the first kernel principal
    component of the (channel-centred) ``hw x C`` activations.

    The kernel matrix ``K`` of the positions is centred (``K - 1K/n - K1/n + 1K1/n^2``), its
    leading eigenvector ``v`` (eigenvalue ``l``) gives the scores ``v * sqrt(l)``, and the sign
    makes the largest ``|v|`` entry positive: scikit-learn's ``KernelPCA(n_components=1)``,
    which pytorch-grad-cam's KPCA_CAM calls, computed exactly (scikit-learn's ARPACK solver
    converges to the same vector).

    Args:
        activations: target-layer feature maps, shape ``(N, C, h, w)``.
        kernel: one of :data:`KPCA_KERNELS` (scikit-learn's defaults: ``coef0 = 1``,
            ``degree = 3``).
        gamma: kernel coefficient; ``None`` is ``1 / C``.
    """
    if kernel not in KPCA_KERNELS:
        raise InputDataError(
            f"unknown KPCA kernel {kernel!r}; choose one of: {', '.join(KPCA_KERNELS)}"
        )
    maps = _as_feature_maps(activations, "activations")
    maps = np.where(np.isnan(maps), 0, maps).astype(np.float64)
    count, channels, height, width = maps.shape
    coefficient = 1.0 / channels if gamma is None else float(gamma)
    projections = np.empty((count, height * width))
    for index, image in enumerate(maps):
        points = image.reshape(channels, -1).T
        points = points - points.mean(axis=0)
        matrix = _kernel_matrix(points, kernel, coefficient)
        matrix = matrix - matrix.mean(axis=0) - matrix.mean(axis=1)[:, None] + matrix.mean()
        size = matrix.shape[0]
        values, vectors = linalg.eigh(matrix, subset_by_index=(size - 1, size - 1))
        vector = vectors[:, 0]
        vector = vector * np.sign(vector[np.argmax(np.abs(vector))])
        projections[index] = vector * np.sqrt(max(float(values[0]), 0.0))
    return projections.reshape(count, height, width).astype(np.float32)


def deep_feature_factorization(
    activations: Any, n_components: int = _DFF_COMPONENTS
) -> tuple[np.ndarray, np.ndarray]:
    """Deep Feature Factorization (Collins et al. 2018) as pytorch-grad-cam's ``dff``.

    The ``C x (N h w)`` activations of the whole batch, each channel shifted by its minimum,
    are factorised by non-negative matrix factorisation ``A - min ~ W H`` (scikit-learn's
    ``NMF(init="random", random_state=0)``).

    Args:
        activations: target-layer feature maps, shape ``(N, C, h, w)``.
        n_components: the number of concepts ``k``.

    Returns:
        ``(concepts, explanations)``: the concept embeddings ``W + min``, shape ``(C, k)``,
        and each concept's map ``H`` per image, shape ``(N, k, h, w)``, float32.
    """
    try:
        from sklearn.decomposition import NMF
        from sklearn.exceptions import ConvergenceWarning
    except ImportError as error:
        raise RuntimeMissingError(
            "Deep Feature Factorization needs scikit-learn's NMF; install it with "
            "pip install 'sp2ps-onnx[methods]'"
        ) from error
    maps = _as_feature_maps(activations, "activations").astype(np.float32)
    count, channels, height, width = maps.shape
    by_channel = np.where(np.isnan(maps), 0, maps).transpose(1, 0, 2, 3).reshape(channels, -1)
    offset = by_channel.min(axis=1)
    factorisation = NMF(n_components=int(n_components), init="random", random_state=0)
    with warnings.catch_warnings():
        # pytorch-grad-cam's iteration budget (scikit-learn's default 200), whose maps these
        # are; on feature maps it often ends before the tolerance, which is no user error.
        warnings.simplefilter("ignore", ConvergenceWarning)
        embeddings = factorisation.fit_transform(by_channel - offset[:, None])
    concept_maps = factorisation.components_.reshape(-1, count, height, width)
    concepts = (embeddings + offset[:, None]).astype(np.float32)
    return concepts, concept_maps.transpose(1, 0, 2, 3).astype(np.float32)


def _gray(x: np.ndarray, input_layout: str) -> np.ndarray:
    images = np.asarray(x, dtype=np.float32)
    channels_last = images if input_layout == "NHWC" else images.transpose(0, 2, 3, 1)
    _spatial_size(images, input_layout)  # checks the layout name
    if channels_last.shape[-1] == 3:
        return channels_last @ _RGB_TO_GRAY
    if channels_last.shape[-1] == 1:
        return channels_last[..., 0]
    raise InputDataError(
        f"sobelcam reads RGB or grayscale images; this input has {channels_last.shape[-1]} "
        "channels; use another method"
    )


def sobel_cam(x: Any, input_layout: str = "NCHW") -> np.ndarray:
    """SobelCAM maps ``(N, H, W)``: ``0.5 |S_x * gray| + 0.5 |S_y * gray|`` of the input.

    ``gray = 0.299 R + 0.587 G + 0.114 B`` (channels in RGB order; a one-channel input as
    it is), ``S_x, S_y`` the 3x3 Sobel kernels with mirrored borders (OpenCV's default
    ``BORDER_REFLECT_101``). pytorch-grad-cam's ``sobel_cam`` takes a uint8 picture and
    rounds to uint8 (saturating at 255); this is the same map in floating point, of the
    model input as given. A baseline: it never looks at the model.
    """
    gray = _gray(x, input_layout)  # float32: the filters are exact on small integers
    derivative, smoothing = [-1.0, 0.0, 1.0], [1.0, 2.0, 1.0]
    along_x = ndimage.correlate1d(gray, derivative, axis=2, mode="mirror")
    along_x = ndimage.correlate1d(along_x, smoothing, axis=1, mode="mirror")
    along_y = ndimage.correlate1d(gray, derivative, axis=1, mode="mirror")
    along_y = ndimage.correlate1d(along_y, smoothing, axis=2, mode="mirror")
    return (0.5 * np.abs(along_x) + 0.5 * np.abs(along_y)).astype(np.float32)


def recipro_cam(
    activations: Any,
    targets: Any,
    head_scores: ScoreFunction,
    *,
    batch_size: int = 64,
    extra_tokens: Any = None,
    images: Any = None,
) -> np.ndarray:
    """ReciproCAM raw maps ``(N, h, w)`` (Byun & Lee 2022, as OpenVINO-XAI builds it).

    For every position ``p`` the head is run on the mosaic ``A * M_p``, ``M_p`` one at ``p``
    (in every channel) and zero elsewhere; the map at ``p`` is the target's score of that
    mosaic (``head_scores`` as given: a CamModel's logits by default, which is what
    OpenVINO-XAI takes, before any final Softmax), minus the map's minimum, so that :func:`postprocess` (whose ReLU then keeps everything) min-max scales
    it as OpenVINO-XAI does. A token layer's class tokens are kept as they are (its
    ``cls_token=True``); a head that reads the image gets the mosaic's own image.

    Args:
        activations: target-layer feature maps, shape ``(N, C, h, w)``.
        targets: one class index per image.
        head_scores: as for :func:`ablation_cam`.
        batch_size: number of mosaics per head call (a batch may mix images).
        extra_tokens: a token layer's class tokens, ``(N, C, k)``.
        images: the model inputs, for a head that also reads tensors computed before the
            layer.
    """
    acts = _as_feature_maps(activations, "activations").astype(np.float32)
    count, channels, height, width = acts.shape
    positions = height * width
    target_indices = _as_targets(targets, count)
    extra = None if extra_tokens is None else np.asarray(extra_tokens, dtype=np.float32)
    flat = acts.reshape(count, channels, positions)
    mosaic_scores = np.empty(count * positions, dtype=np.float64)
    for start in range(0, count * positions, max(1, int(batch_size))):
        pairs = np.arange(start, min(start + batch_size, count * positions))
        image_of_pair, position = pairs // positions, pairs % positions
        mosaics = np.zeros((pairs.shape[0], channels, positions), dtype=np.float32)
        rows = np.arange(pairs.shape[0])
        mosaics[rows, :, position] = flat[image_of_pair, :, position]
        inputs = {}
        if extra is not None:
            inputs["extra_tokens"] = extra[image_of_pair]
        if images is not None:
            inputs["images"] = np.asarray(images)[image_of_pair]
        logits = head_scores(mosaics.reshape(-1, channels, height, width), **inputs)
        mosaic_scores[pairs] = _target_scores(logits, target_indices[image_of_pair])
    maps = mosaic_scores.reshape(count, height, width)
    return (maps - maps.min(axis=(1, 2), keepdims=True)).astype(np.float32)


@CAM_METHODS.register("kpcacam", needs="activations")
def _kpcacam(activations: np.ndarray) -> np.ndarray:
    """Score of each position on the first kernel principal component of the centred
    (hw x C) activations, sigmoid kernel ``tanh(<a, b> / C + 1)``
    (:func:`kernel_pca_projection`)."""
    return kernel_pca_projection(activations)


@CAM_METHODS.register("fem", needs="activations")
def _fem(activations: np.ndarray) -> np.ndarray:
    """``sum_c w * A``, ``w = mean_hw[A > mean_hw(A) + 2 std_hw(A)]``: the share of positions
    where the channel exceeds its own mean by two standard deviations."""
    acts = activations.astype(np.float32, copy=False)
    means = acts.mean(axis=(2, 3), keepdims=True)
    thresholds = means + _FEM_SIGMAS * acts.std(axis=(2, 3), keepdims=True)
    weights = (acts > thresholds).mean(axis=(2, 3))
    return _channel_weighted_sum(weights, acts)


@CAM_METHODS.register("randomcam", needs="activations", eigen_smooth=True)
def _randomcam(activations: np.ndarray, eigen_smooth: bool = False) -> np.ndarray:
    """``sum_c w * A``, ``w ~ U(-1, 1)`` drawn per image and channel from NumPy's global
    generator (as pytorch-grad-cam draws them: ``np.random.seed`` repeats a map)."""
    acts = activations.astype(np.float32, copy=False)
    weights = np.random.uniform(-1, 1, size=acts.shape[:2])
    return _weighted_sum(weights, acts, eigen_smooth)


@CAM_METHODS.register("sobelcam", needs="input", aug_smooth=False)
def _sobelcam(x: np.ndarray, input_layout: str) -> np.ndarray:
    """``0.5 |S_x * gray| + 0.5 |S_y * gray|`` of the input image, ``S`` the 3x3 Sobel
    kernels (:func:`sobel_cam`)."""
    return sobel_cam(x, input_layout)


@CAM_METHODS.register("dff", needs="perturbation", aug_smooth=False)
def _dff(
    cam_model: Any, x: np.ndarray, result: Any, targets: np.ndarray, batch_size: int
) -> np.ndarray:
    """``H_k``, the NMF map (``A - min ~ W H``, 5 concepts, per image) of the concept ``k``
    whose embedding ``W_k + min``, spread over the map, the head scores highest for the
    target (:func:`deep_feature_factorization`)."""
    if any(getattr(cam_model, "head_inputs", ())):
        raise UnsupportedModelError(
            f"dff runs the head on concept embeddings alone; the head after layer "
            f"{cam_model.layer!r} also needs {', '.join(cam_model.head_inputs)}; use another "
            "method or a convolutional layer"
        )
    acts = _as_feature_maps(result.activations, "activations").astype(np.float32)
    count, channels, height, width = acts.shape
    maps = np.empty((count, height, width), dtype=np.float32)
    for index in range(count):
        concepts, explanations = deep_feature_factorization(acts[index : index + 1])
        spread = np.broadcast_to(
            concepts.T[:, :, None, None], (concepts.shape[1], channels, height, width)
        )
        scores = np.asarray(cam_model.head_scores(np.ascontiguousarray(spread)))
        maps[index] = explanations[0, int(np.argmax(scores[:, targets[index]]))]
    return maps


@CAM_METHODS.register("reciprocam", needs="perturbation")
def _reciprocam(
    cam_model: Any, x: np.ndarray, result: Any, targets: np.ndarray, batch_size: int
) -> np.ndarray:
    """``s_p - min_p s_p``, ``s_p`` the target score of the head run on the activations
    masked to the one position ``p`` (:func:`recipro_cam`)."""
    return recipro_cam(
        result.activations, targets, cam_model.head_scores, batch_size=batch_size,
        **_head_extras(cam_model, x, result),
    )  # fmt: skip


_FINER_EPS = 1e-9
_FINER_COMPARISONS = (1, 2, 3)
# Classes whose seed weight is below this share of the largest are left out of FinerCAM's
# runs: outside the compared classes the weight is p_k * eps-sized (see finer_weights).
_FINER_NEGLIGIBLE = 1e-6


def finer_weights(
    scores: Any,
    targets: Any,
    alpha: float = 1.0,
    comparisons: tuple[int, ...] = _FINER_COMPARISONS,
) -> tuple[np.ndarray, np.ndarray]:
    """FinerCAM's seed: the gradient ``dT/dz`` (N, K) of its target score (Zhang et al. 2025,
    pytorch-grad-cam's ``FinerWeightedTarget``).

    ``T = sum_j p_j (z_t - alpha z_j) / (sum_j p_j + 1e-9)``, ``p = softmax(z)``, ``j`` over
    the compared classes: those ranked ``comparisons`` (1, 2, 3: the three nearest) by
    ``|z_k - z_t|``, as pytorch-grad-cam ranks them. Its gradient is a weight vector over the
    classes; the one of ``T`` with respect to the activations is then
    ``sum_k (dT/dz_k) dz_k/dA``, the gradients of single classes combined linearly.

    Args:
        scores: the model's scores ``z`` (N, K).
        targets: the explained class ``t`` of each image.
        alpha: how strongly the compared classes are subtracted.
        comparisons: ranks of the compared classes (rank 0 is ``t``); ranks beyond ``K - 1``
            are dropped.

    Returns:
        ``(weights, compared)``: ``dT/dz`` (N, K) float64 and the compared classes (N, m).
    """
    logits = np.asarray(scores)
    count, classes = logits.shape
    rows = np.arange(count)
    target_indices = _as_targets(targets, count)
    ranks = [rank for rank in comparisons if rank < classes]
    # pytorch-grad-cam ranks the float32 outputs with NumPy's default argsort.
    distance = np.abs(logits - logits[rows, target_indices][:, None])
    compared = np.argsort(distance, axis=-1)[:, ranks]
    z = logits.astype(np.float64)
    probabilities = special.softmax(z, axis=1)
    in_compared = np.zeros((count, classes), dtype=bool)
    in_compared[rows[:, None], compared] = True
    differences = z[rows, target_indices][:, None] - alpha * z
    compared_p = np.where(in_compared, probabilities, 0.0)
    total_p = compared_p.sum(axis=1)
    numerator = (compared_p * differences).sum(axis=1)
    denominator = total_p + _FINER_EPS
    d_numerator = compared_p * (differences - alpha) - probabilities * numerator[:, None]
    d_numerator[rows, target_indices] += total_p
    d_denominator = compared_p - probabilities * total_p[:, None]
    weights = (
        d_numerator * denominator[:, None] - numerator[:, None] * d_denominator
    ) / denominator[:, None] ** 2
    return weights, compared


# pytorch-grad-cam's FinerCAM takes eigen_smooth (for its Grad-CAM) but has no aug_smooth.
@CAM_METHODS.register("finercam", needs="perturbation", eigen_smooth=True, aug_smooth=False)
def _finercam(
    cam_model: Any,
    x: np.ndarray,
    result: Any,
    targets: np.ndarray,
    batch_size: int,
    eigen_smooth: bool = False,
) -> np.ndarray:
    """Grad-CAM of FinerCAM's score ``T = sum_j p_j (z_t - z_j) / sum_j p_j`` over the three
    classes ``j`` with logits nearest the target's: its gradient ``sum_k (dT/dz_k) g_k``
    from one run per class that counts (the target's and the three; :func:`finer_weights`),
    or from one more run seeded with ``dT/dz`` where the model takes a weighted seed."""
    weights, _ = finer_weights(result.score, targets)
    acts = _as_feature_maps(result.activations, "activations").astype(np.float32)
    if getattr(getattr(cam_model, "graph", None), "target_weights", None) is not None:
        # A model built with BackwardOptions(weighted_seed=True) takes dT/dz as its seed:
        # one run gives the gradient of T itself.
        seeded = cam_model.run(x, target_weights=weights.astype(np.float32)).gradients
        return _weighted_sum(_spatial_mean(seeded.astype(np.float32)), acts, eigen_smooth)
    rows = np.arange(len(targets))
    magnitude = np.abs(weights)
    needed = magnitude > _FINER_NEGLIGIBLE * magnitude.max(axis=1, keepdims=True)
    needed[rows, targets] = False  # the run explain made is the target's
    order = np.argsort(np.where(needed, -magnitude, np.inf), axis=1)
    gradients = weights[rows, targets][:, None, None, None] * result.gradients
    for rank in range(int(needed.sum(axis=1).max(initial=0))):
        classes = order[:, rank]
        used = needed[rows, classes]
        classes = np.where(used, classes, targets)
        more = cam_model.run(x, classes).gradients
        gradients = gradients + np.where(used, weights[rows, classes], 0.0)[:, None, None, None] * more
    grads = gradients.astype(np.float32)
    return _weighted_sum(_spatial_mean(grads), acts, eigen_smooth)


# --- methods that need the backward pass beyond the layer (FullGrad, Guided Backprop)

#: FullGrad's bias terms: pytorch-grad-cam takes Conv2d and BatchNorm2d biases only (an
#: exporter folds an inference BatchNorm into the Conv before it, whose bias is then the
#: BatchNorm's effective one).
_FULLGRAD_BIAS_OPS = ("Conv", "BatchNormalization")


def _backward_sibling(cam_model: Any, **wanted: bool) -> Any:
    """``cam_model`` itself where its graph already has the outputs ``wanted`` names
    (:class:`~sp2ps_onnx.graph.BackwardOptions` flags), else the same model with those
    options added (:meth:`sp2ps_onnx.runtime.CamModel.with_backward`: same source, layer,
    score, grid and sessions; built once per set of options)."""
    graph = cam_model.graph
    present = {
        "input_gradient": getattr(graph, "input_gradient", None) is not None,
        "guided_input_gradient": getattr(graph, "guided_input_gradient", None) is not None,
        "bias_gradients": bool(getattr(graph, "bias_outputs", None)),
        "hessian_vector_product": getattr(graph, "hessian_vector", None) is not None,
    }
    if all(present.get(flag, False) for flag, on in wanted.items() if on):
        return cam_model
    with_backward = getattr(cam_model, "with_backward", None)
    if with_backward is None:
        raise UnsupportedModelError(
            f"{type(cam_model).__name__} cannot be rebuilt with more of the backward pass; "
            f"build the CamModel with backward=BackwardOptions({_flags(wanted)})"
        )
    return with_backward(**{flag: True for flag, on in wanted.items() if on})


def _model_for(entry: CamMethod, cam_model: Any) -> Any:
    """The model whose one run gives all that ``entry`` reads: ``cam_model`` itself, or
    its sibling with the method's :attr:`CamMethod.backward` outputs."""
    flags = {flag: True for flag in entry.backward if not _needless(flag, cam_model)}
    return _backward_sibling(cam_model, **flags) if flags else cam_model


def _needless(flag: str, cam_model: Any) -> bool:
    # A head that is piecewise linear in the layer has H = 0 almost everywhere, and torch's
    # double backward returns exactly 0 there: there is no product to build.
    return flag == "hessian_vector_product" and bool(getattr(cam_model, "hessian_vanishes", False))


def _flags(wanted: dict[str, bool]) -> str:
    return ", ".join(f"{flag}=True" for flag, on in wanted.items() if on)


def _channels_first(images: np.ndarray, input_layout: str) -> np.ndarray:
    return images.transpose(0, 3, 1, 2) if input_layout == "NHWC" else images


def _summed_scaled_channels(terms: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``sum_c resize(minmax_hw(terms[:, c]))`` (N, H, W): every channel min-max scaled on
    its own, as pytorch-grad-cam's ``scale_accross_batch_and_channels``; the bilinear resize
    is linear, so the sum is resized once."""
    count, channels, height, width = terms.shape
    scaled = _min_max(terms.reshape(count * channels, height, width).astype(np.float32))
    summed = scaled.reshape(count, channels, height, width).sum(axis=1)
    if (height, width) != tuple(size):
        summed = _resize_bilinear(summed, size, corners_aligned=False)
    return summed.astype(np.float32)


@CAM_METHODS.register(
    "fullgrad", needs="perturbation", backward=("bias_gradients", "input_gradient")
)
def _fullgrad(
    cam_model: Any, x: np.ndarray, result: Any, targets: np.ndarray, batch_size: int
) -> np.ndarray:
    """FullGrad (Srinivas & Fleuret 2019, as pytorch-grad-cam computes it), at the input's
    resolution: ``sum_c S(|x * dz/dx|)_c + sum_l sum_c S(|b_l * dz/da_l|)_c``, ``a_l`` the
    output of every Conv and inference BatchNormalization ``l`` with a bias ``b_l`` on the
    backward path and ``S`` a channel's min-max scaling followed by a bilinear resize to the
    input size. The layer is not used.

    The bias and input gradients come from one run of a CamModel built with
    ``BackwardOptions(bias_gradients=True, input_gradient=True)``: ``result`` when
    ``cam_model`` was (as :func:`explain` makes it), else a run of a sibling of it (same
    file, layer and score) built once and kept on it.
    """
    model = _backward_sibling(cam_model, bias_gradients=True, input_gradient=True)
    run = result if model is cam_model else model.run(x, targets)
    layout = cam_model.layout
    size = tuple(cam_model.input_spatial_size)
    inputs = _channels_first(np.asarray(x, dtype=np.float32), layout)
    input_gradient = _channels_first(np.asarray(run.input_gradient, dtype=np.float32), layout)
    maps = _summed_scaled_channels(np.abs(input_gradient * inputs), size)
    kinds = {entry.node: entry.op_type for entry in model.graph.bias_outputs}
    for node, terms in run.bias_gradients.items():
        terms = np.asarray(terms)
        if kinds.get(node) in _FULLGRAD_BIAS_OPS and terms.ndim == 4:
            maps += _summed_scaled_channels(np.abs(terms), size)
    return maps


def guided_backprop(cam_model: Any, x: Any, targets: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Guided Backprop (Springenberg et al. 2015, pytorch-grad-cam's
    ``GuidedBackpropReLUModel``): ``dz/dx`` with every ReLU passing only positive gradients
    where its input was positive.

    Args:
        cam_model: a :class:`~sp2ps_onnx.CamModel`; where it was not built with
            ``BackwardOptions(guided_input_gradient=True)`` a sibling that is is built once
            and kept on it.
        x: float32 images (N, ...) in the model's layout.
        targets: one class per image, or ``None`` for each image's top class.

    Returns:
        ``(gradients, targets)``: the guided input gradients (N, C, H, W) float32, channels
        first whatever the model's layout, and the classes used (int64).
    """
    images = np.asarray(x, dtype=np.float32)
    model = _backward_sibling(cam_model, guided_input_gradient=True)
    run = model.run(images, None if targets is None else _as_targets(targets, len(images)))
    gradients = _channels_first(np.asarray(run.guided_input_gradient, dtype=np.float32),
                                cam_model.layout)  # fmt: skip
    return gradients, np.asarray(run.targets, dtype=np.int64)


def _guided_saliency(
    cam_model: Any, x: np.ndarray, result: Any, targets: np.ndarray
) -> np.ndarray:
    guided = getattr(result, "guided_input_gradient", None)
    if guided is None:  # a run of a model without the guided pass: one of its sibling
        gradients, _ = guided_backprop(cam_model, x, targets)
    else:
        gradients = _channels_first(np.asarray(guided, dtype=np.float32), cam_model.layout)
    return np.abs(gradients).max(axis=1)


_GUIDED = ("guided_input_gradient",)


@CAM_METHODS.register("guidedbackprop", needs="perturbation", aug_smooth=False, backward=_GUIDED)
def _guidedbackprop(
    cam_model: Any, x: np.ndarray, result: Any, targets: np.ndarray, batch_size: int
) -> np.ndarray:
    """``max_c |G_c|``, ``G`` the Guided Backprop input gradient (:func:`guided_backprop`),
    at the input's resolution: the image pytorch-grad-cam's ``GuidedBackpropReLUModel``
    returns, as a one-channel saliency map (Simonyan et al.'s channel maximum)."""
    return _guided_saliency(cam_model, x, result, targets)


@CAM_METHODS.register("guidedgradcam", needs="perturbation", aug_smooth=False, backward=_GUIDED)
def _guidedgradcam(
    cam_model: Any, x: np.ndarray, result: Any, targets: np.ndarray, batch_size: int
) -> np.ndarray:
    """Guided Grad-CAM (Selvaraju et al. 2017, pytorch-grad-cam's recipe
    ``cam_mask * gb``): ``M * max_c |G_c|``, ``M`` the post-processed Grad-CAM map at the
    input size and ``G`` the Guided Backprop input gradient; since ``M >= 0`` this is
    ``max_c |M G_c|``, the channel maximum of pytorch-grad-cam's three-channel product."""
    raw = gradient_weighted_cam("gradcam", result.activations, result.gradients)
    mask = postprocess(raw, tuple(cam_model.input_spatial_size))
    return mask * _guided_saliency(cam_model, x, result, targets)


@CAM_METHODS.register(
    "shapleycam", needs="perturbation", eigen_smooth=True, backward=("hessian_vector_product",)
)
def _shapleycam(
    cam_model: Any,
    x: np.ndarray,
    result: Any,
    targets: np.ndarray,
    batch_size: int,
    eigen_smooth: bool = False,
) -> np.ndarray:
    """ShapleyCAM (Cai et al. 2025, as pytorch-grad-cam computes it): ``sum_c w * A``,
    ``w = mean_hw(g - (H A) / 2)``, ``H A`` the Hessian of the target score with respect to
    the layer times the activations (a second-order Taylor term of the score's Shapley
    values).

    ``H A`` comes from the same run of a CamModel built with
    ``BackwardOptions(hessian_vector_product=True)`` (``result`` as :func:`explain` makes
    it). Where the head is piecewise linear in the layer (``cam_model.hessian_vanishes``:
    pooling, linear layers, ReLUs) ``H A`` is 0, as torch returns it, and no product is
    built: ShapleyCAM is then Grad-CAM. Where a curved head's product cannot be built from
    the rules, building that model refuses, naming the op.
    """
    acts, grads = _single(result.activations, result.gradients)
    product = getattr(result, "hessian_vector", None)
    if product is None and not _needless("hessian_vector_product", cam_model):
        sibling = _backward_sibling(cam_model, hessian_vector_product=True)
        product = sibling.run(x, targets).hessian_vector
    weights = _spatial_mean(grads)
    if product is not None:
        weights = weights - np.float32(0.5) * _spatial_mean(np.asarray(product, np.float32))
    return _weighted_sum(weights, acts, eigen_smooth)


# --- several layers: pytorch-grad-cam's lists of target layers, and RefineCAM

#: RefineCAM's base method (pytorch-grad-cam's default ``base_method=GradCAMPlusPlus``).
_REFINE_BASE = "gradcam++"


# pytorch-grad-cam 1.5.7's RefineCAM has no aug_smooth, and its eigen_smooth reaches each base
# CAM's call as the third positional argument, which is aug_smooth there: its option does not
# do what it says, so neither option is offered here.
@CAM_METHODS.register("refinecam", needs="perturbation", aug_smooth=False)
def _refinecam(
    cam_model: Any, x: np.ndarray, result: Any, targets: np.ndarray, batch_size: int
) -> np.ndarray:
    """RefineCAM (pytorch-grad-cam 1.5.7's ``RefineCAM`` with its default base method):
    ``prod_l M_l``, ``M_l`` the post-processed Grad-CAM++ map of layer ``l`` at the input
    size (ReLU, min-max, resize, min-max), over the layers of ``layers=[...]`` from one
    run; :func:`postprocess` then min-max scales the product. Without ``layers`` the one
    layer's Grad-CAM++ map."""
    runs = getattr(result, "layers", None) or {"": result}
    size = tuple(cam_model.input_spatial_size)
    product: np.ndarray | None = None
    for run in runs.values():
        raw = gradient_weighted_cam(_REFINE_BASE, run.activations, run.gradients)
        mapped = postprocess(raw, size)
        product = mapped if product is None else product * mapped
    return product


def _layer_raw(entry: CamMethod, run: Any, eigen_smooth: bool) -> np.ndarray:
    """The raw map of a per-layer method from one layer's activations (and gradients)."""
    if entry.needs == "gradient":
        return gradient_weighted_cam(entry.name, run.activations, run.gradients, eigen_smooth)
    maps = _as_feature_maps(run.activations, "activations")
    return entry.compute(maps, **_smoothing(entry, eigen_smooth))


def _with_layers(cam_model: Any, layers: Any) -> Any:
    """``cam_model`` built to give ``layers`` (tensor or node names, or ``"stages"``) from
    one run (:meth:`~sp2ps_onnx.runtime.CamModel.with_backward`)."""
    wanted = (layers,) if isinstance(layers, str) else tuple(str(name) for name in layers)
    if wanted == ("stages",):
        wanted = "stages"
    if not wanted:
        raise InputDataError("layers is empty; name at least one layer, or give 'stages'")
    with_backward = getattr(cam_model, "with_backward", None)
    if with_backward is None:
        raise UnsupportedModelError(
            f"{type(cam_model).__name__} cannot give several layers; use a CamModel"
        )
    return with_backward(layers=wanted)


def _check_layer_method(entry: CamMethod) -> None:
    if entry.name not in LAYER_METHODS:
        raise InputDataError(
            f"CAM method {entry.name!r} cannot be computed at several layers from one run; "
            f"use one of: {', '.join(LAYER_METHODS)} (or refinecam), or give one layer"
        )


def layer_cams(
    cam_model: Any,
    x: Any,
    method: str = "gradcam",
    targets: Any = None,
    size: tuple[int, int] | None = None,
    layers: Any = "stages",
    batch_size: int = 32,
    eigen_smooth: bool = False,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each layer's own post-processed map, from one run per batch: at every layer, the map
    ``method`` gives with that layer as the model's only layer.

    Args:
        cam_model: a :class:`sp2ps_onnx.CamModel`.
        x: float32 images ``(N, ...)`` in the model's input layout.
        method: one of :data:`LAYER_METHODS`.
        targets: one class index per image, or ``None`` for each image's top class.
        size: output ``(H, W)``; ``None`` uses the model's input size.
        layers: tensor or node names, or ``"stages"`` (the last map of each resolution).
        batch_size: images per model run.
        eigen_smooth: as in :func:`explain`.

    Returns:
        ``(maps, targets)``: layer name -> maps ``(N, H, W)`` float32 in [0, 1], in the
        order of the model's layers, and the class used for each image.
    """
    entry: CamMethod = CAM_METHODS.get(method)
    _check_layer_method(entry)
    _smoothing(entry, eigen_smooth)
    model = _with_layers(cam_model, layers)
    images = np.asarray(x, dtype=np.float32)
    wanted = None if targets is None else _as_targets(
        np.broadcast_to(np.asarray(targets, dtype=np.int64), (len(images),)), len(images)
    )
    output_size = tuple(cam_model.input_spatial_size) if size is None else tuple(size)
    parts: dict[str, list[np.ndarray]] = {}
    used: list[np.ndarray] = []
    step = max(1, int(batch_size))
    for start in range(0, len(images), step):
        batch_targets = None if wanted is None else wanted[start : start + step]
        result = model.run(images[start : start + step], batch_targets)
        used.append(np.asarray(result.targets, dtype=np.int64))
        for name, run in result.layers.items():
            raw = _layer_raw(entry, run, eigen_smooth)
            parts.setdefault(name, []).append(postprocess(raw, output_size))
    maps = {name: np.concatenate(chunks) for name, chunks in parts.items()}
    return maps, np.concatenate(used)


def _aggregated_layers(
    entry: CamMethod, result: Any, size: tuple[int, int], eigen_smooth: bool
) -> np.ndarray:
    """pytorch-grad-cam's aggregation of several target layers: ``mean_l S(relu(M_l))``,
    ``S`` per-image min-max scaling then bilinear resizing to ``size``; the caller's
    :func:`postprocess` min-max scales the mean."""
    maps = [
        _scaled_resized(_layer_raw(entry, run, eigen_smooth), size)
        for run in result.layers.values()
    ]
    return np.mean(maps, axis=0, dtype=np.float32)


#: Every supported method name.
METHODS: tuple[str, ...] = CAM_METHODS.names()
#: Methods computed from the activations and the gradient of the target score.
GRADIENT_METHODS: tuple[str, ...] = _methods_needing("gradient")
#: Methods computed from the activations alone.
EIGEN_METHODS: tuple[str, ...] = _methods_needing("activations")
#: Methods that re-run (part of) the model once per channel or position.
PERTURBATION_METHODS: tuple[str, ...] = _methods_needing("perturbation")
#: Baselines computed from the input images alone.
INPUT_METHODS: tuple[str, ...] = _methods_needing("input")
#: Methods that take ``eigen_smooth`` (where pytorch-grad-cam's option has an effect).
EIGEN_SMOOTH_METHODS: tuple[str, ...] = tuple(
    name for name, entry in CAM_METHODS.items() if entry.eigen_smooth
)
#: Methods computed from one layer's activations (and gradients) alone: ``layers=[...]``
#: gives one map per layer from one run (:func:`layer_cams`) and :func:`explain` averages
#: them as pytorch-grad-cam does with a list of target layers.
LAYER_METHODS: tuple[str, ...] = GRADIENT_METHODS + EIGEN_METHODS
#: Methods whose maps :func:`explain` can average over flipped and scaled inputs.
AUG_SMOOTH_METHODS: tuple[str, ...] = tuple(
    name for name, entry in CAM_METHODS.items() if entry.aug_smooth
)


# --------------------------------------------------------------------------- post-processing


def _min_max(maps: np.ndarray) -> np.ndarray:
    shifted = maps - maps.min(axis=(1, 2), keepdims=True)
    return shifted / (shifted.max(axis=(1, 2), keepdims=True) + _MINMAX_EPS)


def postprocess(raw: Any, size: tuple[int, int] | None) -> np.ndarray:
    """pytorch-grad-cam's post-processing of raw maps ``(N, h, w)`` into ``(N, H, W)``.

    ReLU, per-image min-max scaling, bilinear resizing to ``size = (H, W)`` with half-pixel
    centres and edge replication (OpenCV ``INTER_LINEAR`` semantics, no anti-aliasing), then
    min-max scaling again. ``size=None`` keeps the feature resolution.

    Returns:
        float32 maps in [0, 1]; a constant map becomes all zeros.
    """
    return _min_max(_scaled_resized(raw, size)).astype(np.float32)


def _scaled_resized(raw: Any, size: tuple[int, int] | None) -> np.ndarray:
    """ReLU, per-image min-max scaling and bilinear resizing: :func:`postprocess` without
    its last min-max scaling (what pytorch-grad-cam averages over several layers)."""
    maps = np.asarray(raw, dtype=np.float32)
    if maps.ndim != 3:
        raise InputDataError(f"raw maps must have shape (N, h, w), got shape {maps.shape}")
    scaled = _min_max(np.maximum(maps, 0))
    if size is not None and tuple(int(s) for s in size) != scaled.shape[1:]:
        scaled = _resize_bilinear(scaled, size, corners_aligned=False)
    return scaled


# --------------------------------------------------------------------------- running a model


def _raw_maps(
    cam_model: Any,
    x: np.ndarray,
    method: str,
    targets: np.ndarray | None,
    batch_size: int,
    eigen_smooth: bool = False,
    aggregate_to: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    model = _model_for(CAM_METHODS.get(method), cam_model)
    result = model.run(x, targets)
    if aggregate_to is not None:  # several layers, averaged at this size
        maps = _aggregated_layers(CAM_METHODS.get(method), result, aggregate_to, eigen_smooth)
        return maps, np.asarray(result.targets, dtype=np.int64), np.asarray(result.score)
    maps, used = _maps_from_run(model, x, method, result, batch_size, eigen_smooth)
    return maps, used, np.asarray(result.score)


def _maps_from_run(
    cam_model: Any,
    x: np.ndarray,
    method: str,
    result: Any,
    batch_size: int,
    eigen_smooth: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    used_targets = np.asarray(result.targets, dtype=np.int64)
    entry: CamMethod = CAM_METHODS.get(method)
    smoothing = _smoothing(entry, eigen_smooth)
    if entry.needs == "gradient":
        maps = gradient_weighted_cam(method, result.activations, result.gradients, eigen_smooth)
    elif entry.needs == "activations":
        maps = entry.compute(_as_feature_maps(result.activations, "activations"), **smoothing)
    elif entry.needs == "input":
        maps = entry.compute(x, cam_model.layout)
    else:
        maps = entry.compute(cam_model, x, result, used_targets, batch_size, **smoothing)
    return maps, used_targets


def _augmentations() -> list[tuple[bool, float]]:
    # pytorch-grad-cam's default test-time augmentation (ttach): a horizontal flip or not,
    # times the pixel values scaled by 0.9, 1 or 1.1; the identity comes first here.
    pairs = [(flip, factor) for flip in (False, True) for factor in _AUG_FACTORS]
    return sorted(pairs, key=lambda pair: pair != (False, 1.0))


def _width_axis(input_layout: str) -> int:
    return 2 if input_layout == "NHWC" else 3


def explain(
    cam_model: Any,
    x: Any,
    method: str = "gradcam",
    targets: Any = None,
    size: tuple[int, int] | None = None,
    raw: bool = False,
    batch_size: int = 32,
    return_scores: bool = False,
    eigen_smooth: bool = False,
    aug_smooth: bool = False,
) -> tuple[np.ndarray, ...]:
    """CAMs of ``x`` for ``cam_model`` (a :class:`sp2ps_onnx.CamModel`).

    Args:
        cam_model: provides ``run``, ``scores``, ``head_scores``, ``layout`` and
            ``input_spatial_size``.
        x: float32 images ``(N, ...)`` in the model's input layout.
        method: one of :data:`METHODS`.
        targets: one class index per image, a single index for all, or ``None`` for the
            model's own top class.
        size: output ``(H, W)``; ``None`` uses the model's input size.
        raw: return the un-normalised maps at feature resolution instead (no ReLU, no
            scaling, no resizing).
        batch_size: images per model run; also the number of masked images or ablated
            activations per forward call for ``scorecam`` and ``ablationcam``.
        return_scores: also return the model's class scores ``(N, K)`` from the same run,
            which saves callers a second forward pass.
        eigen_smooth: pytorch-grad-cam's option: the first principal component of the
            weighted activations replaces their channel sum (:data:`EIGEN_SMOOTH_METHODS`).
        aug_smooth: pytorch-grad-cam's option: the mean of the post-processed maps of six
            inputs, ``x`` and its horizontal flip each with pixel values times 0.9, 1 and 1.1,
            every map flipped back (:data:`AUG_SMOOTH_METHODS`; not with ``raw``). The
            classes are those of ``x`` itself for all six (pytorch-grad-cam re-picks the top
            class of each augmented input when ``targets`` is None).

    Returns:
        ``(maps, targets)``: maps ``(N, H, W)`` float32 (in [0, 1] unless ``raw``) and the
        class index used for each image (int64); ``(maps, targets, scores)`` with
        ``return_scores``.
    """
    request = _Request(method, size, raw, int(batch_size), eigen_smooth, aug_smooth)
    return _explain(cam_model, x, targets, request, return_scores)


def explain_layers(
    cam_model: Any,
    x: Any,
    layers: Any,
    method: str = "gradcam",
    targets: Any = None,
    size: tuple[int, int] | None = None,
    batch_size: int = 32,
    return_scores: bool = False,
    eigen_smooth: bool = False,
    aug_smooth: bool = False,
) -> tuple[np.ndarray, ...]:
    """CAMs of ``x`` over several target layers, all from one run per batch (pytorch-grad-cam's
    list of ``target_layers``).

    For a method of :data:`LAYER_METHODS` each layer's map is ReLU'd, min-max scaled and
    resized to the output size; the maps are averaged and min-max scaled. ``refinecam``
    multiplies its Grad-CAM++ maps instead. :func:`layer_cams` gives each layer's own map.

    Args:
        layers: tensor or node names, or ``"stages"`` (the last map of each resolution).
        The others: as in :func:`explain`.
    """
    entry: CamMethod = CAM_METHODS.get(method)
    aggregated = entry.name != "refinecam"
    if aggregated:
        _check_layer_method(entry)
    model = _with_layers(cam_model, layers)
    output_size = tuple(cam_model.input_spatial_size) if size is None else tuple(size)
    request = _Request(method, size, False, int(batch_size), eigen_smooth, aug_smooth,
                       output_size if aggregated else None)
    return _explain(model, x, targets, request, return_scores)


@dataclass(frozen=True)
class _Request:
    """What :func:`explain` and :func:`explain_layers` were asked for."""

    method: str
    size: tuple[int, int] | None
    raw: bool
    batch_size: int
    eigen_smooth: bool
    aug_smooth: bool
    aggregate_to: tuple[int, int] | None = None  # several layers averaged at this size


def _explain(
    cam_model: Any, x: Any, targets: Any, request: _Request, return_scores: bool
) -> tuple[np.ndarray, ...]:
    method, raw, eigen_smooth = request.method, request.raw, request.eigen_smooth
    check_smoothing(method, eigen_smooth, request.aug_smooth, raw)  # before any model run
    images = np.asarray(x, dtype=np.float32)
    if images.ndim != 4 or images.shape[0] == 0:
        raise InputDataError(
            f"x must be a non-empty batch of images (N, ...) with 4 dimensions in the model's "
            f"layout, got shape {images.shape}"
        )
    count = images.shape[0]
    if targets is not None:
        target_array = np.asarray(targets, dtype=np.int64)
        if target_array.ndim == 0:
            target_array = np.full(count, int(target_array), dtype=np.int64)
        target_array = _as_targets(target_array, count)
    else:
        target_array = None
    size = request.size
    output_size = tuple(cam_model.input_spatial_size) if size is None else tuple(size)

    def maps_of(inputs: np.ndarray, wanted: np.ndarray | None):
        raw_maps, used, scores = _explain_batches(
            cam_model, inputs, method, wanted, request.batch_size, eigen_smooth,
            request.aggregate_to,
        )
        return (raw_maps if raw else postprocess(raw_maps, output_size)), used, scores

    maps, used_targets, scores = maps_of(images, target_array)
    if request.aug_smooth:
        total = maps.astype(np.float32)
        width_axis = _width_axis(cam_model.layout)
        for flip, factor in _augmentations()[1:]:
            augmented = images * np.float32(factor)
            if flip:
                augmented = np.ascontiguousarray(np.flip(augmented, axis=width_axis))
            augmented_maps = maps_of(augmented, used_targets)[0]
            total += augmented_maps[:, :, ::-1] if flip else augmented_maps
        maps = total / np.float32(len(_augmentations()))
    maps = maps.astype(np.float32)
    if return_scores:
        return maps, used_targets, scores
    return maps, used_targets


def _explain_batches(
    cam_model: Any,
    images: np.ndarray,
    method: str,
    targets: np.ndarray | None,
    batch_size: int,
    eigen_smooth: bool,
    aggregate_to: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw maps, the classes used and the scores of ``images``, ``batch_size`` per run
    (``aggregate_to``: several layers' maps averaged at that size)."""
    step = max(1, batch_size)
    map_batches: list[np.ndarray] = []
    target_batches: list[np.ndarray] = []
    score_batches: list[np.ndarray] = []
    for start in range(0, len(images), step):
        stop = min(start + step, len(images))
        batch_targets = None if targets is None else targets[start:stop]
        maps, used, scores = _raw_maps(
            cam_model, images[start:stop], method, batch_targets, step, eigen_smooth,
            aggregate_to,
        )
        map_batches.append(maps)
        target_batches.append(used)
        score_batches.append(scores)
    return (
        np.concatenate(map_batches, axis=0),
        np.concatenate(target_batches, axis=0),
        np.concatenate(score_batches, axis=0),
    )
