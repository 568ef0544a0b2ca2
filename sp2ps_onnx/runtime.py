"""ONNX Runtime sessions over a rewritten model: the stable Python API."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ._ort import ort, select_providers
from .cam import explain, explain_layers
from .data import _display_from_input
from .errors import InputDataError, ModelLoadError, UnsupportedModelError
from .graph.model_io import save_model
from .graph.rewrite import (
    ACTIVATIONS,
    EXTRA_TOKENS,
    GRADIENTS,
    HEAD_ACTIVATIONS,
    HEAD_EXTRA_TOKENS,
    SCORE,
    TARGET,
    TARGETS_USED,
    WEIGHTED_TARGET,
    BackwardOptions,
    CamGraph,
    build_cam_model,
    build_head_model,
)

DEFAULT_BATCH = 32


@dataclass
class CamResult:
    """One run: class scores, the layer's activations and the class-score gradient."""

    score: np.ndarray  # (N, K) float32, pre-softmax unless score="probabilities"
    activations: np.ndarray  # (N, C, h, w) float32, channels-first
    gradients: np.ndarray  # (N, C, h, w) float32, d score[n, targets[n]] / d activations
    targets: np.ndarray  # (N,) int64
    # A token layer's tokens outside the grid (class tokens), (N, C, k); else None.
    extra_tokens: np.ndarray | None = None
    # What a model built with BackwardOptions(layers=[...], input_gradient, ...) adds (else
    # empty / None): per layer (tensor name, in the order given) its LayerResult ...
    layers: dict[str, LayerResult] = field(default_factory=dict)
    # ... d score / d input in the input's own layout and dtype float32 ...
    input_gradient: np.ndarray | None = None
    # ... Guided Backprop's input gradient (guided_input_gradient=True), same layout ...
    guided_input_gradient: np.ndarray | None = None
    # ... H · a at the main layer (hessian_vector_product=True), (N, C, h, w) ...
    hessian_vector: np.ndarray | None = None
    # ... and per Conv/Gemm with a bias (node name, graph order) bias * d score / d output.
    bias_gradients: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class LayerResult:
    """One layer's channels-first activations and gradients (N, C, h, w) float32."""

    activations: np.ndarray
    gradients: np.ndarray


class CamModel:
    """An ONNX classifier rewritten to explain itself.

    Args:
        model: path to an ``.onnx`` file or an ``onnx.ModelProto`` (never modified).
        layer: target tensor or node name; default: the last feature map with H, W > 1
            feeding the head's spatial collapse, after its activation.
        score: ``"logits"`` (cut before a final Softmax/LogSoftmax) or ``"probabilities"``.
        providers: ONNX Runtime providers; default: CUDA when available, else CPU.
        input_size: (H, W) for models whose spatial input dims are dynamic (default 224).
        batch_size: samples per ONNX Runtime call.
        allow_domains: custom-op domains to accept (refused by default, since their ops
            run code from outside ONNX Runtime).
        threads: ONNX Runtime intra-op threads of its sessions (default: $SP2PS_THREADS
            if set, else one per physical core). Sessions may be run from several threads
            at once.
        spinning: whether the sessions' idle threads spin (ONNX Runtime's default, the
            fastest for one model used alone). A caller that interleaves several sessions,
            as a scoring run does, turns it off (:func:`session_options`).
        grid: (H, W) of the patch grid of a token-sequence layer (N, T, C) whose grid the
            graph does not prove; the T - H*W leading tokens (class tokens) are dropped.
            A proven grid needs no statement; a contradicting one is refused.
        backward: more of the backward pass in the same run
            (:class:`~sp2ps_onnx.graph.rewrite.BackwardOptions`): several layers
            (``layers=[...]`` or ``"stages"``; :attr:`CamResult.layers`,
            :meth:`run_layers`), the input gradient, a weight vector over the classes as the
            seed (``target_weights`` in :meth:`run`), Guided Backprop's ReLU
            (``relu_backward="guided"``) and FullGrad's bias terms
            (:attr:`CamResult.bias_gradients`, :attr:`bias_layers`).
    """

    def __init__(
        self,
        model: str | os.PathLike | onnx.ModelProto,
        layer: str | None = None,
        score: str = "logits",
        providers: Sequence[str] | None = None,
        input_size: tuple[int, int] | None = None,
        batch_size: int = DEFAULT_BATCH,
        allow_domains: Sequence[str] = (),
        threads: int | None = None,
        spinning: bool = True,
        grid: tuple[int, int] | None = None,
        backward: BackwardOptions | None = None,
    ) -> None:
        self.threads = threads
        self.spinning = spinning
        # What :meth:`with_backward` rebuilds the model from (all but the backward options).
        self._source = model
        self._options = dict(layer=layer, score=score, providers=providers,
                             input_size=input_size, batch_size=batch_size,
                             allow_domains=tuple(allow_domains), threads=threads,
                             spinning=spinning, grid=grid)
        self._backward = backward or BackwardOptions()
        self._with_backward: list[tuple[BackwardOptions, CamModel]] = []
        self.graph: CamGraph = build_cam_model(
            model,
            layer=layer,
            score=score,
            input_size=input_size,
            allow_domains=allow_domains,
            grid=grid,
            backward=backward,
        )
        self.providers = list(providers) if providers else select_providers("auto", quiet=True)
        self.batch_size = max(1, int(batch_size))
        self._session = self._make_session(self.graph.model, self.graph.serialized)
        self.graph.serialized = None  # the session has its own copy
        self._rewritten: onnx.ModelProto | None = None
        self._forward_session = None
        self._head_session = None
        self._head_built = False

    def with_backward(self, **flags: Any) -> CamModel:
        """This model with more of the backward pass: the same source, layer, score, grid
        and session settings, with :class:`BackwardOptions` ``flags`` added to its own (built
        once per set of flags; ``self`` when it already has them)."""
        options = replace(self._backward, **flags)
        if options == self._backward:
            return self
        for built, model in self._with_backward:  # options may hold a list: compared by value
            if built == options:
                return model
        model = CamModel(self._source, **self._options, backward=options)
        self._with_backward.append((options, model))
        return model

    # -- facts -------------------------------------------------------------------------
    @property
    def rewritten(self) -> onnx.ModelProto:
        """The CAM-ready model: extra input ``target`` and outputs score/activations/gradients
        (of the activations' shape; the session may run a leaner equivalent graph)."""
        if self._rewritten is None:
            self._rewritten = self.graph.full_model()
        return self._rewritten

    @property
    def layer(self) -> str:
        return self.graph.layer

    @property
    def layers(self) -> list[str]:
        """The layers of ``BackwardOptions(layers=...)`` (tensor names, in the order given);
        empty without."""
        return [out.layer for out in self.graph.layers]

    @property
    def layer_grids(self) -> dict[str, tuple[int, int] | None]:
        """(h, w) of every layer of ``BackwardOptions(layers=...)``, as the graph's shapes
        prove it (``None`` where a dimension is not known before a run)."""
        grids: dict[str, tuple[int, int] | None] = {}
        for out in self.graph.layers:
            grid = getattr(out.layout, "grid", None)
            if grid is None:
                shape = self.graph.info.shapes.get(out.layer)
                axes = out.layout.spatial_axes
                grid = None if shape is None else (shape[axes[0]], shape[axes[1]])
            known = grid is not None and all(isinstance(v, int) and v > 0 for v in grid)
            grids[out.layer] = tuple(grid) if known else None
        return grids

    @property
    def bias_layers(self) -> list[tuple[str, np.ndarray | None]]:
        """(node name, bias values) of every Conv/Gemm/BatchNormalization whose term
        ``BackwardOptions(bias_gradients=True)`` computes, in graph order (a
        BatchNormalization's effective bias; None where computed at run time); the keys of
        :attr:`CamResult.bias_gradients`."""
        return [(entry.node, entry.bias) for entry in self.graph.bias_outputs]

    @property
    def hessian_vanishes(self) -> bool:
        """Whether the head (layer to score) is piecewise linear in the layer, so that its
        Hessian-vector product (ShapleyCAM's second-order term) is 0 almost everywhere,
        exactly as torch autograd computes it. Where it is not (:attr:`curved_head_ops`
        names the ops), no Hessian-vector product is built: refuse such methods."""
        return not self.graph.curved_head_ops

    @property
    def curved_head_ops(self) -> list[tuple[str, str]]:
        """(node, op type) of the head's ops with a second derivative (Softmax, Sigmoid,
        LayerNormalization, products of two layer-dependent tensors, ...)."""
        return list(self.graph.curved_head_ops)

    @property
    def layer_rule(self) -> str:
        """Why this layer: named by the user, or which default rule chose it."""
        return self.graph.layer_rule

    @property
    def input_name(self) -> str:
        return self.graph.input_name

    @property
    def input_shape(self) -> tuple[int | None, ...]:
        """The model input shape as run; the batch is ``None`` unless the model fixes it."""
        return (self.graph.info.fixed_batch, *self.graph.info.input_shape[1:])

    @property
    def layout(self) -> str:
        """``"NCHW"`` or ``"NHWC"``: the layout of the model's input."""
        return self.graph.layout

    @property
    def input_spatial_size(self) -> tuple[int, int]:
        shape = self.graph.info.input_shape
        return (shape[1], shape[2]) if self.layout == "NHWC" else (shape[2], shape[3])

    @property
    def channels(self) -> int:
        shape = self.graph.info.input_shape
        return shape[3] if self.layout == "NHWC" else shape[1]

    @property
    def num_classes(self) -> int:
        return self.graph.num_classes

    @property
    def path(self) -> str | None:
        return self.graph.path

    @property
    def head_ops(self) -> list[tuple[str, str, bool]]:
        return self.graph.head_ops()

    # -- running -----------------------------------------------------------------------
    def run(
        self,
        x: np.ndarray,
        targets: Sequence[int] | np.ndarray | None = None,
        target_weights: np.ndarray | None = None,
    ) -> CamResult:
        """Scores, activations and gradients for ``x`` (the model's own input layout).

        ``targets=None`` explains each sample's own top class. ``target_weights`` (N, K)
        (a model built with ``BackwardOptions(weighted_seed=True)``) differentiates ``sum_k w[n, k] *
        score[n, k]`` instead; ``targets`` must then be None, and ``CamResult.targets``
        holds each sample's top class.
        """
        x = self._check_input(x)
        wanted = self._check_targets(targets, len(x))
        names = self.graph.output_names
        feeds_extra = self._weight_feeds(target_weights, targets, len(x))
        if feeds_extra is not None:
            wanted = np.full(len(x), WEIGHTED_TARGET, dtype=np.int64)
        fetch = [names[SCORE], names[ACTIVATIONS], names[GRADIENTS], names[TARGETS_USED]]
        fetch += [names[EXTRA_TOKENS]] if EXTRA_TOKENS in names else []
        more = [n for out in self.graph.layers for n in (out.activations, out.gradients)]
        more += [self.graph.input_gradient] if self.graph.input_gradient else []
        more += [self.graph.guided_input_gradient] if self.graph.guided_input_gradient else []
        more += [self.graph.hessian_vector] if self.graph.hessian_vector else []
        more += [entry.output for entry in self.graph.bias_outputs]
        fetch += more
        feeds = {self.input_name: x, names[TARGET]: wanted}
        if self.graph.target_weights is not None:
            feeds[self.graph.target_weights] = feeds_extra if feeds_extra is not None else (
                np.zeros((len(x), self.num_classes), dtype=np.float32)
            )
        batched = {name: list(self._batches(value)) for name, value in feeds.items()}
        parts = [
            self._run(self._session, fetch, {name: chunks[i] for name, chunks in batched.items()})
            for i in range(len(batched[self.input_name]))
        ]
        # One batch (the usual case inside a scoring run) needs no copy.
        values = [
            (parts[0][i] if len(parts) == 1 else np.concatenate([p[i] for p in parts]))[: len(x)]
            for i in range(len(fetch))
        ]
        score, acts, grads, used = values[:4]
        extra = values[4] if EXTRA_TOKENS in names else None
        rest = iter(values[len(fetch) - len(more):])
        if self.graph.gradient_spread is not None:
            grads = _spread(grads, acts.shape, self.layer)
        layers = {out.layer: LayerResult(next(rest), next(rest)) for out in self.graph.layers}
        input_gradient = next(rest) if self.graph.input_gradient else None
        guided_input = next(rest) if self.graph.guided_input_gradient else None
        hessian = next(rest) if self.graph.hessian_vector else None
        bias = {entry.node: next(rest) for entry in self.graph.bias_outputs}
        return CamResult(
            score=score,
            activations=acts,
            gradients=grads,
            targets=used,
            extra_tokens=extra,
            layers=layers,
            input_gradient=input_gradient,
            guided_input_gradient=guided_input,
            hessian_vector=hessian,
            bias_gradients=bias,
        )

    def run_layers(
        self,
        x: np.ndarray,
        targets: Sequence[int] | np.ndarray | None = None,
        target_weights: np.ndarray | None = None,
    ) -> dict[str, LayerResult]:
        """Activations and gradients at every layer of ``layers=[...]`` (one run), by tensor
        name in the order given; :meth:`run` gives them too, with the rest."""
        if not self.graph.layers:
            raise InputDataError(
                "this CamModel was built for one layer; build it with "
                "backward=BackwardOptions(layers=[...]) (or layers='stages') to get several"
            )
        return self.run(x, targets, target_weights).layers

    def _weight_feeds(self, target_weights, targets, n: int) -> np.ndarray | None:
        if target_weights is None:
            return None
        if self.graph.target_weights is None:
            raise InputDataError(
                "target_weights needs a model built with "
                "CamModel(..., backward=BackwardOptions(weighted_seed=True))"
            )
        if targets is not None:
            raise InputDataError(
                "give either targets (one class per sample) or target_weights (a weight "
                "vector per sample), not both; put the class into its weight vector"
            )
        w = np.asarray(target_weights, dtype=np.float32)
        if w.ndim == 1 and w.shape[0] == self.num_classes:
            w = np.broadcast_to(w, (n, self.num_classes))
        if w.shape != (n, self.num_classes):
            raise InputDataError(
                f"target_weights has shape {w.shape}; give one weight vector over the "
                f"{self.num_classes} classes per sample, shape ({n}, {self.num_classes})"
            )
        if not np.isfinite(w).all():
            raise InputDataError("target_weights holds NaN or infinite values; give finite weights")
        return np.ascontiguousarray(w)

    def scores(self, x: np.ndarray) -> np.ndarray:
        """Class scores only (a forward pass without the backward nodes)."""
        x = self._check_input(x)
        if self._forward_session is None:
            self._forward_session = self._make_session(self.graph.forward_model)
        return np.concatenate(
            [
                self._run(self._forward_session, None, {self.input_name: xb})[0]
                for xb in self._batches(x)
            ]
        )[: len(x)]

    @property
    def head_inputs(self) -> tuple[str, ...]:
        """What :meth:`head_scores` needs besides the activations: ``"extra_tokens"`` for a
        token layer with class tokens, ``"images"`` when the head also reads tensors
        computed before the layer (a transformer block's residual stream)."""
        session = self._head()
        names = {i.name for i in session.get_inputs()}
        wanted = (("extra_tokens", HEAD_EXTRA_TOKENS), ("images", self.input_name))
        return tuple(key for key, name in wanted if name in names)

    def head_scores(
        self,
        activations: np.ndarray,
        extra_tokens: np.ndarray | None = None,
        images: np.ndarray | None = None,
    ) -> np.ndarray:
        """Class scores from channels-first layer activations, running only the head.

        ``extra_tokens`` (N, C, k) and ``images`` (the model's input) are needed where
        :attr:`head_inputs` names them.
        """
        session = self._head()
        acts = np.ascontiguousarray(activations, dtype=np.float32)
        feeds = {HEAD_ACTIVATIONS: acts}
        for key, name, value in (
            ("extra_tokens", HEAD_EXTRA_TOKENS, extra_tokens),
            ("images", self.input_name, images),
        ):
            if key not in self.head_inputs:
                continue
            if value is None or len(value) != len(acts):
                raise InputDataError(
                    f"the head after layer {self.layer!r} also needs {key} (one per row of "
                    f"activations); pass {key}=..."
                )
            feeds[name] = self._check_input(value) if key == "images" else np.ascontiguousarray(
                value, dtype=np.float32
            )
        batched = {name: list(self._batches(value)) for name, value in feeds.items()}
        return np.concatenate(
            [
                self._run(session, None, {name: chunks[i] for name, chunks in batched.items()})[0]
                for i in range(len(batched[HEAD_ACTIVATIONS]))
            ]
        )[: len(acts)]

    def _head(self):
        if not self._head_built:
            head = build_head_model(self.graph)
            self._head_session = self._make_session(head) if head is not None else None
            self._head_built = True
        if self._head_session is None:
            raise UnsupportedModelError(
                f"the head after quantized layer {self.layer!r} cannot re-quantize the "
                "activations (its scale is computed at run time); use another method or a "
                "later layer"
            )
        return self._head_session

    def cams(
        self,
        x: np.ndarray,
        method: str = "gradcam",
        targets: Sequence[int] | np.ndarray | None = None,
        size: tuple[int, int] | None = None,
        raw: bool = False,
        return_scores: bool = False,
        eigen_smooth: bool = False,
        aug_smooth: bool = False,
        layers: Sequence[str] | str | None = None,
    ) -> tuple[np.ndarray, ...]:
        """CAMs (N, H, W) in [0, 1] at the input size (or ``size``), and the targets used.

        ``raw=True`` gives the un-normalised maps at feature resolution. With
        ``return_scores=True`` the class scores (N, K) of the same run come third.
        ``eigen_smooth`` and ``aug_smooth`` are pytorch-grad-cam's options
        (:func:`sp2ps_onnx.cam.explain`), refused for the methods they do not apply to.
        ``layers`` (tensor or node names, or ``"stages"``): the maps of every layer, from
        one run, averaged as pytorch-grad-cam averages a list of target layers
        (``refinecam``: multiplied); see :func:`sp2ps_onnx.cam.explain_layers`.
        """
        if layers is not None:
            if raw:
                raise InputDataError(
                    "several layers are averaged after post-processing; raw=True cannot give "
                    "them (sp2ps_onnx.cam.layer_cams gives each layer's map)"
                )
            return explain_layers(self, x, layers, method=method, targets=targets, size=size,
                                  batch_size=self.batch_size, return_scores=return_scores,
                                  eigen_smooth=eigen_smooth, aug_smooth=aug_smooth)
        return explain(
            self,
            x,
            method=method,
            targets=targets,
            size=size,
            raw=raw,
            batch_size=self.batch_size,
            return_scores=return_scores,
            eigen_smooth=eigen_smooth,
            aug_smooth=aug_smooth,
        )

    def show(
        self,
        x: np.ndarray,
        method: str = "gradcam",
        target: int | None = None,
        cmap: str = "jet",
        image: np.ndarray | None = None,
        alpha: float = 0.5,
    ) -> Any:
        """A matplotlib figure of one sample: input, CAM and overlay (shown as is in Jupyter).

        ``x`` is one preprocessed model input, with or without the batch axis; ``target``
        is the class to explain (default: the top-1). ``image`` is the picture to draw
        (uint8 (H, W[, C])); by default ``x`` itself, min-max scaled.
        """
        from .figures import cam_figure  # needs matplotlib, an optional dependency

        x = np.asarray(x, dtype=np.float32)
        if x.ndim == len(self.input_shape) - 1:
            x = x[None]
        if x.ndim != len(self.input_shape) or len(x) != 1:
            raise InputDataError(
                f"show() draws one sample, got input of shape {x.shape}; pass x[i] or x[i:i+1]"
            )
        maps, targets = self.cams(x, method=method, targets=None if target is None else [target])
        if image is None:
            image = _display_from_input(x, self.layout)[0]
        title = f"{method}, class {int(targets[0])}"
        return cam_figure(image, maps[0], cmap=cmap, title=title, alpha=alpha)

    def save(self, path: str | os.PathLike) -> None:
        """Write the rewritten model (usable in any ONNX runtime) to ``path``.

        The file is written atomically (a temporary file, then a rename); the model this
        CamModel was built from is never overwritten.
        """
        if self.path and Path(path).resolve() == Path(self.path).resolve():
            raise ModelLoadError(
                f"{path} is the input model; saving never overwrites its input, choose "
                "another file name"
            )
        save_model(self.rewritten, path)

    # -- internals ---------------------------------------------------------------------
    def _make_session(self, model: onnx.ModelProto, serialized: bytes | None = None):
        rt = ort()
        opts = session_options(self.threads, self.spinning)
        try:
            session = rt.InferenceSession(
                serialized or model.SerializeToString(), opts, providers=self.providers
            )
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
            raise ModelLoadError(
                f"ONNX Runtime cannot load the rewritten model of {self.path or 'the model'} "
                f"({' '.join(str(exc).split())}); check that the original runs in this "
                "onnxruntime version, or choose another layer with layer=... (CLI: --layer)"
            ) from exc
        _report_provider_fallback(self.providers, session.get_providers())
        return session

    def _run(self, session, fetch: list[str] | None, feeds: dict[str, np.ndarray]) -> list:
        try:
            return session.run(fetch, feeds)
        except Exception as exc:  # ORT raises its own Fail/RuntimeException/... types
            raise ModelLoadError(
                f"ONNX Runtime failed while running {self.path or 'the model'} "
                f"({' '.join(str(exc).split())[:500]}); check that the model runs in this "
                "onnxruntime version at this input shape"
            ) from exc

    def _batches(self, array: np.ndarray):
        fixed = self.graph.info.fixed_batch
        step = fixed or self.batch_size
        for start in range(0, len(array), step):
            chunk = array[start : start + step]
            if fixed and len(chunk) < fixed:
                # A model fixed at batch B > 1 gets its last chunk padded by repeating the
                # final sample; callers trim the outputs back to len(array).
                pad = np.repeat(chunk[-1:], fixed - len(chunk), axis=0)
                chunk = np.concatenate([chunk, pad])
            yield chunk

    def _check_input(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        expected = self.graph.info.input_shape[1:]
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(expected):
            raise InputDataError(
                f"input of shape {tuple(x.shape)} does not fit model input {self.input_name!r} "
                f"of shape (N, {', '.join(map(str, expected))}) in {self.layout} layout; "
                "preprocess the images to the model's size and layout"
            )
        dtype = onnx.helper.tensor_dtype_to_np_dtype(
            next(i for i in self.graph.model.graph.input if i.name == self.input_name)
            .type.tensor_type.elem_type
        )
        if self.input_quantization is not None and np.issubdtype(x.dtype, np.floating):
            return quantize_input(x, *self.input_quantization, dtype)
        return np.ascontiguousarray(x, dtype=dtype)

    @property
    def input_quantization(self) -> tuple[float, int] | None:
        """(scale, zero point) of an integer model input (full-integer TFLite), else ``None``.

        Float images given to such a model are quantized with the model's own parameters:
        ``clip(round(x / scale) + zero_point)``, after the usual float preprocessing.
        """
        return self.graph.info.input_quantization

    def _check_targets(self, targets, n: int) -> np.ndarray:
        if targets is None:
            return np.full(n, -1, dtype=np.int64)
        t = np.asarray(targets, dtype=np.int64).reshape(-1)
        if t.size == 1 and n > 1:
            t = np.full(n, int(t[0]), dtype=np.int64)
        if t.shape != (n,):
            raise InputDataError(f"got {t.size} targets for {n} samples; give one class per sample")
        if (t >= self.num_classes).any() or (t < -1).any():
            raise InputDataError(
                f"target classes must lie in [0, {self.num_classes - 1}] for this model "
                f"(got {int(t.min())}..{int(t.max())})"
            )
        return t


def _spread(gradients: np.ndarray, shape: tuple[int, ...], layer: str) -> np.ndarray:
    """The session's unspread gradients as a read-only view of the activations' shape (what
    the Expand left out of the session's graph computes, without writing it out)."""
    if np.broadcast_shapes(gradients.shape, shape) != tuple(shape):
        raise ModelLoadError(
            f"internal error: the gradients of layer {layer!r} have shape {gradients.shape}, "
            f"which does not spread over the activations' shape {tuple(shape)}; please "
            "report this model"
        )
    return np.broadcast_to(gradients, shape)


def quantize_input(x: np.ndarray, scale: float, zero_point: int, dtype) -> np.ndarray:
    """Float model input -> the integer codes an int8/uint8 model input expects."""
    limits = np.iinfo(dtype)
    codes = np.rint(np.asarray(x, dtype=np.float64) / scale) + zero_point
    return np.ascontiguousarray(np.clip(codes, limits.min, limits.max).astype(dtype))


def ort_threads() -> int:
    """ONNX Runtime intra-op threads per session: $SP2PS_THREADS if set, else 0 (one per
    physical core, ONNX Runtime's own choice)."""
    configured = os.environ.get("SP2PS_THREADS", "").strip()
    return int(configured) if configured.isdigit() and int(configured) > 0 else 0


def logical_cores() -> int:
    """Logical CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def physical_cores() -> int:
    """Physical cores (ONNX Runtime's default intra-op thread count); the logical count
    where /proc/cpuinfo does not tell them apart."""
    try:
        with open("/proc/cpuinfo") as info:
            text = info.read()
    except OSError:
        return logical_cores()
    cores, physical = set(), "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            physical = value.strip()
        elif key == "core id":
            cores.add((physical, value.strip()))
    return min(len(cores), logical_cores()) if cores else logical_cores()


def thread_budget() -> int:
    """Cores one scoring run may use: $SP2PS_THREADS if set, else the physical cores."""
    configured = ort_threads()
    return configured if configured > 0 else physical_cores()


def session_options(threads: int | None = None, spinning: bool = True):
    """The options of every session this package runs.

    ``threads``: intra-op threads (default: :func:`ort_threads`). ``spinning=False`` stops
    idle threads from spinning: a scoring run alternates between several sessions (and
    the metric), and an idle session's threads that spin after each run take the cores
    from the next one; with spinning off several models interleaved run at the cost of
    each alone. A model used alone is fastest with ONNX Runtime's default (spinning on).
    """
    rt = ort()
    opts = rt.SessionOptions()
    # Fatal only: a failure reaches the user once, as our own error with ORT's message.
    opts.log_severity_level = 4
    opts.intra_op_num_threads = ort_threads() if threads is None else max(1, int(threads))
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return opts


_fallback_reported = False


def _report_provider_fallback(requested: list[str], active: list[str]) -> None:
    """onnxruntime-gpu lists CUDA even when its libraries cannot load, then silently runs on
    the CPU; say so once per process."""
    global _fallback_reported
    if _fallback_reported or "CUDAExecutionProvider" not in requested:
        return
    if "CUDAExecutionProvider" not in active:
        _fallback_reported = True
        print(
            "sp2ps: the CUDA execution provider could not be initialised (check the CUDA and "
            "cuDNN libraries onnxruntime-gpu needs); running on the CPU",
            file=sys.stderr,
        )
