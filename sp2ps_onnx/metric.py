"""Sp2PS v1: spatial + spectral similarity of the CAMs of an original and a pruned model.

For test sample *i*, ``P_i`` is the CAM of the original model and ``Q_i`` the CAM of the
pruned model for the same target class, at input resolution, min-max normalised to [0, 1].

* spatial similarity ``s_i = clip(SSIM(P_i, Q_i), 0, 1)`` (Wang et al. 2004: Gaussian window
  sigma 1.5 truncated at 3.5 sigma, K1 0.01, K2 0.03, data range 1, population covariance,
  mean over the map with the filter radius cropped from every border, as scikit-image does);
* spectral similarity ``f_i = 1 - TV(p(P_i), p(Q_i))`` with ``p(C) = M(C) / sum M(C)`` and
  ``M(C) = |FFT2(C)|`` with the DC term set to 0 (f = 1 when both maps are constant, 0 when
  exactly one is);
* per sample ``h_i = 2 s_i f_i / (s_i + f_i)`` (0 when both are 0);
* Sp2PS is the mean of ``h_i`` over the samples.

Everything is vectorised over a batch ``(N, H, W)`` and computed in float64. The spatial and
spectral components and the aggregation are looked up by name in the registries
:data:`SPATIAL`, :data:`SPECTRAL` and :data:`AGGREGATIONS`
(:class:`~sp2ps_onnx.registry.Registry`, as for the graph's VJP rules and the CAM methods).
See docs/metric.md for the rationale and the known deviations from the paper.

Adding a component is one entry and one test: decorate a function ``fn(P, Q) -> (N,)``
similarities in [0, 1] with ``@SPATIAL.register("name")`` (or ``SPECTRAL``), and test it
against an independent reference in tests/test_metric.py. To let :func:`sp2ps_many` share
the original's work between pruned models and run chunks on threads, also give
``prepare=`` and ``pair=`` (see :class:`Component`); without them the function is called on
whole batches. An aggregation is ``@AGGREGATIONS.register("name")`` on
``fn(sums, counts)`` (see :data:`AGGREGATIONS`).

The streaming :class:`Sp2PSAccumulator` and the table-based :func:`summarize` share one
aggregation: both reduce their samples to :class:`Sp2PSTotals` (sums and counts) and finish
with :func:`summarize_totals`, as torchmetrics separates ``update`` from ``compute``.

Only NumPy and SciPy are used here (no ONNX Runtime), so the metric can be computed on CAMs
produced anywhere.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.fft
from scipy import ndimage
from scipy.spatial.distance import jensenshannon

# The exceptions live in errors.py; importing them here keeps ``metric.MetricInputError``
# and ``metric.UnknownComponentError`` working for callers.
from .errors import MetricInputError, UnknownComponentError
from .registry import Registry

__all__ = [
    "AGGREGATIONS",
    "SPATIAL",
    "SPECTRAL",
    "Component",
    "MetricInputError",
    "PerSample",
    "Sp2PSAccumulator",
    "Sp2PSResult",
    "SampleTable",
    "Sp2PSTotals",
    "output_divergence",
    "UnknownComponentError",
    "aggregate_class_weighted",
    "aggregate_mean",
    "bootstrap_ci",
    "harmonic",
    "normalize_maps",
    "pearson_similarity",
    "sp2ps",
    "sp2ps_many",
    "spectral_cosine",
    "spectral_tv",
    "ssim_batch",
    "ssim_similarity",
    "summarize",
    "summarize_totals",
    "topk_iou",
]


# Maps are processed in chunks of about this many pixels per side, so that the SSIM work
# stack of one chunk (four float64 maps per pair: 1.6 MB) stays in a core's L2 cache, and
# chunks can run on several threads (NumPy's matmul, ufuncs and scipy.fft release the
# GIL). Twice this size was 1.4x slower on 28 x 28 and 224 x 224 maps alike.
_CHUNK_PIXELS = 224 * 224
# Output columns per banded-matrix block of the Gaussian filter: small enough that the
# zero part of each block costs little, large enough for BLAS to run near full speed.
_FILTER_BLOCK = 12


def _default_workers() -> int:
    """Threads for one batch: $SP2PS_THREADS if set, else up to 4 bounded by the CPU count."""
    configured = os.environ.get("SP2PS_THREADS", "").strip()
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    return max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class PerSample:
    """Per-sample similarities, each an ``(N,)`` float64 array."""

    spatial: np.ndarray
    spectral: np.ndarray
    h: np.ndarray


# --------------------------------------------------------------------------- inputs


def _as_batch(maps: Any, name: str) -> np.ndarray:
    array = np.asarray(maps)
    if array.ndim == 2:
        array = array[np.newaxis]
    if array.ndim != 3:
        raise MetricInputError(
            f"{name} must be a CAM of shape (H, W) or a batch (N, H, W); got shape "
            f"{array.shape}; squeeze channel axes before calling the metric"
        )
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise MetricInputError(f"{name} must hold real numbers; got dtype {array.dtype}")
    array = array.astype(np.float64, copy=False)
    # One summation pass finds any NaN/inf (they survive the sum); only then look closer.
    if not np.isfinite(array.sum()) and not np.all(np.isfinite(array)):
        bad = int(np.flatnonzero(~np.isfinite(array).all(axis=(1, 2)))[0])
        raise MetricInputError(
            f"{name}[{bad}] contains NaN or infinite values; check the model outputs for "
            f"that sample before computing Sp2PS"
        )
    return array


def _pair(P: Any, Q: Any) -> tuple[np.ndarray, np.ndarray]:
    P = _as_batch(P, "P (original CAMs)")
    Q = _as_batch(Q, "Q (pruned CAMs)")
    if P.shape != Q.shape:
        raise MetricInputError(
            f"original and pruned CAMs differ in shape: {P.shape} vs {Q.shape}; compute both "
            f"at the same (input) resolution and for the same samples"
        )
    return P, Q


def _resolution(dtype: np.dtype) -> float:
    return float(np.finfo(dtype).eps) if np.issubdtype(dtype, np.floating) else 0.0


def _normalize(batch: np.ndarray, resolution: float) -> np.ndarray:
    low = batch.min(axis=(1, 2), keepdims=True)
    high = batch.max(axis=(1, 2), keepdims=True)
    if np.all(low == 0.0) and np.all(high == 1.0):
        return batch  # already normalised (the usual case)
    span = high - low
    magnitude = np.maximum(np.abs(low), np.abs(high))
    constant = span <= 8.0 * resolution * magnitude
    safe_span = np.where(constant, 1.0, span)
    out = np.where(constant, 0.0, (batch - low) / safe_span)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def normalize_maps(maps: Any) -> np.ndarray:
    """Min-max normalise every map of ``maps`` ((H, W) or (N, H, W)) to [0, 1], in float64.

    A constant map (all zero included) has no structure to compare and becomes all zeros.
    A map counts as constant when its range is at most a few units in the last place of its
    largest magnitude, so that rounding noise on a flat CAM is not blown up to [0, 1].
    The decision and the result do not change when a map is multiplied by a positive
    constant.
    """
    array = np.asarray(maps)
    out = _normalize(_as_batch(array, "maps"), _resolution(array.dtype))
    return out[0] if array.ndim == 2 else out


def _is_constant(batch: np.ndarray) -> np.ndarray:
    return np.ptp(batch, axis=(1, 2)) == 0


def _constant_rule(values: np.ndarray, const_p: np.ndarray, const_q: np.ndarray) -> np.ndarray:
    """Both maps constant -> 1 (same absence of structure); exactly one constant -> 0."""
    values = np.where(const_p & const_q, 1.0, values)
    return np.where(const_p ^ const_q, 0.0, values)


# --------------------------------------------------------------------------- registries


@dataclass(frozen=True)
class Component:
    """A registered spatial or spectral similarity.

    ``function(P, Q) -> (N,)`` gives the similarities, in [0, 1], of two CAM batches; it is
    the public entry point and what ``SPATIAL[name](P, Q)`` calls. A component may also be
    split into the work on the original's maps alone, ``prepare(x)``, done once however
    many pruned models are compared with it, and the work on each pair,
    ``pair(prepared, x, y)``; both take validated, normalised float64 batches of a few
    samples. :func:`sp2ps_many` runs split components chunk by chunk on threads; a
    component without a split is called on the whole batch.
    """

    name: str
    function: Callable[[Any, Any], np.ndarray]
    prepare: Callable[[np.ndarray], Any] | None = None
    pair: Callable[[Any, np.ndarray, np.ndarray], np.ndarray] | None = None

    def __post_init__(self) -> None:
        if (self.prepare is None) != (self.pair is None):
            raise TypeError(f"component {self.name!r}: give both prepare and pair, or neither")

    @classmethod
    def of(
        cls,
        name: str,
        obj: Any,
        prepare: Callable[[np.ndarray], Any] | None = None,
        pair: Callable[[Any, np.ndarray, np.ndarray], np.ndarray] | None = None,
    ) -> Component:
        """The registry entry for ``obj``: a :class:`Component` as it is, or a function
        ``fn(P, Q)`` with its optional split."""
        if isinstance(obj, Component):
            return obj
        return cls(name, obj, prepare, pair)

    def __call__(self, P: Any, Q: Any) -> np.ndarray:
        return self.function(P, Q)


def _pairwise(
    prepare: Callable[[np.ndarray], Any], pair: Callable[[Any, np.ndarray, np.ndarray], np.ndarray]
) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """A split component as one function of a chunk of pairs."""
    return lambda x, y: pair(prepare(x), x, y)


AggregationFn = Callable[[np.ndarray, np.ndarray], np.ndarray]

#: Spatial components: name -> :class:`Component`, ``SPATIAL[name](P, Q) -> (N,)``
#: similarity in [0, 1].
SPATIAL: Registry[Component] = Registry(
    "spatial component", entry=Component.of, error=UnknownComponentError
)

#: Spectral components: name -> :class:`Component`, ``SPECTRAL[name](P, Q) -> (N,)``
#: similarity in [0, 1].
SPECTRAL: Registry[Component] = Registry(
    "spectral component", entry=Component.of, error=UnknownComponentError
)

#: Aggregations: name -> ``fn(sums, counts)``: the per-class sums of h and sample counts,
#: classes on the last axis (also batched, (B, C), for the bootstrap) -> the aggregate.
#: Samples without a class form one extra column; aggregations other than "mean" need
#: every sample to have a class.
AGGREGATIONS: Registry[AggregationFn] = Registry("aggregation", error=UnknownComponentError)


# --------------------------------------------------------------------------- spatial


def _gaussian_weights(sigma: float, truncate: float) -> np.ndarray:
    """scipy.ndimage's own 1-D Gaussian kernel: its response to a unit impulse."""
    radius = int(truncate * sigma + 0.5)
    impulse = np.zeros(2 * radius + 1)
    impulse[radius] = 1.0
    return ndimage.gaussian_filter1d(impulse, sigma, mode="constant", truncate=truncate)


def _block_starts(length: int, block: int) -> list[int]:
    starts = list(range(0, length - block + 1, block))
    if starts[-1] != length - block:
        starts.append(length - block)  # the last block overlaps the previous one
    return starts


def _valid_gaussian(stack: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Separable Gaussian filter of every (H, W) map, keeping only the outputs whose window
    lies inside the map: (n, H, W) -> (n, H - 2r, W - 2r).

    Those are the only outputs that the SSIM mean uses (scikit-image crops the filter radius
    from every border), and they do not depend on the padding mode. Each pass multiplies
    slabs of the maps by one banded block of the filter matrix, so the work runs in BLAS.
    The blocks are small enough that every BLAS call stays single-threaded.
    """
    n, height, width = stack.shape
    taps = weights.size
    out_h, out_w = height - taps + 1, width - taps + 1
    block = min(_FILTER_BLOCK, out_h, out_w)
    band = np.zeros((block + taps - 1, block))
    for column in range(block):
        band[column : column + taps, column] = weights
    span = band.shape[0]
    rows = np.empty((n, height, out_w))
    for start in _block_starts(out_w, block):
        np.matmul(stack[:, :, start : start + span], band, out=rows[:, :, start : start + block])
    band_t = np.ascontiguousarray(band.T)
    both = np.empty((n, out_h, out_w))
    for start in _block_starts(out_h, block):
        np.matmul(band_t, rows[:, start : start + span, :], out=both[:, start : start + block, :])
    return both


def _ssim_chunk(x: np.ndarray, y: np.ndarray, weights: np.ndarray, c1: float, c2: float):
    return _ssim_against(_valid_gaussian(x, weights), x, y, weights, c1, c2)


def _ssim_against(
    mu_x: np.ndarray, x: np.ndarray, y: np.ndarray, weights: np.ndarray, c1: float, c2: float
) -> np.ndarray:
    """Mean SSIM of each pair, given the filtered originals ``mu_x`` (shared by all the
    pruned models compared with the same original)."""
    n = x.shape[0]
    # SSIM needs only the sum of the two variances, so x^2 + y^2 is filtered as one map.
    stack = np.empty((3 * n, *x.shape[1:]))
    stack[:n] = y
    np.multiply(x, x, out=stack[n : 2 * n])
    np.multiply(y, y, out=stack[2 * n :])
    stack[n : 2 * n] += stack[2 * n :]
    np.multiply(x, y, out=stack[2 * n :])
    filtered = _valid_gaussian(stack, weights)
    mu_y, second, cross = (filtered[i * n : (i + 1) * n] for i in range(3))

    mu_xy = mu_x * mu_y
    mu_sq = mu_x * mu_x  # a new array: mu_x is shared between calls
    np.multiply(mu_y, mu_y, out=mu_y)
    mu_sq += mu_y
    second -= mu_sq  # sigma_x^2 + sigma_y^2
    second += c2
    cross -= mu_xy  # sigma_xy
    cross *= 2.0
    cross += c2
    mu_xy *= 2.0
    mu_xy += c1
    mu_sq += c1
    mu_xy *= cross
    mu_sq *= second
    mu_xy /= mu_sq
    return mu_xy.mean(axis=(1, 2), dtype=np.float64)


def _map_chunks(
    function: Callable[[slice], np.ndarray], shape: tuple[int, ...], workers: int | None
) -> list[np.ndarray]:
    """``function`` over consecutive chunks of the samples of an (N, H, W) batch, on
    ``workers`` threads; the results in sample order."""
    n, h, w = shape
    step = max(1, _CHUNK_PIXELS // (h * w))
    chunks = [slice(i, min(i + step, n)) for i in range(0, n, step)]
    workers = _default_workers() if workers is None else max(1, int(workers))
    if workers == 1 or len(chunks) <= 1:
        return [function(rows) for rows in chunks]
    with ThreadPoolExecutor(max_workers=min(workers, len(chunks))) as pool:
        return list(pool.map(function, chunks))


def _chunked(
    function: Callable[[np.ndarray, np.ndarray], np.ndarray],
    P: np.ndarray,
    Q: np.ndarray,
    workers: int | None,
) -> np.ndarray:
    parts = _map_chunks(lambda rows: function(P[rows], Q[rows]), P.shape, workers)
    return np.concatenate(parts) if parts else np.zeros(0)


def ssim_batch(
    P: Any,
    Q: Any,
    *,
    sigma: float = 1.5,
    truncate: float = 3.5,
    K1: float = 0.01,
    K2: float = 0.03,
    data_range: float = 1.0,
    workers: int | None = None,
) -> np.ndarray:
    """Mean SSIM of each pair of maps, ``(N,)`` float64, in [-1, 1] (not clipped).

    Equals ``skimage.metrics.structural_similarity(p, q, data_range=data_range,
    gaussian_weights=True, sigma=sigma, use_sample_covariance=False)`` for every pair of
    float64 maps: Gaussian-weighted local statistics (scipy.ndimage's kernel, radius
    ``int(truncate * sigma + 0.5)``), population covariance, and the mean of the SSIM map
    with that radius cropped from every border (only those pixels are computed, so the
    padding mode plays no part). Inputs are converted to float64 (scikit-image
    computes float32 inputs in float32). ``workers`` threads share the chunks of the batch
    (default: ``$SP2PS_THREADS`` if set, else up to 4 bounded by the CPU count).
    """
    P, Q = _pair(P, Q)
    if sigma <= 0 or truncate <= 0:
        raise ValueError("sigma and truncate must be positive")
    if K1 < 0 or K2 < 0:
        raise ValueError("K1 and K2 must be non-negative")
    radius = int(truncate * sigma + 0.5)
    window = 2 * radius + 1
    if min(P.shape[1:]) < window:
        raise MetricInputError(
            f"CAMs of size {P.shape[1]}x{P.shape[2]} are smaller than the {window}x{window} "
            f"SSIM window; upsample the CAMs to the input resolution first"
        )
    c1 = (K1 * data_range) ** 2
    c2 = (K2 * data_range) ** 2
    weights = _gaussian_weights(sigma, truncate)

    def chunk(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return _ssim_chunk(x, y, weights, c1, c2)

    return _chunked(chunk, P, Q, workers)


_SSIM_WEIGHTS = _gaussian_weights(1.5, 3.5)
_SSIM_C1 = 0.01**2
_SSIM_C2 = 0.03**2


def _ssim_prepare(x: np.ndarray) -> np.ndarray:
    return _valid_gaussian(x, _SSIM_WEIGHTS)


def _ssim_pair(mu_x: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.clip(_ssim_against(mu_x, x, y, _SSIM_WEIGHTS, _SSIM_C1, _SSIM_C2), 0.0, 1.0)


@SPATIAL.register("ssim", prepare=_ssim_prepare, pair=_ssim_pair)
def ssim_similarity(P: Any, Q: Any) -> np.ndarray:
    """Spatial component "ssim": ``clip(SSIM, 0, 1)`` per pair."""
    return np.clip(ssim_batch(P, Q), 0.0, 1.0)


def _centred(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    flat = maps.reshape(maps.shape[0], maps.shape[1] * maps.shape[2])
    flat = flat - flat.mean(axis=1, keepdims=True)
    return flat, np.einsum("ij,ij->i", flat, flat), _is_constant(maps)


def _pearson_pair(prepared: tuple, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    flat_x, squares_x, const_x = prepared
    flat_y, squares_y, const_y = _centred(y)
    denom = np.sqrt(squares_x * squares_y)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.einsum("ij,ij->i", flat_x, flat_y) / denom
    corr = np.where(denom > 0, corr, 0.0)
    return np.clip(_constant_rule(corr, const_x, const_y), 0.0, 1.0)


@SPATIAL.register("pearson", prepare=_centred, pair=_pearson_pair)
def pearson_similarity(P: Any, Q: Any) -> np.ndarray:
    """Spatial component "pearson": Pearson correlation of the pixels, clipped to [0, 1].

    Constant maps have no correlation: 1 when both are constant, 0 when exactly one is.
    """
    P, Q = _pair(P, Q)
    return _pearson_pair(_centred(P), P, Q)


def _top_region(maps: np.ndarray, fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    flat = maps.reshape(maps.shape[0], maps.shape[1] * maps.shape[2])
    size = flat.shape[1]
    k = min(size, max(1, math.ceil(fraction * size)))
    kth = size - k
    return flat >= np.partition(flat, kth, axis=1)[:, kth : kth + 1], _is_constant(maps)


def _topk_pair(
    prepared: tuple, x: np.ndarray, y: np.ndarray, fraction: float = 0.1
) -> np.ndarray:
    mask_x, const_x = prepared
    mask_y, const_y = _top_region(y, fraction)
    inter = np.count_nonzero(mask_x & mask_y, axis=1)
    union = np.count_nonzero(mask_x | mask_y, axis=1)
    iou = inter / np.maximum(union, 1)
    return _constant_rule(iou.astype(np.float64), const_x, const_y)


@SPATIAL.register("iou", prepare=_top_region, pair=_topk_pair)
def topk_iou(P: Any, Q: Any, fraction: float = 0.1) -> np.ndarray:
    """Spatial component "iou": IoU of the top-``fraction`` regions of the two maps.

    Each map is binarised at the value of its ``ceil(fraction * H * W)``-th largest pixel
    (pixels tied with that value are included), as in the PE-score of the same authors.
    Constant maps have no top region: 1 when both are constant, 0 when exactly one is.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1]; got {fraction}")
    P, Q = _pair(P, Q)
    return _topk_pair(_top_region(P, fraction), P, Q, fraction)


# --------------------------------------------------------------------------- spectral


def _half_spectrum(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """|rfft2| of a batch with DC zeroed, and the weight of each half-plane column.

    The spectrum of a real map is conjugate-symmetric, so every column of the full FFT2
    except column 0 (and W/2 for even W) appears twice with the same magnitudes; weighting
    the half-plane columns reproduces sums over the full spectrum at half the cost.
    """
    width = maps.shape[2]
    magnitude = np.abs(scipy.fft.rfft2(maps, axes=(1, 2)))
    magnitude[:, 0, 0] = 0.0
    weight = np.full(magnitude.shape[2], 2.0)
    weight[0] = 1.0
    if width % 2 == 0:
        weight[-1] = 1.0
    return magnitude, weight


def _spectral_distribution(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each map's magnitude spectrum as a distribution (summing to 1 over the full plane),
    the half-plane weights, and which maps are constant."""
    magnitude, weight = _half_spectrum(maps)
    total = np.einsum("nij,j->n", magnitude, weight)
    magnitude *= (1.0 / np.where(total > 0, total, 1.0))[:, None, None]
    return magnitude, weight, _is_constant(maps)


def _tv_pair(prepared: tuple, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    dist_x, weight, const_x = prepared
    dist_y, _, const_y = _spectral_distribution(y)
    dist_y -= dist_x
    np.abs(dist_y, out=dist_y)
    similarity = 1.0 - 0.5 * np.einsum("nij,j->n", dist_y, weight)
    return _constant_rule(np.clip(similarity, 0.0, 1.0), const_x, const_y)


def _spectral_norms(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    magnitude, weight = _half_spectrum(maps)
    squares = np.einsum("nij,nij,j->n", magnitude, magnitude, weight)
    return magnitude, weight, squares, _is_constant(maps)


def _cosine_pair(prepared: tuple, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    mag_x, weight, squares_x, const_x = prepared
    mag_y, _, squares_y, const_y = _spectral_norms(y)
    dot = np.einsum("nij,nij,j->n", mag_x, mag_y, weight)
    norm = np.sqrt(squares_x * squares_y)
    cosine = dot / np.where(norm > 0, norm, 1.0)
    return _constant_rule(np.clip(cosine, 0.0, 1.0), const_x, const_y)


@SPECTRAL.register("tv", prepare=_spectral_distribution, pair=_tv_pair)
def spectral_tv(P: Any, Q: Any, *, workers: int | None = None) -> np.ndarray:
    """Spectral component "tv": one minus the total-variation distance of the spectra.

    ``f = 1 - 0.5 * sum_k |p_k(P) - p_k(Q)|`` with ``p = M / sum M`` and ``M = |FFT2|``
    with the DC term set to 0. Constant maps: 1 when both are, 0 when exactly one is.
    """
    return _chunked(_pairwise(_spectral_distribution, _tv_pair), *_pair(P, Q), workers)


@SPECTRAL.register("cosine", prepare=_spectral_norms, pair=_cosine_pair)
def spectral_cosine(P: Any, Q: Any, *, workers: int | None = None) -> np.ndarray:
    """Spectral component "cosine": cosine of the magnitude spectra with DC removed.

    Constant maps: 1 when both are, 0 when exactly one is.
    """
    return _chunked(_pairwise(_spectral_norms, _cosine_pair), *_pair(P, Q), workers)


# --------------------------------------------------------------------------- combination


def harmonic(s: Any, f: Any) -> np.ndarray:
    """Element-wise harmonic mean ``2 s f / (s + f)``, 0 where ``s + f == 0``."""
    s = np.asarray(s, dtype=np.float64)
    f = np.asarray(f, dtype=np.float64)
    total = s + f
    return np.where(total > 0, 2.0 * s * f / np.where(total > 0, total, 1.0), 0.0)


@AGGREGATIONS.register("mean")
def aggregate_mean(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Aggregation "mean": the plain mean of h over all samples (Sp2PS v1)."""
    return np.sum(sums, axis=-1) / np.sum(counts, axis=-1)


@AGGREGATIONS.register("class-weighted")
def aggregate_class_weighted(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Aggregation "class-weighted": every class present counts equally.

    Weighting each sample by the inverse frequency of its class gives the unweighted mean
    of the per-class means of h, so frequent classes do not dominate the score.
    """
    present = counts > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(present, sums / np.where(present, counts, 1), 0.0)
    return np.sum(means, axis=-1) / np.sum(present, axis=-1)


def sp2ps(
    P: Any,
    Q: Any,
    spatial: str = "ssim",
    spectral: str = "tv",
    *,
    normalize: bool = True,
    workers: int | None = None,
) -> PerSample:
    """Per-sample spatial, spectral and harmonic similarities of two CAM batches.

    ``P`` (original model) and ``Q`` (pruned model) are (N, H, W) or (H, W) CAMs for the
    same target classes. With ``normalize`` (default) each map is min-max normalised first
    (:func:`normalize_maps`); that is a no-op for maps already normalised to [0, 1].
    ``workers`` threads share the chunks of the built-in components (default:
    ``$SP2PS_THREADS`` if set, else up to 4 bounded by the CPU count).
    """
    return sp2ps_many(P, [Q], spatial, spectral, normalize=normalize, workers=workers)[0]


def sp2ps_many(
    P: Any,
    Qs: Sequence[Any],
    spatial: str = "ssim",
    spectral: str = "tv",
    *,
    normalize: bool = True,
    workers: int | None = None,
) -> list[PerSample]:
    """:func:`sp2ps` of one original's CAMs ``P`` against several pruned models' ``Qs``.

    Equals ``[sp2ps(P, Q, ...) for Q in Qs]``. With the built-in components the work on
    the original's maps alone (validation, normalisation, its Gaussian-filtered means, its
    spectrum) is done once per chunk of samples instead of once per pruned model.
    """
    spatial_component: Component = SPATIAL.get(spatial)
    spectral_component: Component = SPECTRAL.get(spectral)
    P = np.asarray(P)
    raw_qs = [np.asarray(Q) for Q in Qs]
    res_p = _resolution(P.dtype)
    res_qs = [_resolution(Q.dtype) for Q in raw_qs]
    P = _as_batch(P, "P (original CAMs)")
    batches = [_pair(P, Q)[1] for Q in raw_qs]
    if spatial_component.pair is None or spectral_component.pair is None:
        if normalize:
            P = _normalize(P, res_p)
        out = []
        for Q, res_q in zip(batches, res_qs, strict=True):
            Q = _normalize(Q, res_q) if normalize else Q
            s = np.asarray(spatial_component(P, Q), dtype=np.float64)
            f = np.asarray(spectral_component(P, Q), dtype=np.float64)
            out.append(PerSample(spatial=s, spectral=f, h=harmonic(s, f)))
        return out
    if spatial_component.function is ssim_similarity and min(P.shape[1:]) < _SSIM_WEIGHTS.size:
        ssim_batch(P[:0], P[:0])  # raises the same clear error as ssim_batch

    def chunk(rows: slice) -> np.ndarray:
        # Both components over one chunk of samples, read once while in cache.
        x = _normalize(P[rows], res_p) if normalize else P[rows]
        spatial_prepared = spatial_component.prepare(x)
        spectral_prepared = spectral_component.prepare(x)
        both = np.empty((len(batches), x.shape[0], 2))
        for j, (Q, res_q) in enumerate(zip(batches, res_qs, strict=True)):
            y = _normalize(Q[rows], res_q) if normalize else Q[rows]
            both[j, :, 0] = spatial_component.pair(spatial_prepared, x, y)
            both[j, :, 1] = spectral_component.pair(spectral_prepared, x, y)
        return both

    parts = _map_chunks(chunk, P.shape, workers)
    both = np.concatenate(parts, axis=1) if parts else np.zeros((len(batches), 0, 2))
    return [
        PerSample(spatial=b[:, 0].copy(), spectral=b[:, 1].copy(), h=harmonic(b[:, 0], b[:, 1]))
        for b in both
    ]


# --------------------------------------------------------------------------- aggregation


@dataclass
class Sp2PSResult:
    """Aggregated Sp2PS over a test set, with its spread and companion numbers.

    ``median_h``, ``p05_h`` and ``ci95`` need the per-sample table and are ``None`` when
    the accumulator was created with ``keep_per_sample=False`` (``ci95`` also when
    ``n_bootstrap == 0``). Class statistics are ``None``/empty when no sample had a class;
    companion numbers are ``None`` when the scores (and labels) they need were not given.

    The decision/attention split: ``same_answer_*`` over the samples both models give the
    same top-1 class, ``different_answer_*`` over the others (the mean h of each group, and
    its count; ``None`` for an empty group); ``same_answer_gap_share`` is the share of the
    gap ``1 - mean h`` that the same-answer samples make up: near 1, the attention moved
    while the decisions stayed; near 0, the gap is the changed decisions.
    ``mean_js_divergence`` is the mean Jensen-Shannon divergence (base 2, in [0, 1]) of the
    two models' softmax outputs.
    """

    sp2ps: float
    mean_spatial: float
    mean_spectral: float
    median_h: float | None
    p05_h: float | None
    attention_lost: float
    ci95: tuple[float, float] | None
    harmonic_of_means: float
    per_class_h: dict[int, float]
    class_weighted_h: float | None
    n: int
    top1_agreement: float | None = None
    accuracy_original: float | None = None
    accuracy_pruned: float | None = None
    mean_abs_confidence_change: float | None = None
    mean_js_divergence: float | None = None
    same_answer_n: int | None = None
    same_answer_sp2ps: float | None = None
    different_answer_n: int | None = None
    different_answer_sp2ps: float | None = None
    same_answer_gap_share: float | None = None
    per_sample: dict[str, np.ndarray] | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (plain floats, lists, string keys)."""

        def plain(value: Any) -> Any:
            if value is None or isinstance(value, (bool, str)):
                return value
            if isinstance(value, (int, np.integer)):
                return int(value)
            if isinstance(value, (float, np.floating)):
                return float(value)
            if isinstance(value, np.ndarray):
                return value.tolist()
            if isinstance(value, (tuple, list)):
                return [plain(item) for item in value]
            if isinstance(value, dict):
                return {str(key): plain(item) for key, item in value.items()}
            raise TypeError(f"cannot serialise {type(value).__name__}")

        return {
            name: plain(getattr(self, name)) for name in self.__dataclass_fields__
        }


@dataclass
class SampleTable:
    """A complete per-sample table of one pruned model: all ``(N,)`` arrays.

    ``classes`` groups the samples (the label, else the explained class; -1: none);
    ``pred_*`` are the top-1 classes of both models (-1: the model gave no finite scores,
    which never agrees and is never correct); ``confidence_*`` both models' softmax
    confidence in the explained class; ``js_divergence`` the Jensen-Shannon divergence of
    their softmax outputs (:func:`output_divergence`).
    """

    spatial: np.ndarray
    spectral: np.ndarray
    h: np.ndarray
    classes: np.ndarray
    labels: np.ndarray | None = None
    pred_original: np.ndarray | None = None
    pred_pruned: np.ndarray | None = None
    confidence_original: np.ndarray | None = None
    confidence_pruned: np.ndarray | None = None
    js_divergence: np.ndarray | None = None

    @classmethod
    def of_rows(
        cls,
        spatial: Any,
        spectral: Any,
        h: Any,
        *,
        labels: np.ndarray | None = None,
        targets: np.ndarray | None = None,
        **companions: np.ndarray | None,
    ) -> SampleTable:
        """A table from rows: samples are grouped by ``labels`` (else ``targets``; -1: no
        class); ``companions`` are the other fields."""
        h = np.asarray(h, dtype=np.float64)
        groups = labels if labels is not None else targets
        classes = (
            np.full(h.size, -1, dtype=np.int64) if groups is None
            else np.asarray(groups, dtype=np.int64)
        )
        return cls(np.asarray(spatial, dtype=np.float64), np.asarray(spectral, dtype=np.float64),
                   h, classes, labels, **companions)


def output_divergence(original_scores: Any, pruned_scores: Any) -> np.ndarray:
    """Per-sample Jensen-Shannon divergence, base 2 (0: the same output distribution, 1:
    disjoint ones), of the two models' softmax outputs; ``(N, K)`` logits in."""
    p = _softmax(np.asarray(original_scores, dtype=np.float64))
    q = _softmax(np.asarray(pruned_scores, dtype=np.float64))
    distance = jensenshannon(p, q, base=2.0, axis=1)
    return np.clip(np.nan_to_num(distance, nan=0.0) ** 2, 0.0, 1.0)


@dataclass
class Sp2PSTotals:
    """The streaming state of the metric: sums and counts over samples, no per-sample values.

    The totals of two disjoint sets of samples :meth:`merge` into the totals of their union,
    so the aggregate does not depend on how the samples were batched. Each ``n_*`` counts
    the samples that a companion number is defined on (0: not given, the number is
    ``None``).
    """

    n: int = 0
    sum_spatial: float = 0.0
    sum_spectral: float = 0.0
    #: Samples with ``h < 0.5``.
    lost: int = 0
    #: Sum of h and sample count per class; class -1 collects samples without a class.
    class_sums: dict[int, float] = field(default_factory=dict)
    class_counts: dict[int, int] = field(default_factory=dict)
    #: Samples where both models have the same top-1 class, out of ``n_compared``.
    agree: int = 0
    n_compared: int = 0
    correct_original: int = 0
    n_original: int = 0
    correct_pruned: int = 0
    n_pruned: int = 0
    #: Sum of |softmax confidence change| in the explained class, over ``n_confidence``.
    sum_confidence_change: float = 0.0
    n_confidence: int = 0
    #: Sum of h over the ``agree`` samples, and over all ``n_compared`` samples.
    sum_h_agree: float = 0.0
    sum_h_compared: float = 0.0
    #: Sum of the Jensen-Shannon divergence of both softmax outputs, over ``n_divergence``.
    sum_js_divergence: float = 0.0
    n_divergence: int = 0

    @classmethod
    def of_table(cls, table: SampleTable) -> Sp2PSTotals:
        """The totals of a per-sample table."""
        h, n = table.h, table.h.size
        keys, inverse = np.unique(table.classes, return_inverse=True)
        sums = np.bincount(inverse, weights=h, minlength=keys.size)
        counts = np.bincount(inverse, minlength=keys.size)
        totals = cls(
            n=n,
            sum_spatial=float(table.spatial.sum()),
            sum_spectral=float(table.spectral.sum()),
            lost=int(np.count_nonzero(h < 0.5)),
            class_sums=dict(zip(keys.tolist(), sums.tolist(), strict=True)),
            class_counts=dict(zip(keys.tolist(), counts.tolist(), strict=True)),
        )
        labels = table.labels
        labelled = labels is not None and bool(np.all(np.asarray(labels) >= 0))
        pred_o, pred_p = table.pred_original, table.pred_pruned
        if pred_o is not None and pred_p is not None:
            same = (pred_o == pred_p) & (pred_o >= 0)
            totals.agree = int(np.count_nonzero(same))
            totals.n_compared = n
            totals.sum_h_agree = float(h[same].sum())
            totals.sum_h_compared = float(h.sum())
        if labelled and pred_o is not None:
            totals.correct_original = int(np.count_nonzero(pred_o == labels))
            totals.n_original = n
        if labelled and pred_p is not None:
            totals.correct_pruned = int(np.count_nonzero(pred_p == labels))
            totals.n_pruned = n
        if table.confidence_original is not None and table.confidence_pruned is not None:
            change = np.abs(np.asarray(table.confidence_original)
                            - np.asarray(table.confidence_pruned))
            totals.sum_confidence_change = float(change.sum())
            totals.n_confidence = n
        if table.js_divergence is not None:
            totals.sum_js_divergence = float(np.sum(table.js_divergence))
            totals.n_divergence = n
        return totals

    def merge(self, other: Sp2PSTotals) -> None:
        """Add the totals of other samples to these."""
        for name in self.__dataclass_fields__:
            mine = getattr(self, name)
            if isinstance(mine, dict):
                theirs = getattr(other, name)
                for key, value in theirs.items():
                    mine[key] = mine.get(key, 0) + value
            else:
                setattr(self, name, mine + getattr(other, name))


def bootstrap_ci(
    h: np.ndarray,
    classes: np.ndarray,
    aggregate: Callable[[np.ndarray, np.ndarray], np.ndarray],
    n_bootstrap: int,
    seed: int,
) -> tuple[float, float]:
    """Percentile 95% CI of ``aggregate`` over ``n_bootstrap`` resamples (fixed ``seed``).

    ``aggregate(sums, counts)`` takes per-class sums of h and counts, one row per resample.
    """
    rng = np.random.default_rng(seed)
    n = h.size
    _, codes = np.unique(classes, return_inverse=True)
    n_codes = int(codes.max()) + 1
    # Resample in blocks so that the (rows, n) index array stays small for large N (about
    # 4 MB per work array: peak memory must not grow with N); each block's per-class sums
    # come from one bincount over row-offset class codes. Drawing in blocks gives the same
    # random stream as one draw, so the CI does not depend on the block size.
    rows_per_block = max(1, 500_000 // n)
    stats = np.empty(n_bootstrap)
    for start in range(0, n_bootstrap, rows_per_block):
        rows = min(n_bootstrap, start + rows_per_block) - start
        index = rng.integers(0, n, size=(rows, n))
        flat = (codes[index] + n_codes * np.arange(rows)[:, None]).ravel()
        sums = np.bincount(flat, weights=h[index].ravel(), minlength=rows * n_codes)
        counts = np.bincount(flat, minlength=rows * n_codes)
        stats[start : start + rows] = aggregate(
            sums.reshape(rows, n_codes), counts.reshape(rows, n_codes)
        )
    low, high = np.percentile(stats, [2.5, 97.5])
    return float(low), float(high)


def summarize_totals(
    totals: Sp2PSTotals,
    per_sample: dict[str, np.ndarray] | None = None,
    *,
    aggregation: str = "mean",
    n_bootstrap: int = 1000,
    seed: int = 0,
    config: dict[str, Any] | None = None,
) -> Sp2PSResult:
    """Every aggregate number from the totals of the samples (the ``compute`` step).

    ``per_sample``: the per-sample table (``"spatial"``, ``"spectral"``, ``"h"``,
    ``"class"``); the median, 5th percentile and bootstrap CI of h need it and are ``None``
    without it. ``config`` adds to (or overrides) the settings recorded in the result.
    """
    aggregate = AGGREGATIONS.get(aggregation)
    n = totals.n
    keys = sorted(totals.class_sums)
    sums = np.array([totals.class_sums[key] for key in keys], dtype=np.float64)
    counts = np.array([totals.class_counts[key] for key in keys], dtype=np.int64)
    known = np.array(keys) >= 0
    per_class = {
        key: totals.class_sums[key] / totals.class_counts[key] for key in keys if key >= 0
    }
    class_weighted = (
        float(aggregate_class_weighted(sums[known], counts[known])) if per_class else None
    )
    mean_s = totals.sum_spatial / n
    mean_f = totals.sum_spectral / n
    median_h = p05_h = ci95 = None
    if per_sample is not None:
        h = np.asarray(per_sample["h"], dtype=np.float64)
        median_h = float(np.median(h))
        p05_h = float(np.percentile(h, 5))
        if n_bootstrap > 0:
            ci95 = bootstrap_ci(h, per_sample["class"], aggregate, n_bootstrap, seed)

    def ratio(count: float, total: int) -> float | None:
        return count / total if total else None

    differ = totals.n_compared - totals.agree
    gap = totals.n_compared - totals.sum_h_compared  # n (1 - mean h) over compared samples

    return Sp2PSResult(
        sp2ps=float(aggregate(sums, counts)),
        mean_spatial=mean_s,
        mean_spectral=mean_f,
        median_h=median_h,
        p05_h=p05_h,
        attention_lost=totals.lost / n,
        ci95=ci95,
        harmonic_of_means=float(harmonic(mean_s, mean_f)),
        per_class_h=per_class,
        class_weighted_h=class_weighted,
        n=n,
        top1_agreement=ratio(totals.agree, totals.n_compared),
        accuracy_original=ratio(totals.correct_original, totals.n_original),
        accuracy_pruned=ratio(totals.correct_pruned, totals.n_pruned),
        mean_abs_confidence_change=ratio(totals.sum_confidence_change, totals.n_confidence),
        mean_js_divergence=ratio(totals.sum_js_divergence, totals.n_divergence),
        same_answer_n=totals.agree if totals.n_compared else None,
        same_answer_sp2ps=ratio(totals.sum_h_agree, totals.agree),
        different_answer_n=differ if totals.n_compared else None,
        different_answer_sp2ps=ratio(totals.sum_h_compared - totals.sum_h_agree, differ),
        same_answer_gap_share=(
            (totals.agree - totals.sum_h_agree) / gap if totals.n_compared and gap > 0 else None
        ),
        per_sample=per_sample,
        config={
            "aggregation": aggregation,
            "n_bootstrap": int(n_bootstrap),
            "seed": int(seed),
            "definition": "Sp2PS v1",
            **(config or {}),
        },
    )


def summarize(
    table: SampleTable,
    *,
    aggregation: str = "mean",
    n_bootstrap: int = 1000,
    seed: int = 0,
    config: dict[str, Any] | None = None,
) -> Sp2PSResult:
    """Every aggregate number from a complete per-sample table.

    The table is reduced to :class:`Sp2PSTotals` and finished by :func:`summarize_totals`,
    as :class:`Sp2PSAccumulator` does with its batches. The result is independent of how
    the samples were batched, so rows computed on several machines give the same numbers
    as rows computed on one.
    """
    AGGREGATIONS.get(aggregation)  # an unknown name fails before any work
    if table.h.size == 0:
        raise MetricInputError("no samples to aggregate")
    if np.all(table.classes < 0) and aggregation != "mean":
        raise MetricInputError(
            f"the {aggregation!r} aggregation needs the class of every sample; give labels or "
            "targets"
        )
    return summarize_totals(
        Sp2PSTotals.of_table(table),
        {"spatial": table.spatial, "spectral": table.spectral, "h": table.h,
         "class": table.classes},
        aggregation=aggregation,
        n_bootstrap=n_bootstrap,
        seed=seed,
        config=config,
    )


# --------------------------------------------------------------------------- accumulator


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=1, keepdims=True)
    return shifted


def _classes(values: Any, n: int, name: str) -> np.ndarray | None:
    if values is None:
        return None
    array = np.asarray(values)
    if array.shape != (n,) or not np.issubdtype(array.dtype, np.integer):
        raise MetricInputError(
            f"{name} must be {n} integer class indices (one per CAM); got shape "
            f"{array.shape} and dtype {array.dtype}"
        )
    if np.any(array < 0):
        raise MetricInputError(f"{name} must be non-negative class indices")
    return array.astype(np.int64)


def _scores(values: Any, n: int, name: str) -> np.ndarray | None:
    if values is None:
        return None
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] != n:
        raise MetricInputError(f"{name} must be logits of shape ({n}, K); got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise MetricInputError(f"{name} contains NaN or infinite values")
    return array


def _check_scores(
    scores_o: np.ndarray | None,
    scores_p: np.ndarray | None,
    labels: np.ndarray | None,
    targets: np.ndarray | None,
) -> None:
    """Both models' scores have the same classes, and every class index fits them."""
    if scores_o is not None and scores_p is not None and scores_o.shape != scores_p.shape:
        raise MetricInputError(
            f"original and pruned scores differ in shape: {scores_o.shape} vs "
            f"{scores_p.shape}; both models must have the same classes"
        )
    for scores, name in ((scores_o, "original_scores"), (scores_p, "pruned_scores")):
        for classes, what in ((labels, "labels"), (targets, "targets")):
            if scores is not None and classes is not None and np.any(classes >= scores.shape[1]):
                raise MetricInputError(
                    f"{what} contain class indices >= {scores.shape[1]}, the number of "
                    f"classes in {name}"
                )


class Sp2PSAccumulator:
    """Streaming Sp2PS over batches: memory does not grow with the number of samples,
    except for the optional per-sample table (float32 similarities and int32 classes).

    Call :meth:`update` per batch of CAMs and :meth:`result` at the end. :meth:`update`
    adds each batch's :class:`Sp2PSTotals` to the running totals; :meth:`result` finishes
    them with :func:`summarize_totals`, the aggregation :func:`summarize` (and so
    ``score_models``) uses. The result of several updates equals the result of one update
    over the concatenated batches.
    """

    def __init__(
        self,
        spatial: str = "ssim",
        spectral: str = "tv",
        aggregation: str = "mean",
        keep_per_sample: bool = True,
        n_bootstrap: int = 1000,
        seed: int = 0,
        normalize: bool = True,
    ) -> None:
        SPATIAL.get(spatial)
        SPECTRAL.get(spectral)
        AGGREGATIONS.get(aggregation)
        if n_bootstrap < 0:
            raise ValueError("n_bootstrap must be >= 0")
        self.spatial = spatial
        self.spectral = spectral
        self.aggregation = aggregation
        self.keep_per_sample = keep_per_sample
        self.n_bootstrap = int(n_bootstrap)
        self.seed = int(seed)
        self.normalize = normalize
        self._totals = Sp2PSTotals()
        self._table: dict[str, list[np.ndarray]] = {
            "spatial": [],
            "spectral": [],
            "h": [],
            "class": [],
        }

    def update(
        self,
        P: Any,
        Q: Any,
        labels: Any = None,
        *,
        targets: Any = None,
        original_scores: Any = None,
        pruned_scores: Any = None,
    ) -> PerSample:
        """Add a batch of CAM pairs and return its per-sample similarities.

        ``labels``: true classes (N,) or None. ``targets``: the classes the CAMs explain
        (N,); they group samples per class when ``labels`` is None and select the class
        whose softmax confidence change is reported (default: the original model's top-1).
        ``original_scores`` / ``pruned_scores``: (N, K) logits of the two models.
        """
        P, Q = _pair(P, Q)
        n = P.shape[0]
        labels_arr = _classes(labels, n, "labels")
        targets_arr = _classes(targets, n, "targets")
        scores_o = _scores(original_scores, n, "original_scores")
        scores_p = _scores(pruned_scores, n, "pruned_scores")
        _check_scores(scores_o, scores_p, labels_arr, targets_arr)
        groups = labels_arr if labels_arr is not None else targets_arr
        if groups is None and self.aggregation != "mean":
            raise MetricInputError(
                f"the {self.aggregation!r} aggregation needs the class of every sample; "
                f"pass labels= or targets= to update()"
            )

        per = sp2ps(P, Q, self.spatial, self.spectral, normalize=self.normalize)
        group_codes = (
            np.full(n, -1, dtype=np.int32) if groups is None else groups.astype(np.int32)
        )
        pred_o = None if scores_o is None else scores_o.argmax(axis=1)
        pred_p = None if scores_p is None else scores_p.argmax(axis=1)
        confidence_o = confidence_p = divergence = None
        if scores_o is not None and scores_p is not None:
            explained = targets_arr if targets_arr is not None else pred_o
            rows = np.arange(n)
            confidence_o = _softmax(scores_o)[rows, explained]
            confidence_p = _softmax(scores_p)[rows, explained]
            divergence = output_divergence(scores_o, scores_p)
        self._totals.merge(Sp2PSTotals.of_table(SampleTable(
            per.spatial, per.spectral, per.h, group_codes, labels=labels_arr,
            pred_original=pred_o, pred_pruned=pred_p, confidence_original=confidence_o,
            confidence_pruned=confidence_p, js_divergence=divergence,
        )))
        if self.keep_per_sample:
            self._table["spatial"].append(per.spatial.astype(np.float32))
            self._table["spectral"].append(per.spectral.astype(np.float32))
            self._table["h"].append(per.h.astype(np.float32))
            self._table["class"].append(group_codes)
        return per

    def result(self) -> Sp2PSResult:
        """Aggregate everything added so far (with :func:`summarize_totals`)."""
        if self._totals.n == 0:
            raise MetricInputError("no CAM pairs were added; call update() before result()")
        per_sample = None
        if self.keep_per_sample:
            per_sample = {key: np.concatenate(parts) for key, parts in self._table.items()}
        return summarize_totals(
            self._totals,
            per_sample,
            aggregation=self.aggregation,
            n_bootstrap=self.n_bootstrap,
            seed=self.seed,
            config={
                "spatial": self.spatial,
                "spectral": self.spectral,
                "normalize": self.normalize,
            },
        )
