"""Rewriting a classifier into a CAM model: score, activations and gradients as outputs."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..errors import LayerNotFoundError, ModelLoadError, UnsupportedModelError
from .analysis import GraphInfo, analyse, input_layout
from .autodiff import backward
from .builder import FLOAT, GraphBuilder
from .locate import (
    RULE_NAMED,
    Layout,
    MapLayout,
    TokenLayout,
    backward_nodes,
    choose_default_layer,
    find_score,
    head_ops,
    map_layout,
    requires_grad,
    resolve_layer,
)
from .locate import stage_layers as find_stage_layers
from .model_io import attribute, blame_invalid_model, load_model, naming_the_model
from .rules import is_piecewise_linear
from .second_order import hessian_vector_product

SCORE, ACTIVATIONS, GRADIENTS, TARGET, TARGETS_USED, EXTRA_TOKENS = (
    "score",
    "activations",
    "gradients",
    "target",
    "targets",
    "extra_tokens",
)
TARGET_WEIGHTS, INPUT_GRADIENT, GUIDED_INPUT_GRADIENT, HESSIAN_VECTOR = (
    "target_weights",
    "input_gradient",
    "guided_input_gradient",
    "hessian_vector",
)
#: The ``target`` value that makes a sample's seed its row of ``target_weights``.
WEIGHTED_TARGET = -2
RELU_BACKWARDS = ("standard", "guided")


@dataclass(frozen=True)
class LayerOutputs:
    """One of the layers of a several-layer model and its two outputs (channels first)."""

    layer: str  # the tensor in the original graph
    layout: MapLayout
    activations: str  # output names
    gradients: str


@dataclass(frozen=True)
class BiasOutput:
    """A Conv or Gemm with a bias, or an inference BatchNormalization, and the output
    holding ``bias * d score / d output`` (FullGrad's bias-gradient term, (N, C, H, W) or
    (N, K)); a BatchNormalization's bias is its effective one, ``B - mean * scale /
    sqrt(var + eps)``."""

    node: str  # node name (its output tensor where unnamed)
    op_type: str
    tensor: str  # the node's output
    bias: np.ndarray | None = field(repr=False)  # (C,) float32; None where computed at run time
    output: str = ""  # output name in the rewritten model


@dataclass
class CamGraph:
    """A rewritten model and what the rewrite found out about it."""

    model: onnx.ModelProto  # inputs: image, target (int64, N; <0 = argmax); outputs below
    forward_model: onnx.ModelProto  # the original graph with only the score as output
    info: GraphInfo
    layer: str
    layer_layout: MapLayout  # how the graph stores the layer: 4-D map or token sequence
    score_tensor: str
    softmax_cut: str | None
    head: list[int]
    num_classes: int
    path: str | None
    output_names: dict[str, str] = field(default_factory=dict)
    backward_nodes: int = 0
    serialized: bytes | None = field(default=None, repr=False)  # ``model``, checked once
    # The Expand that spreads a gradient constant over the map (a global pooling head):
    # left out of ``model``, whose gradients output is then the unspread (N, C, 1, 1)
    # tensor that the runtime broadcasts, and put back by :meth:`full_model`.
    gradient_spread: onnx.NodeProto | None = None
    layer_rule: str = RULE_NAMED  # why this layer (locate.RULE_*)
    # Several-layer models (``layers=[...]``): every layer's outputs, in the order given.
    layers: list[LayerOutputs] = field(default_factory=list)
    # ``input_gradient=True``: the output holding d score / d input, in the input's layout.
    input_gradient: str | None = None
    # ``guided_input_gradient=True``: the output holding Guided Backprop's input gradient.
    guided_input_gradient: str | None = None
    # ``hessian_vector_product=True``: the output holding H · a at the layer, channels first.
    hessian_vector: str | None = None
    bias_outputs: list[BiasOutput] = field(default_factory=list)
    relu_backward: str = "standard"  # or "guided" (Guided Backprop's ReLU)
    # ``weighted_seed=True``: the (N, K) float input whose rows seed samples whose target
    # is WEIGHTED_TARGET; else None.
    target_weights: str | None = None
    # Every node the backward pass runs through (``head`` and, beyond it, the backbone down
    # to the earliest layer or the input).
    backward_path: list[int] = field(default_factory=list)
    # (node, op type) of the head's ops that are not piecewise linear in the layer: where
    # this is empty the head's Hessian-vector product vanishes almost everywhere.
    curved_head_ops: list[tuple[str, str]] = field(default_factory=list)

    @property
    def input_name(self) -> str:
        return self.info.input_name

    def full_model(self) -> onnx.ModelProto:
        """The rewritten model with gradients of the activations' full shape (what
        ``sp2ps rewrite`` writes, for any ONNX runtime); ``model`` itself when it already is."""
        if self.gradient_spread is None:
            return self.model
        full = onnx.ModelProto()
        full.CopyFrom(self.model)
        out = self.output_names[GRADIENTS]
        index = next(i for i, node in enumerate(full.graph.node) if out in node.output)
        full.graph.node[index].input[0] = self.gradient_spread.output[0]
        full.graph.node.insert(index, self.gradient_spread)
        return full

    @property
    def layout(self) -> str:
        return input_layout(self.info.declared_input_dims)

    def head_ops(self) -> list[tuple[str, str, bool]]:
        return head_ops(self.info, self.layer, self.score_tensor)


@dataclass(frozen=True)
class BackwardOptions:
    """What the backward pass computes beyond the head, in the same run (it then goes down
    to the earliest source asked for, and every op on the way needs a rule).

    Attributes:
        layers: tensor or node names, or ``"stages"`` (:func:`stage_layers`): the
            activations and gradients of each (:attr:`CamGraph.layers`). Without ``layer``,
            the main layer is the one of them computed last.
        input_gradient: d score / d input, in the input's own layout.
        weighted_seed: an extra input ``target_weights`` (N, K); a sample whose target is
            :data:`WEIGHTED_TARGET` seeds the backward pass with its row (the gradient of
            ``sum_k w[k] * score[k]``), every other sample with the one-hot of its class.
        relu_backward: ``"guided"``: every ReLU (plain, or fused into a quantization) passes
            the gradient only where both its input and the incoming gradient are positive
            (Guided Backprop), in this model only.
        bias_gradients: for every Conv and Gemm with a bias on the way, ``bias * d score /
            d output`` (FullGrad's terms; :attr:`CamGraph.bias_outputs`); implies the
            backward pass down to the input.
        guided_input_gradient: also Guided Backprop's input gradient, from a second
            backward pass in the same run (Guided Grad-CAM needs the layer's plain gradient
            and the guided input gradient of the same forward pass).
        hessian_vector_product: also ``H · a`` at the (main) layer, H the Hessian of the
            score there and ``a`` its activations (ShapleyCAM's second-order term), by the
            rules run over the first backward pass (:mod:`.second_order`); refused where
            that pass uses an op without a rule.
    """

    layers: Sequence[str] | str | None = None
    input_gradient: bool = False
    weighted_seed: bool = False
    relu_backward: str = "standard"
    bias_gradients: bool = False
    guided_input_gradient: bool = False
    hessian_vector_product: bool = False

    def __post_init__(self) -> None:
        if self.relu_backward not in RELU_BACKWARDS:
            raise ValueError(
                f"relu_backward must be one of {RELU_BACKWARDS}, not {self.relu_backward!r}"
            )

    @property
    def beyond_head(self) -> bool:
        return bool(
            self.layers or self.input_gradient or self.bias_gradients
            or self.guided_input_gradient or self.hessian_vector_product
        )  # fmt: skip


def build_cam_model(
    model: str | os.PathLike | onnx.ModelProto,
    layer: str | None = None,
    score: str = "logits",
    input_size: tuple[int, int] | None = None,
    allow_domains: Iterable[str] = (),
    grid: tuple[int, int] | None = None,
    backward: BackwardOptions | None = None,
) -> CamGraph:
    """Rewrite ``model`` so that one run yields the score, the layer's activations and the
    gradient of the chosen class score with respect to them.

    The backbone runs once; the head's backward pass is appended as standard ONNX ops.
    Activations and gradients come out channels-first (N, C, H, W): a channels-last map is
    transposed, and a token sequence (N, T, C) loses its extra (class) tokens and is
    folded into its H x W grid, proven from the graph or stated with ``grid=(H, W)``.
    ``allow_domains`` names custom-op domains to accept (see
    :func:`~sp2ps_onnx.graph.model_io.load_model`). ``backward`` asks for more of the
    backward pass in the same run: several layers, the input, a weighted seed, Guided
    Backprop's ReLU, FullGrad's bias terms (:class:`BackwardOptions`).
    """
    proto, path = load_model(model, allow_domains)
    with blame_invalid_model(proto, path), naming_the_model(path):
        return _build_cam_model(
            proto, path, layer, score, input_size, grid, backward or BackwardOptions()
        )


def stage_layers(
    model: str | os.PathLike | onnx.ModelProto,
    score: str = "logits",
    input_size: tuple[int, int] | None = None,
    allow_domains: Iterable[str] = (),
) -> list[str]:
    """The last feature map of each spatial resolution of ``model``, finest first (the
    layers of ``layers="stages"``; see :func:`~sp2ps_onnx.graph.locate.stage_layers`)."""
    proto, path = load_model(model, allow_domains)
    with blame_invalid_model(proto, path), naming_the_model(path):
        info = analyse(proto, input_size, path)
        return find_stage_layers(info, find_score(info, score)[0])


def _resolve_layers(info: GraphInfo, layers: Sequence[str] | str | None, score_tensor: str) -> list[str]:
    if not layers:
        return []
    if isinstance(layers, str):
        if layers != "stages":
            raise LayerNotFoundError(
                f"layers={layers!r}: give a list of tensor or node names, or 'stages' (the last "
                "map of each resolution)"
            )
        return find_stage_layers(info, score_tensor)
    resolved: list[str] = []
    for name in layers:
        tensor = resolve_layer(info, name)
        if tensor not in resolved:
            resolved.append(tensor)
    return resolved


@dataclass
class _Plan:
    """What the rewrite differentiates: the score, the layers and the backward path."""

    info: GraphInfo
    score_tensor: str
    cut: str | None
    target: str
    rule: str
    layout: MapLayout
    extra_layers: list[str]
    layouts: dict[str, MapLayout]
    sources: list[str]
    path_nodes: list[int]
    requires: set[str]
    head: list[int]
    curved: list[tuple[str, str]]


def _plan(info, path, layer, score, grid, options: BackwardOptions) -> _Plan:
    score_tensor, cut = find_score(info, score)
    extra_layers = _resolve_layers(info, options.layers, score_tensor)
    if layer:
        target, rule = resolve_layer(info, layer), RULE_NAMED
    elif extra_layers:
        target, rule = max(extra_layers, key=lambda t: info.producer.get(t, -1)), RULE_NAMED
    else:
        target, rule = choose_default_layer(info, score_tensor)
    layout = layer_layout(info, target, grid, path)
    layouts = {t: layout if t == target else layer_layout(info, t, None, path) for t in extra_layers}
    sources = [target, *(t for t in extra_layers if t != target)]
    if options.input_gradient or options.bias_gradients or options.guided_input_gradient:
        _check_differentiable_input(info, path)
        sources.append(info.input_name)
    path_nodes = backward_nodes(info, sources, score_tensor, path or "")
    requires = requires_grad(info, sources, path_nodes)
    head = path_nodes if len(sources) == 1 else backward_nodes(info, [target], score_tensor)
    head_requires = requires if len(sources) == 1 else requires_grad(info, target, head)
    curved = [
        (info.node(i).name or info.node(i).output[0], info.node(i).op_type)
        for i in head
        if not is_piecewise_linear(info.node(i), head_requires)
    ]
    return _Plan(
        info, score_tensor, cut, target, rule, layout, extra_layers, layouts, sources,
        path_nodes, requires, head, curved,
    )  # fmt: skip


def _build_cam_model(
    proto: onnx.ModelProto,
    path: str | None,
    layer: str | None,
    score: str,
    input_size: tuple[int, int] | None,
    grid: tuple[int, int] | None,
    options: BackwardOptions,
) -> CamGraph:
    info = analyse(proto, input_size, path)
    plan = _plan(info, path, layer, score, grid, options)
    target, layout = plan.target, plan.layout
    original_nodes = len(info.graph.node)

    b = GraphBuilder(info)
    num_classes = int(np.prod(info.shapes[plan.score_tensor][1:]))
    batch_dim: int | str = info.fixed_batch if info.fixed_batch else "N"
    target_in = _fresh_io_name(info, TARGET)
    weights_in = _fresh_io_name(info, TARGET_WEIGHTS) if options.weighted_seed else None
    score_flat, chosen, seed = _one_hot_seed(b, plan.score_tensor, target_in, num_classes, weights_in)
    grads, guided_input = _backward_passes(b, plan, options, seed, path)

    activations, gradient = b.as_float(target), grads[target]
    spread = None
    if isinstance(layout, Layout) and layout.to_channels_first is None and not options.beyond_head:
        gradient, spread = _unspread(b, gradient, target)
    else:
        activations = _channels_first(b, activations, layout, info.shapes[target])
        gradient = _channels_first(b, gradient, layout, info.shapes[target])

    names = {key: _fresh_io_name(info, key) for key in (SCORE, ACTIVATIONS, GRADIENTS, TARGETS_USED)}
    sources_out = [
        (SCORE, score_flat),
        (ACTIVATIONS, activations),
        (GRADIENTS, gradient),
        (TARGETS_USED, chosen),
    ]
    extra = _extra_tokens(b, b.as_float(target), layout)
    if extra is not None:
        # What the fold into a map drops (class tokens), channels first (N, C, k): the
        # ablation of a channel sets it in these tokens too, as pytorch-grad-cam's
        # AblationLayerVit does.
        names[EXTRA_TOKENS] = _fresh_io_name(info, EXTRA_TOKENS)
        sources_out.append((EXTRA_TOKENS, extra))
    for key, source in sources_out:
        b.nodes.append(helper.make_node("Identity", [source], [names[key]], name=b.fresh("out")))
    more = _Outputs(b, set(names.values()))
    layer_outputs, input_gradient, bias_outputs = _beyond_head_outputs(b, plan, options, grads, more, path)
    if guided_input is not None:
        guided_input = more.emit(GUIDED_INPUT_GRADIENT, guided_input, len(info.input_shape))

    model_out = onnx.ModelProto()
    model_out.CopyFrom(info.model)
    graph = model_out.graph
    graph.node.extend(b.nodes)
    graph.initializer.extend(b.initializers)
    graph.input.append(helper.make_tensor_value_info(target_in, TensorProto.INT64, [batch_dim]))
    if weights_in is not None:
        graph.input.append(helper.make_tensor_value_info(weights_in, FLOAT, [batch_dim, num_classes]))
    _declare_outputs(graph, names, more.added, batch_dim, num_classes)
    hessian = None
    if options.hessian_vector_product:
        runtime_inputs = [(target_in, 0)] + ([(weights_in, num_classes)] if weights_in else [])
        hessian = _add_hessian_vector_product(model_out, plan, grads[target], runtime_inputs, more)
    serialized = _check(model_out, info.model, path)
    return CamGraph(
        serialized=serialized,
        model=model_out,
        forward_model=_forward_model(info, score_flat_source=plan.score_tensor, batch_dim=batch_dim),
        info=info,
        layer=target,
        layer_layout=layout,
        score_tensor=plan.score_tensor,
        softmax_cut=plan.cut,
        head=plan.head,
        num_classes=num_classes,
        path=path,
        output_names=names | {TARGET: target_in},
        backward_nodes=len(graph.node) - original_nodes + (spread is not None),
        gradient_spread=spread,
        layer_rule=plan.rule,
        layers=layer_outputs,
        input_gradient=input_gradient,
        guided_input_gradient=guided_input,
        hessian_vector=hessian,
        bias_outputs=bias_outputs,
        relu_backward=options.relu_backward,
        target_weights=weights_in,
        backward_path=plan.path_nodes,
        curved_head_ops=plan.curved,
    )


def _add_hessian_vector_product(
    model: onnx.ModelProto, plan: _Plan, gradient: str, runtime_inputs, out: _Outputs
) -> str:
    """Append the nodes of ``H · a`` at the layer to ``model``; return its output name."""
    info, target = plan.info, plan.target
    finish = lambda b, t: _channels_first(b, t, plan.layout, info.shapes[target])  # noqa: E731
    activations = out.b.as_float(target)
    nodes, inits, product = hessian_vector_product(
        model, info, target, activations, gradient, runtime_inputs, finish
    )
    name = _fresh_io_name(info, HESSIAN_VECTOR)
    while name in out.taken:
        name = f"{name}_"
    nodes.append(helper.make_node("Identity", [product], [name], name=f"{name}/out"))
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(inits)
    batch_dim = info.fixed_batch if info.fixed_batch else "N"
    model.graph.output.append(helper.make_tensor_value_info(name, FLOAT, [batch_dim, None, None, None]))
    return name


def _declare_outputs(
    graph: onnx.GraphProto, names: dict[str, str], added: list[tuple[str, int]], batch_dim,
    num_classes: int,
) -> None:  # fmt: skip
    graph.output.extend(
        [
            helper.make_tensor_value_info(names[SCORE], FLOAT, [batch_dim, num_classes]),
            helper.make_tensor_value_info(names[ACTIVATIONS], FLOAT, [batch_dim, None, None, None]),
            helper.make_tensor_value_info(names[GRADIENTS], FLOAT, [batch_dim, None, None, None]),
            helper.make_tensor_value_info(names[TARGETS_USED], TensorProto.INT64, [batch_dim]),
        ]
    )
    if EXTRA_TOKENS in names:
        graph.output.append(
            helper.make_tensor_value_info(names[EXTRA_TOKENS], FLOAT, [batch_dim, None, None])
        )
    graph.output.extend(
        helper.make_tensor_value_info(name, FLOAT, [batch_dim] + [None] * (rank - 1))
        for name, rank in added
    )


def _backward_passes(
    b: GraphBuilder, plan: _Plan, options: BackwardOptions, seed: str, path: str | None
) -> tuple[dict[str, str], str | None]:
    """The backward pass's gradients and, with ``guided_input_gradient``, the input
    gradient of a second, guided pass."""
    b.guided_relu = options.relu_backward == "guided"
    grads = backward(b, plan.path_nodes, plan.requires, {plan.score_tensor: seed})
    _check_backward(b, plan, grads, path)
    if not options.guided_input_gradient:
        return grads, None
    b.guided_relu, b.guided_relus = True, 0
    guided = backward(b, plan.path_nodes, plan.requires, {plan.score_tensor: seed})
    _check_backward(b, plan, guided, path)
    return grads, guided[plan.info.input_name]


def _check_backward(b: GraphBuilder, plan: _Plan, grads: dict[str, str], path: str | None) -> None:
    for source in plan.sources:
        if source not in grads:
            raise ModelLoadError(f"internal error: no gradient reached {source!r}")
    if b.guided_relu and not b.guided_relus:
        raise UnsupportedModelError(
            f"Guided Backprop found no ReLU (a Relu node, or one fused into a "
            f"quantization) on the backward pass of {path or 'the model'}, so Guided Backprop "
            "would be the plain gradient; use the standard gradient, or a layer/input_gradient "
            "whose backward pass crosses the model's ReLUs"
        )


class _Outputs:
    """Graph outputs added after the usual ones, with names free in the graph."""

    def __init__(self, b: GraphBuilder, taken: set[str]) -> None:
        self.b = b
        self.taken = set(taken)
        self.added: list[tuple[str, int]] = []  # (name, rank)

    def emit(self, key: str, source: str, rank: int) -> str:
        name = _fresh_io_name(self.b.info, key)
        while name in self.taken:
            name = _fresh_io_name(self.b.info, f"{name}_")
        self.taken.add(name)
        self.b.nodes.append(helper.make_node("Identity", [source], [name], name=self.b.fresh("out")))
        self.added.append((name, rank))
        return name


def _beyond_head_outputs(
    b: GraphBuilder, plan: _Plan, options: BackwardOptions, grads: dict[str, str],
    out: _Outputs, path: str | None,
) -> tuple[list[LayerOutputs], str | None, list[BiasOutput]]:  # fmt: skip
    """The outputs of ``options``: every layer's maps, the input gradient, the bias terms."""
    info = plan.info
    layer_outputs = []
    for k, tensor in enumerate(plan.extra_layers):
        shape, layout = info.shapes[tensor], plan.layouts[tensor]
        acts = _channels_first(b, b.as_float(tensor), layout, shape)
        grad = _channels_first(b, grads[tensor], layout, shape)
        layer_outputs.append(
            LayerOutputs(
                tensor, layout, out.emit(f"{ACTIVATIONS}_{k}", acts, 4),
                out.emit(f"{GRADIENTS}_{k}", grad, 4),
            )
        )  # fmt: skip
    input_gradient = None
    if options.input_gradient:
        input_gradient = out.emit(INPUT_GRADIENT, grads[info.input_name], len(info.input_shape))
    bias_outputs = []
    if options.bias_gradients:
        _check_plain_biases(info, plan.path_nodes, path)
        for idx in plan.path_nodes:
            node = info.node(idx)
            found = _bias_term(b, info, node, grads)
            if found is None:
                continue
            term, value = found
            rank = len(info.shapes[node.output[0]])
            name = out.emit(f"bias_gradient_{len(bias_outputs)}", term, rank)
            bias_outputs.append(
                BiasOutput(node.name or node.output[0], node.op_type, node.output[0], value, name)
            )
    return layer_outputs, input_gradient, bias_outputs


def _check_differentiable_input(info: GraphInfo, path: str | None) -> None:
    dtype = info.dtypes.get(info.input_name)
    if dtype is not None and not np.issubdtype(dtype, np.floating):
        raise UnsupportedModelError(
            f"the input {info.input_name!r} of {path or 'the model'} holds {np.dtype(dtype).name} "
            "codes (a full-integer model), which have no gradient; the input gradient (Guided "
            "Backprop, FullGrad) needs a model with a float input, e.g. the float or QDQ export"
        )


# Quantized linear ops that hold their bias inside (QOperator) or add it in a separate node
# after integer arithmetic (dynamic quantization): FullGrad's terms are not read off them.
_FOLDED_BIAS_OPS = frozenset({"QLinearConv", "QGemm", "ConvInteger", "MatMulInteger", "QLinearMatMul"})


def _check_plain_biases(info: GraphInfo, path_nodes: list[int], path: str | None) -> None:
    folded = sorted({info.node(i).op_type for i in path_nodes} & _FOLDED_BIAS_OPS)
    if folded:
        raise UnsupportedModelError(
            f"bias_gradients (FullGrad) reads the bias of every Conv, Gemm and BatchNormalization, but "
            f"{path or 'the model'} computes its convolutions or products as "
            f"{', '.join(folded)} (QOperator or dynamic quantization), whose biases it cannot "
            "pair with a gradient; use the float model or its QDQ quantization"
        )


def _bias_term(
    b: GraphBuilder, info: GraphInfo, node: onnx.NodeProto, grads: dict[str, str]
) -> tuple[str, np.ndarray | None] | None:
    """``bias * gradient at the output`` of a Conv, Gemm or BatchNormalization whose bias
    does not depend on the input, the bias laid along the output's channel axis (1 for
    all three), and the bias's value; else None."""
    out = node.output[0]
    if out not in grads or node.op_type not in ("Conv", "Gemm", "BatchNormalization"):
        return None
    if node.op_type == "BatchNormalization":
        parameters = node.input[1:5]
        if len(parameters) < 4 or any(p in info.input_dependent for p in parameters):
            return None
        scale, shift, mean, var = (b.as_float(p) for p in parameters)
        eps = b.scalar(attribute(node, "epsilon", 1e-5))
        ratio = b.op("Div", [scale, b.op("Sqrt", [b.add(var, eps)])])
        bias = b.op("Sub", [shift, b.mul(mean, ratio)])
        values = [info.static_value(p) for p in parameters]
        value = None
        if all(v is not None for v in values):
            scale_v, shift_v, mean_v, var_v = (np.asarray(v, np.float64) for v in values)
            eps_v = attribute(node, "epsilon", 1e-5)
            value = (shift_v - mean_v * scale_v / np.sqrt(var_v + eps_v)).astype(np.float32)
    else:
        if len(node.input) < 3 or not node.input[2] or node.input[2] in info.input_dependent:
            return None
        bias = b.as_float(node.input[2])
        value = info.static_value(node.input[2])
        value = None if value is None else np.asarray(value, np.float32).reshape(-1)
    rank = len(info.shapes[out])
    if rank > 2:
        bias = b.op("Reshape", [bias, b.ints([-1] + [1] * (rank - 2))])
    return b.mul(grads[out], bias), value


def _one_hot_seed(
    b: GraphBuilder,
    score_tensor: str,
    target_in: str,
    num_classes: int,
    weights_in: str | None = None,
) -> tuple[str, str, str]:
    """The scores flattened to (N, K), the class each sample explains (``target_in``, or
    the top-1 where it is negative) and the one-hot seed of the backward pass, shaped as
    the score tensor. With ``weights_in``, samples whose target is
    :data:`WEIGHTED_TARGET` take their row of it as the seed instead (the others keep
    their one-hot exactly: Where selects, it does not add)."""
    score_shape = b.info.shapes[score_tensor]
    score_flat = b.as_float(score_tensor)
    if len(score_shape) != 2:
        score_flat = b.op("Flatten", [score_flat], axis=1)
    argmax = b.op("ArgMax", [score_flat], axis=1, keepdims=0)
    chosen = b.op("Where", [b.op("Less", [target_in, b.const(0, np.int64)]), argmax, target_in])
    one_hot = b.op(
        "OneHot",
        [chosen, b.const([num_classes], np.int64), b.const([0.0, 1.0], np.float32)],
        axis=-1,
    )
    if weights_in is not None:
        weighted = b.unsqueeze(b.op("Equal", [target_in, b.const(WEIGHTED_TARGET, np.int64)]), [1])
        one_hot = b.op("Where", [weighted, weights_in, one_hot])
    seed = one_hot if len(score_shape) == 2 else b.reshape_like(one_hot, score_tensor)
    return score_flat, chosen, seed


def layer_layout(
    info: GraphInfo, target: str, grid: tuple[int, int] | None, path: str | None
) -> MapLayout:
    """The proven layout of the CAM layer, or one clear refusal that says what to do."""
    shape = info.shapes.get(target, ())
    if len(shape) not in (3, 4):
        raise LayerNotFoundError(
            f"layer {target!r} has shape {info.shapes.get(target)}; a CAM layer must be a 4-D "
            "feature map (N, C, H, W) or (N, H, W, C), or a token sequence (N, T, C)"
        )
    layout = map_layout(info, target, grid)
    if layout is not None:
        return layout
    where = path or "the model"
    if len(shape) == 3:
        raise LayerNotFoundError(
            f"cannot prove which tokens of layer {target!r} (shape {tuple(shape[1:])}) form "
            f"an image grid in {where}: no patch-embedding Conv/Reshape, class-token Concat "
            "or token Slice traces its token axis back to a feature map; state the grid with "
            "grid=(H, W) (CLI: --grid HxW; the T - H*W leading tokens are dropped), or choose "
            "another layer with layer=... (`sp2ps inspect` lists candidates)"
        )
    raise LayerNotFoundError(
        f"cannot prove which axis of layer {target!r} (shape "
        f"{tuple(shape[1:])}) holds the channels in {where}: "
        "no convolution, pooling, LayerNormalization or model input fixes its layout through "
        "ops with a known effect on the axes; choose a layer whose layout is known with "
        "layer=... (CLI: --layer), e.g. the output of a Conv or its activation (`sp2ps "
        "inspect` lists candidates)"
    )


def _extra_tokens(b: GraphBuilder, tensor: str, layout: MapLayout) -> str | None:
    """The tokens outside the grid, (N, C, k): leading ones first, then trailing ones."""
    if not isinstance(layout, TokenLayout) or layout.patches == layout.tokens:
        return None
    axis, end = layout.token_axis, layout.offset + layout.patches
    parts = [
        b.op("Slice", [tensor, b.ints([start]), b.ints([stop]), b.ints([axis])])
        for start, stop in ((0, layout.offset), (end, layout.tokens))
        if stop > start
    ]
    extra = parts[0] if len(parts) == 1 else b.op("Concat", parts, axis=axis)
    return b.op("Transpose", [extra], perm=[0, 2, 1]) if axis == 1 else extra


def _channels_first(b: GraphBuilder, tensor: str, layout: MapLayout, shape) -> str:
    """Emit the ops that turn ``tensor`` (stored as ``layout``) into (N, C, H, W)."""
    if isinstance(layout, Layout):
        if layout.to_channels_first is None:
            return tensor
        return b.op("Transpose", [tensor], perm=layout.to_channels_first)
    if layout.patches != layout.tokens:
        end = layout.offset + layout.patches
        tensor = b.op(
            "Slice", [tensor, b.ints([layout.offset]), b.ints([end]), b.ints([layout.token_axis])]
        )
    if layout.token_axis == 1:
        tensor = b.op("Transpose", [tensor], perm=[0, 2, 1])
    channels = shape[layout.channel_axis]
    return b.op("Reshape", [tensor, b.ints([0, channels, *layout.grid])])


def _unspread(
    b: GraphBuilder, gradient: str, activations: str
) -> tuple[str, onnx.NodeProto | None]:
    """The gradient before a final ``Expand(g, Shape(activations))``, and that Expand.

    A global pooling head gives every position of a channel the same gradient; spreading
    it over the map in the graph costs a large write and copy per run for nothing, since
    the runtime can broadcast it for free. Only that exact pattern is taken (ONNX Expand
    broadcasts as NumPy does, and the runtime checks that the result has the activations'
    shape); anything else keeps its gradient as is.
    """
    producers = {out: node for node in b.nodes for out in node.output}
    expand = producers.get(gradient)
    if expand is None or expand.op_type != "Expand":
        return gradient, None
    shape = producers.get(expand.input[1])
    if shape is None or shape.op_type != "Shape" or shape.attribute:
        return gradient, None
    if shape.input[0] != activations:
        return gradient, None
    if any(gradient in node.input for node in b.nodes):
        return gradient, None
    b.nodes.remove(expand)
    return expand.input[0], expand


HEAD_ACTIVATIONS = "activations"
HEAD_EXTRA_TOKENS = "extra_tokens"


def build_head_model(cam: CamGraph) -> onnx.ModelProto | None:
    """The head: channels-first activations in, class scores (N, K) out.

    Used by AblationCAM so that only the head re-runs on ablated activations. A token
    layer with extra (class) tokens also takes them, as ``extra_tokens`` (N, C, k). A head
    that also reads tensors computed before the layer (the residual stream around a
    transformer block's norm) also takes the model's image input and recomputes those.
    Returns ``None`` where the layer's quantization cannot be redone.
    """
    info, target = cam.info, cam.layer
    needed: list[int] = []
    seen: set[int] = set()
    stack = [cam.score_tensor]
    visited: set[str] = set()
    reads_image = False
    while stack:
        tensor = stack.pop()
        if tensor in visited or tensor == target:
            continue
        visited.add(tensor)
        if tensor == info.input_name:
            reads_image = True
            continue
        idx = info.producer.get(tensor)
        if idx is None:
            continue
        if idx not in seen:
            seen.add(idx)
            needed.append(idx)
            stack.extend(i for i in info.node(idx).input if i)
    nodes = [info.node(i) for i in sorted(needed)]
    used = {i for n in nodes for i in n.input}

    b = GraphBuilder(info, prefix="sp2ps_head")
    acts_in = HEAD_ACTIVATIONS
    source = acts_in
    layout = cam.layer_layout
    batch_dim = info.fixed_batch if info.fixed_batch else "N"
    inputs = [helper.make_tensor_value_info(acts_in, FLOAT, [batch_dim, None, None, None])]
    if isinstance(layout, TokenLayout):
        channels = info.shapes[target][layout.channel_axis]
        source = b.op("Reshape", [source, b.ints([0, channels, -1])])
        if layout.patches != layout.tokens:
            extra = helper.make_tensor_value_info(
                HEAD_EXTRA_TOKENS, FLOAT, [batch_dim, channels, None]
            )
            inputs.append(extra)
            # The extra tokens come leading ones first (see _extra_tokens).
            leading, extras = layout.offset, layout.tokens - layout.patches
            parts = [
                b.op("Slice", [HEAD_EXTRA_TOKENS, b.ints([start]), b.ints([stop]), b.ints([2])])
                for start, stop in ((0, leading), (leading, extras))
                if stop > start
            ]
            parts.insert(1 if leading else 0, source)
            source = b.op("Concat", parts, axis=2)
        if layout.token_axis == 1:
            source = b.op("Transpose", [source], perm=[0, 2, 1])
    elif layout.to_channels_first:
        perm = layout.to_channels_first
        inverse = [perm.index(i) for i in range(4)]
        source = b.op("Transpose", [source], perm=inverse)
    target_dtype = info.dtypes.get(target, np.dtype(np.float32))
    params = info.quant_params.get(target)
    if params is not None and np.issubdtype(target_dtype, np.integer):
        # A QOperator layer: activations come back dequantized, so quantize them again.
        scale, zero = params
        if info.static_value(scale) is None:
            return None
        used.update(n for n in params if n)
        source = b.op("QuantizeLinear", [source, *(n for n in params if n)])
    elif target_dtype != np.float32:
        to = helper.np_dtype_to_tensor_dtype(target_dtype)
        source = b.op("Cast", [source], to=to)
    inits = [init for init in info.graph.initializer if init.name in used]
    glue = b.nodes + [helper.make_node("Identity", [source], [target], name=b.fresh("layer"))]
    b.nodes = []  # what follows runs after the head's own nodes
    score = b.fresh("score")
    score_src = b.as_float(cam.score_tensor)
    if len(info.shapes[cam.score_tensor]) != 2:
        score_src = b.op("Flatten", [score_src], axis=1)
    b.nodes.append(helper.make_node("Identity", [score_src], [score], name=b.fresh("out")))
    if reads_image:
        inputs.append(next(vi for vi in info.graph.input if vi.name == info.input_name))
    graph = helper.make_graph(
        glue + nodes + b.nodes,
        "sp2ps_head",
        inputs,
        [helper.make_tensor_value_info(score, FLOAT, [batch_dim, cam.num_classes])],
        initializer=inits + b.initializers,
    )
    head = helper.make_model(graph, opset_imports=list(info.model.opset_import))
    head.ir_version = info.model.ir_version
    return head


def _forward_model(info: GraphInfo, score_flat_source: str, batch_dim) -> onnx.ModelProto:
    b = GraphBuilder(info, prefix="sp2ps_fwd")
    score = b.as_float(score_flat_source)
    if len(info.shapes[score_flat_source]) != 2:
        score = b.op("Flatten", [score], axis=1)
    name = b.fresh("score")
    b.nodes.append(helper.make_node("Identity", [score], [name], name=b.fresh("out")))
    fwd = onnx.ModelProto()
    fwd.CopyFrom(info.model)
    fwd.graph.node.extend(b.nodes)
    fwd.graph.initializer.extend(b.initializers)
    del fwd.graph.output[:]
    fwd.graph.output.append(helper.make_tensor_value_info(name, FLOAT, [batch_dim, None]))
    return fwd


def _fresh_io_name(info: GraphInfo, name: str) -> str:
    taken = set(info.shapes) | {i.name for i in info.graph.input} | set(info.constants)
    candidate, k = name, 1
    while candidate in taken:
        k += 1
        candidate = f"{name}_{k}"
    return candidate


def _check(model: onnx.ModelProto, original: onnx.ModelProto, path: str | None) -> bytes | None:
    """Check the rewritten model; return its serialisation (made once: the session reuses
    it), or None for a model over protobuf's 2 GB limit."""
    try:
        serialized = model.SerializeToString()
    except Exception:  # over 2 GB: protobuf cannot serialise it; ORT validates on load instead
        return None
    if len(serialized) > 2_000_000_000:
        return None
    try:
        onnx.checker.check_model(serialized)
    except onnx.checker.ValidationError as exc:
        try:
            onnx.checker.check_model(original)
        except onnx.checker.ValidationError:
            return serialized  # the input model already fails the checker; ORT accepts both

        raise ModelLoadError(
            f"internal error: the rewritten graph of {path or 'the model'} fails onnx.checker "
            f"({exc}); please report this with the model"
        ) from exc
    return serialized
