"""Vector-Jacobian product rules, one small function per ONNX op.

A rule receives the builder, the forward node, the output gradients ``dys`` (one per node
output, ``None`` where no gradient flows) and ``needs`` (which inputs need a gradient), and
returns one gradient tensor name (or ``None``) per node input. Rules emit standard
default-domain ONNX ops through :class:`~sp2ps_onnx.graph.builder.GraphBuilder`, which
speaks the graph's own opset. Gradients are float32; forward values are read through
``b.as_float``.

Adding an op: write one function, decorate it with ``@vjp("OpType", inputs=(...))`` naming
the inputs a gradient can flow into, and add a finite-difference test (docs/ops.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from ..errors import UnsupportedOpError
from .analysis import cpu_session
from .builder import FLOAT, GraphBuilder
from .model_io import attribute

Grad = str | None
RuleFn = Callable[[GraphBuilder, onnx.NodeProto, list[Grad], list[bool]], list[Grad]]


@dataclass(frozen=True)
class VJPRule:
    """A gradient rule and the input positions a gradient can flow into."""

    op_type: str
    fn: RuleFn
    inputs: tuple[int, ...] | None  # None: every input


VJP_RULES: dict[str, VJPRule] = {}

# Outputs of these ops carry no gradient: shape arithmetic, comparisons, indices.
NON_DIFFERENTIABLE = frozenset(
    {
        "Shape", "Size", "ConstantOfShape", "Range", "Constant", "NonZero", "ArgMax",
        "ArgMin", "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Not", "And",
        "Or", "Xor", "Floor", "Ceil", "Round", "Sign", "EyeLike", "OneHot", "RandomNormal",
        "RandomUniform", "RandomNormalLike", "RandomUniformLike", "IsNaN", "IsInf",
    }
)  # fmt: skip


def vjp(*op_types: str, inputs: tuple[int, ...] | None = (0,)):
    """Register ``fn`` as the VJP rule of ``op_types``."""

    def register(fn: RuleFn) -> RuleFn:
        for op_type in op_types:
            VJP_RULES[op_type] = VJPRule(op_type, fn, inputs)
        return fn

    return register


def differentiable_inputs(node: onnx.NodeProto) -> list[int]:
    """Input positions of ``node`` through which a gradient can flow."""
    if node.op_type in NON_DIFFERENTIABLE:
        return []
    rule = VJP_RULES.get(node.op_type)
    positions = range(len(node.input)) if rule is None or rule.inputs is None else rule.inputs
    return [i for i in positions if i < len(node.input) and node.input[i]]


def _unsupported(node: onnx.NodeProto, detail: str) -> UnsupportedOpError:
    return UnsupportedOpError(node.op_type, node.name or node.output[0], detail)


def _static_ints(b: GraphBuilder, node: onnx.NodeProto, position: int, what: str) -> list[int]:
    name = node.input[position]
    value = b.info.static_value(name)
    if value is None:
        raise _unsupported(node, f"its {what} input {name!r} is computed at run time")
    return [int(v) for v in np.asarray(value).reshape(-1)]


def _out_shape(b: GraphBuilder, node: onnx.NodeProto, k: int = 0) -> tuple[int, ...]:
    return b.static_shape(node.output[k])


def _mask(b: GraphBuilder, condition: str) -> str:
    return b.op("Cast", [condition], to=FLOAT)


# -- activations ---------------------------------------------------------------------------
@vjp("Relu")
def _relu(b, node, dys, needs):
    positive = b.op("Greater", [b.as_float(node.input[0]), b.scalar(0.0)])
    return [b.mul(dys[0], _mask(b, positive))]


@vjp("LeakyRelu")
def _leaky_relu(b, node, dys, needs):
    alpha = attribute(node, "alpha", 0.01)
    positive = b.op("Greater", [b.as_float(node.input[0]), b.scalar(0.0)])
    slope = b.op("Where", [positive, b.scalar(1.0), b.scalar(alpha)])
    return [b.mul(dys[0], slope)]


@vjp("PRelu")
def _prelu(b, node, dys, needs):
    positive = b.op("Greater", [b.as_float(node.input[0]), b.scalar(0.0)])
    slope = b.op("Where", [positive, b.scalar(1.0), b.as_float(node.input[1])])
    grad = b.mul(dys[0], slope)
    return [b.unbroadcast(grad, _out_shape(b, node), node.input[0]), None]


@vjp("Elu")
def _elu(b, node, dys, needs):
    alpha = attribute(node, "alpha", 1.0)
    positive = b.op("Greater", [b.as_float(node.input[0]), b.scalar(0.0)])
    negative_slope = b.add(b.as_float(node.output[0]), b.scalar(alpha))
    return [b.mul(dys[0], b.op("Where", [positive, b.scalar(1.0), negative_slope]))]


@vjp("Selu")
def _selu(b, node, dys, needs):
    alpha = attribute(node, "alpha", 1.67326319217681884765625)
    gamma = attribute(node, "gamma", 1.05070102214813232421875)
    positive = b.op("Greater", [b.as_float(node.input[0]), b.scalar(0.0)])
    negative_slope = b.add(b.as_float(node.output[0]), b.scalar(alpha * gamma))
    return [b.mul(dys[0], b.op("Where", [positive, b.scalar(gamma), negative_slope]))]


@vjp("Clip")
def _clip(b, node, dys, needs):
    x = b.as_float(node.input[0])
    if b.opset < 11:
        low = b.scalar(attribute(node, "min", -3.4028234663852886e38))
        high = b.scalar(attribute(node, "max", 3.4028234663852886e38))
    else:
        low = b.as_float(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        high = b.as_float(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    # Inside [min, max] inclusive, as torch.clamp's backward; GreaterOrEqual needs opset 12.
    inside = None
    for bound, outside_op in ((low, "Less"), (high, "Greater")):
        if bound is None:
            continue
        keep = b.op("Not", [b.op(outside_op, [x, bound])])
        inside = keep if inside is None else b.op("And", [inside, keep])
    grad = dys[0] if inside is None else b.mul(dys[0], _mask(b, inside))
    return [grad, None, None]


@vjp("Sigmoid")
def _sigmoid(b, node, dys, needs):
    y = b.as_float(node.output[0])
    return [b.mul(dys[0], b.mul(y, b.op("Sub", [b.scalar(1.0), y])))]


@vjp("HardSigmoid")
def _hard_sigmoid(b, node, dys, needs):
    alpha = attribute(node, "alpha", 0.2)
    beta = attribute(node, "beta", 0.5)
    z = b.add(b.mul(b.as_float(node.input[0]), b.scalar(alpha)), b.scalar(beta))
    inside = b.op("And", [b.op("Greater", [z, b.scalar(0.0)]), b.op("Less", [z, b.scalar(1.0)])])
    return [b.mul(dys[0], b.mul(_mask(b, inside), b.scalar(alpha)))]


@vjp("HardSwish")
def _hard_swish(b, node, dys, needs):
    # y = x * clip(x/6 + 1/2, 0, 1): slope 0 below -3, 1 above 3, x/3 + 1/2 between.
    x = b.as_float(node.input[0])
    middle = b.add(b.mul(x, b.scalar(1.0 / 3.0)), b.scalar(0.5))
    upper = b.op("Where", [b.op("Greater", [x, b.scalar(3.0)]), b.scalar(1.0), middle])
    slope = b.op("Where", [b.op("Less", [x, b.scalar(-3.0)]), b.scalar(0.0), upper])
    return [b.mul(dys[0], slope)]


@vjp("Tanh")
def _tanh(b, node, dys, needs):
    y = b.as_float(node.output[0])
    return [b.mul(dys[0], b.op("Sub", [b.scalar(1.0), b.mul(y, y)]))]


@vjp("Softplus")
def _softplus(b, node, dys, needs):
    return [b.mul(dys[0], b.op("Sigmoid", [b.as_float(node.input[0])]))]


@vjp("Erf")
def _erf(b, node, dys, needs):
    x = b.as_float(node.input[0])
    gauss = b.op("Exp", [b.op("Neg", [b.mul(x, x)])])
    return [b.mul(dys[0], b.mul(gauss, b.scalar(2.0 / math.sqrt(math.pi))))]


@vjp("Gelu")
def _gelu(b, node, dys, needs):
    x = b.as_float(node.input[0])
    if attribute(node, "approximate", b"none") in (b"tanh", "tanh"):
        k = math.sqrt(2.0 / math.pi)
        x2 = b.mul(x, x)
        inner = b.mul(b.add(x, b.mul(b.mul(x2, x), b.scalar(0.044715))), b.scalar(k))
        t = b.op("Tanh", [inner])
        d_inner = b.mul(b.add(b.scalar(1.0), b.mul(x2, b.scalar(3 * 0.044715))), b.scalar(k))
        sech2 = b.op("Sub", [b.scalar(1.0), b.mul(t, t)])
        slope = b.add(
            b.mul(b.add(b.scalar(1.0), t), b.scalar(0.5)),
            b.mul(b.mul(b.mul(x, sech2), d_inner), b.scalar(0.5)),
        )
    else:
        cdf = b.mul(
            b.add(b.scalar(1.0), b.op("Erf", [b.mul(x, b.scalar(1.0 / math.sqrt(2.0)))])),
            b.scalar(0.5),
        )
        pdf = b.mul(
            b.op("Exp", [b.mul(b.mul(x, x), b.scalar(-0.5))]),
            b.scalar(1.0 / math.sqrt(2.0 * math.pi)),
        )
        slope = b.add(cdf, b.mul(x, pdf))
    return [b.mul(dys[0], slope)]


# -- arithmetic ----------------------------------------------------------------------------
@vjp("Neg")
def _neg(b, node, dys, needs):
    return [b.op("Neg", [dys[0]])]


@vjp("Sqrt")
def _sqrt(b, node, dys, needs):
    return [b.op("Div", [b.mul(dys[0], b.scalar(0.5)), b.as_float(node.output[0])])]


@vjp("Exp")
def _exp(b, node, dys, needs):
    return [b.mul(dys[0], b.as_float(node.output[0]))]


@vjp("Log")
def _log(b, node, dys, needs):
    return [b.op("Div", [dys[0], b.as_float(node.input[0])])]


@vjp("Reciprocal")
def _reciprocal(b, node, dys, needs):
    y = b.as_float(node.output[0])
    return [b.op("Neg", [b.mul(dys[0], b.mul(y, y))])]


@vjp("Abs")
def _abs(b, node, dys, needs):
    return [b.mul(dys[0], b.op("Sign", [b.as_float(node.input[0])]))]


@vjp("Add", "Sum", inputs=None)
def _add(b, node, dys, needs):
    shape = _out_shape(b, node)
    return [b.unbroadcast(dys[0], shape, x) if need else None for x, need in zip(node.input, needs, strict=True)]


@vjp("Sub", inputs=(0, 1))
def _sub(b, node, dys, needs):
    shape = _out_shape(b, node)
    grad_a = b.unbroadcast(dys[0], shape, node.input[0]) if needs[0] else None
    grad_b = b.unbroadcast(b.op("Neg", [dys[0]]), shape, node.input[1]) if needs[1] else None
    return [grad_a, grad_b]


@vjp("Mul", inputs=(0, 1))
def _mul(b, node, dys, needs):
    shape = _out_shape(b, node)
    a, c = node.input
    grad_a = b.unbroadcast(b.mul(dys[0], b.as_float(c)), shape, a) if needs[0] else None
    grad_c = b.unbroadcast(b.mul(dys[0], b.as_float(a)), shape, c) if needs[1] else None
    return [grad_a, grad_c]


@vjp("Div", inputs=(0, 1))
def _div(b, node, dys, needs):
    shape = _out_shape(b, node)
    a, c = node.input
    grad_a = grad_c = None
    if needs[0]:
        grad_a = b.unbroadcast(b.op("Div", [dys[0], b.as_float(c)]), shape, a)
    if needs[1]:
        ratio = b.op("Div", [b.as_float(node.output[0]), b.as_float(c)])
        grad_c = b.unbroadcast(b.op("Neg", [b.mul(dys[0], ratio)]), shape, c)
    return [grad_a, grad_c]


@vjp("Pow", inputs=(0, 1))
def _pow(b, node, dys, needs):
    if needs[1]:
        raise _unsupported(node, "only a constant exponent is supported")
    x = b.as_float(node.input[0])
    p = b.as_float(node.input[1])
    slope = b.mul(p, b.op("Pow", [x, b.op("Sub", [p, b.scalar(1.0)])]))
    return [b.unbroadcast(b.mul(dys[0], slope), _out_shape(b, node), node.input[0]), None]


@vjp("Where", inputs=(1, 2))
def _where(b, node, dys, needs):
    shape = _out_shape(b, node)
    zero = b.scalar(0.0)
    cond = node.input[0]
    out: list[Grad] = [None, None, None]
    if needs[1]:
        out[1] = b.unbroadcast(b.op("Where", [cond, dys[0], zero]), shape, node.input[1])
    if needs[2]:
        out[2] = b.unbroadcast(b.op("Where", [cond, zero, dys[0]]), shape, node.input[2])
    return out


# -- softmax -------------------------------------------------------------------------------
def _softmax_axis(b: GraphBuilder, node: onnx.NodeProto) -> tuple[int, bool]:
    """The reduction axis, and whether the pre-13 2-D coercion applies."""
    rank = b.rank(node.input[0])
    if b.opset >= 13:
        return attribute(node, "axis", -1) % rank, False
    axis = attribute(node, "axis", 1) % rank
    return axis, axis != rank - 1


@vjp("Softmax")
def _softmax(b, node, dys, needs):
    axis, coerced = _softmax_axis(b, node)
    y, dy = b.as_float(node.output[0]), dys[0]
    if coerced:
        y, dy, axis = b.op("Flatten", [y], axis=axis), b.op("Flatten", [dy], axis=axis), 1
    inner = b.reduce("ReduceSum", b.mul(dy, y), [axis], keepdims=True)
    grad = b.mul(y, b.op("Sub", [dy, inner]))
    return [b.reshape_like(grad, node.input[0]) if coerced else grad]


@vjp("LogSoftmax")
def _log_softmax(b, node, dys, needs):
    axis, coerced = _softmax_axis(b, node)
    y, dy = b.as_float(node.output[0]), dys[0]
    if coerced:
        y, dy, axis = b.op("Flatten", [y], axis=axis), b.op("Flatten", [dy], axis=axis), 1
    total = b.reduce("ReduceSum", dy, [axis], keepdims=True)
    grad = b.op("Sub", [dy, b.mul(b.op("Exp", [y]), total)])
    return [b.reshape_like(grad, node.input[0]) if coerced else grad]


# -- reductions and pooling ----------------------------------------------------------------
@vjp("GlobalAveragePool")
def _global_average_pool(b, node, dys, needs):
    x = node.input[0]
    count = int(np.prod(b.static_shape(x)[2:]))
    spread = b.op("Expand", [dys[0], b.shape_of(x)])
    return [b.mul(spread, b.scalar(1.0 / count))]


@vjp("GlobalMaxPool")
def _global_max_pool(b, node, dys, needs):
    x = node.input[0]
    axes = list(range(2, b.rank(x)))
    return [_max_mask_grad(b, b.as_float(x), b.as_float(node.output[0]), dys[0], axes)]


def _max_mask_grad(b: GraphBuilder, x: str, y_keep: str, dy_keep: str, axes: list[int]) -> str:
    # Ties share the gradient evenly, as torch.amax's backward does.
    hits = _mask(b, b.op("Equal", [x, y_keep]))
    count = b.reduce("ReduceSum", hits, axes, keepdims=True)
    return b.mul(hits, b.op("Div", [dy_keep, count]))


def _reduce_axes(b: GraphBuilder, node: onnx.NodeProto) -> list[int] | None:
    """Normalised reduced axes; ``None`` when the node is a no-op."""
    rank = b.rank(node.input[0])
    axes_in_input = b.opset >= (13 if node.op_type == "ReduceSum" else 18)
    if axes_in_input:
        axes = _static_ints(b, node, 1, "axes") if len(node.input) > 1 and node.input[1] else []
    else:
        axes = list(attribute(node, "axes", []) or [])
    if not axes:
        if attribute(node, "noop_with_empty_axes", 0):
            return None
        axes = list(range(rank))
    return sorted(a % rank for a in axes)


@vjp("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin")
def _reduce(b, node, dys, needs):
    x = node.input[0]
    axes = _reduce_axes(b, node)
    if axes is None:
        return [dys[0]] + [None] * (len(node.input) - 1)
    keep = attribute(node, "keepdims", 1)
    dy_keep = dys[0] if keep else b.unsqueeze(dys[0], axes)
    if node.op_type in ("ReduceMax", "ReduceMin"):
        y = b.as_float(node.output[0])
        y_keep = y if keep else b.unsqueeze(y, axes)
        grad = _max_mask_grad(b, b.as_float(x), y_keep, dy_keep, axes)
    else:
        grad = b.op("Expand", [dy_keep, b.shape_of(x)])
        if node.op_type == "ReduceMean":
            shape = b.static_shape(x)
            grad = b.mul(grad, b.scalar(1.0 / int(np.prod([shape[a] for a in axes]))))
    return [grad] + [None] * (len(node.input) - 1)


@dataclass(frozen=True)
class _Window:
    kernel: list[int]
    strides: list[int]
    dilations: list[int]
    pads: list[int]  # begin..., end...


def _window(b: GraphBuilder, node: onnx.NodeProto, kernel: Sequence[int]) -> _Window:
    x_shape = b.static_shape(node.input[0])
    y_shape = _out_shape(b, node)
    spatial = len(kernel)
    strides = list(attribute(node, "strides", None) or [1] * spatial)
    dilations = list(attribute(node, "dilations", None) or [1] * spatial)
    pads = list(attribute(node, "pads", None) or [0] * (2 * spatial))
    auto_pad = attribute(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        for i in range(spatial):
            size, out = x_shape[2 + i], y_shape[2 + i]
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
            small, large = total // 2, total - total // 2
            pads[i], pads[i + spatial] = (small, large) if auto_pad == "SAME_UPPER" else (large, small)
    elif auto_pad == "VALID":
        pads = [0] * (2 * spatial)
    return _Window(list(kernel), strides, dilations, pads)


def _transposed_window(
    b: GraphBuilder, node: onnx.NodeProto, win: _Window
) -> dict[str, list[int]]:
    """ConvTranspose attributes that map an output-shaped gradient back onto the input."""
    x_shape = b.static_shape(node.input[0])
    y_shape = _out_shape(b, node)
    spatial = len(win.kernel)
    begin, end, extra = list(win.pads[:spatial]), list(win.pads[spatial:]), [0] * spatial
    for i in range(spatial):
        span = (y_shape[2 + i] - 1) * win.strides[i] + (win.kernel[i] - 1) * win.dilations[i] + 1
        shortfall = x_shape[2 + i] - (span - begin[i] - end[i])
        if shortfall >= 0:
            # Input rows no window reached (floor mode) get zero gradient.
            take = min(shortfall, end[i])
            end[i] -= take
            extra[i] = shortfall - take
        else:
            # Windows past the padded end (ceil mode) are cropped off.
            end[i] -= shortfall
    return {
        "strides": win.strides,
        "dilations": win.dilations,
        "pads": begin + end,
        "output_padding": extra,
    }


@vjp("Conv", inputs=(0, 1, 2))
def _conv(b, node, dys, needs):
    if needs[1] or (len(needs) > 2 and needs[2]):
        raise _unsupported(node, "weights computed from the activations are not supported")
    weight = node.input[1]
    kernel = list(b.static_shape(weight)[2:])
    win = _window(b, node, kernel)
    attrs = _transposed_window(b, node, win)
    grad = b.op(
        "ConvTranspose",
        [dys[0], b.as_float(weight)],
        group=attribute(node, "group", 1),
        kernel_shape=kernel,
        **attrs,
    )
    return [grad] + [None] * (len(node.input) - 1)


@vjp("AveragePool")
def _average_pool(b, node, dys, needs):
    x = node.input[0]
    kernel = list(attribute(node, "kernel_shape"))
    win = _window(b, node, kernel)
    channels = b.static_shape(x)[1]
    divisor = _pool_divisors(b, node, win)
    ones = np.ones((channels, 1, *kernel), dtype=np.float32)
    scaled = b.op("Div", [dys[0], b.const(divisor, hint="pool_divisor")])
    grad = b.op(
        "ConvTranspose",
        [scaled, b.const(ones, hint="pool_ones")],
        group=channels,
        kernel_shape=kernel,
        **_transposed_window(b, node, win),
    )
    return [grad]


def _pool_divisors(b: GraphBuilder, node: onnx.NodeProto, win: _Window) -> np.ndarray:
    """The number each AveragePool output was divided by, read off ONNX Runtime itself.

    AveragePool(ones) = in_bounds / divisor, and in_bounds is plain window geometry, so
    the divisor follows without re-deriving ONNX Runtime's count_include_pad and ceil_mode
    conventions.
    """
    x_shape = b.static_shape(node.input[0])
    y_shape = _out_shape(b, node)
    spatial = len(win.kernel)
    probe_in = [1, 1, *x_shape[2:]]
    pool = helper.make_node(
        "AveragePool", ["x"], ["y"], **{a.name: helper.get_attribute_value(a) for a in node.attribute}
    )
    graph = helper.make_graph(
        [pool],
        "divisors",
        [helper.make_tensor_value_info("x", FLOAT, probe_in)],
        [helper.make_tensor_value_info("y", FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", b.opset)])
    model.ir_version = b.info.model.ir_version
    averaged = cpu_session(model).run(None, {"x": np.ones(probe_in, np.float32)})[0][0, 0]
    in_bounds = np.ones(y_shape[2:], dtype=np.float64)
    for i in range(spatial):
        starts = np.arange(y_shape[2 + i]) * win.strides[i] - win.pads[i]
        taps = starts[:, None] + np.arange(win.kernel[i])[None, :] * win.dilations[i]
        counts = ((taps >= 0) & (taps < x_shape[2 + i])).sum(axis=1)
        shape = [1] * spatial
        shape[i] = -1
        in_bounds = in_bounds * counts.reshape(shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        divisor = np.where(averaged > 0, in_bounds / averaged, 1.0)
    return divisor.astype(np.float32)[None, None]


@vjp("MaxPool")
def _max_pool(b, node, dys, needs):
    x = node.input[0]
    x_float = b.as_float(x)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    # The Indices output gives each window's gradient to its first maximum, as torch does.
    # The forward node is asked for it when it can give row-major indices; otherwise the
    # pooling is recomputed on a float32 copy.
    row_major = attrs.pop("storage_order", 0) == 0
    if row_major and len(node.output) > 1 and node.output[1]:
        indices = node.output[1]
    elif row_major and b.info.dtypes.get(x) == np.float32:
        indices = b.fresh("maxpool_indices")
        if len(node.output) > 1:
            node.output[1] = indices
        else:
            node.output.append(indices)
    else:
        _, indices = b.op("MaxPool", [x_float], n_out=2, **attrs)
    flat_size = b.op("Reshape", [b.op("Size", [x_float]), b.ints([1])])
    zeros = b.zeros_like_shape(flat_size)
    dy = dys[0]
    if b.opset >= 16:
        flat = b.op(
            "ScatterElements",
            [zeros, b.op("Reshape", [indices, b.ints([-1])]), b.op("Reshape", [dy, b.ints([-1])])],
            axis=0,
            reduction="add",
        )
        return [b.reshape_like(flat, x)]
    # No scatter-add before opset 16: split the windows into groups that cannot overlap,
    # scatter each group alone, and add the groups.
    win = _window(b, node, list(attrs["kernel_shape"]))
    steps = [
        max(1, math.ceil(((k - 1) * d + 1) / s))
        for k, d, s in zip(win.kernel, win.dilations, win.strides, strict=True)
    ]
    spatial_axes = list(range(2, 2 + len(steps)))
    partials = []
    for offsets in np.ndindex(*steps):
        picked = []
        for tensor in (indices, dy):
            picked.append(
                b.op(
                    "Slice",
                    [tensor, b.ints(offsets), b.ints([2**62] * len(steps)), b.ints(spatial_axes), b.ints(steps)],
                )
            )
        partials.append(
            b.op(
                "ScatterElements",
                [zeros, b.op("Reshape", [picked[0], b.ints([-1])]), b.op("Reshape", [picked[1], b.ints([-1])])],
                axis=0,
            )
        )
    return [b.reshape_like(b.sum_all(partials), x)]


# -- shape and layout ----------------------------------------------------------------------
@vjp("Flatten", "Reshape", "Squeeze", "Unsqueeze")
def _reshape(b, node, dys, needs):
    return [b.reshape_like(dys[0], node.input[0])] + [None] * (len(node.input) - 1)


@vjp("Identity", "Dropout", "Cast", "QuantizeLinear", "DequantizeLinear")
def _pass_through(b, node, dys, needs):
    # Cast: gradients stay float32. Q/DQ: the straight-through estimator.
    return [dys[0]] + [None] * (len(node.input) - 1)


@vjp("Transpose")
def _transpose(b, node, dys, needs):
    rank = b.rank(node.input[0])
    perm = list(attribute(node, "perm", None) or reversed(range(rank)))
    inverse = [0] * rank
    for i, p in enumerate(perm):
        inverse[p] = i
    return [b.op("Transpose", [dys[0]], perm=inverse)]


@vjp("Expand", inputs=(0,))
def _expand(b, node, dys, needs):
    return [b.unbroadcast(dys[0], _out_shape(b, node), node.input[0]), None]


# -- linear algebra ------------------------------------------------------------------------
@vjp("Gemm", inputs=(0, 1, 2))
def _gemm(b, node, dys, needs):
    alpha = attribute(node, "alpha", 1.0)
    beta = attribute(node, "beta", 1.0)
    trans_a = attribute(node, "transA", 0)
    trans_b = attribute(node, "transB", 0)
    a, w = b.as_float(node.input[0]), b.as_float(node.input[1])
    dy = dys[0]
    out: list[Grad] = [None] * len(node.input)
    if needs[0]:
        if trans_a:
            out[0] = b.op("Gemm", [w, dy], alpha=alpha, transA=trans_b, transB=1)
        else:
            out[0] = b.op("Gemm", [dy, w], alpha=alpha, transB=1 - trans_b)
    if needs[1]:
        if trans_b:
            out[1] = b.op("Gemm", [dy, a], alpha=alpha, transA=1, transB=trans_a)
        else:
            out[1] = b.op("Gemm", [a, dy], alpha=alpha, transA=1 - trans_a)
    if len(needs) > 2 and needs[2]:
        scaled = b.mul(dy, b.scalar(beta))
        out[2] = b.unbroadcast(scaled, _out_shape(b, node), node.input[2])
    return out


def _swap_last(b: GraphBuilder, x: str, rank: int) -> str:
    perm = list(range(rank))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    return b.op("Transpose", [x], perm=perm)


@vjp("MatMul", inputs=(0, 1))
def _matmul(b, node, dys, needs):
    a, w = node.input
    a_rank, w_rank = b.rank(a), b.rank(w)
    if a_rank < 2:
        raise _unsupported(node, "a 1-D left operand is not supported")
    dy = dys[0]
    out_shape = _out_shape(b, node)
    out: list[Grad] = [None, None]
    if w_rank == 1:
        dy_col = b.unsqueeze(dy, [len(out_shape)])
        if needs[0]:
            out[0] = b.unbroadcast(b.mul(dy_col, b.as_float(w)), (*out_shape, b.static_shape(w)[0]), a)
        if needs[1]:
            prod = b.mul(dy_col, b.as_float(a))
            out[1] = b.reduce("ReduceSum", prod, list(range(a_rank - 1)), keepdims=False)
        return out
    if needs[0]:
        grad = b.op("MatMul", [dy, _swap_last(b, b.as_float(w), w_rank)])
        shape = (*out_shape[:-1], b.static_shape(w)[-2])
        out[0] = b.unbroadcast(grad, shape, a)
    if needs[1]:
        grad = b.op("MatMul", [_swap_last(b, b.as_float(a), a_rank), dy])
        shape = (*out_shape[:-2], b.static_shape(a)[-1], out_shape[-1])
        out[1] = b.unbroadcast(grad, shape, w)
    return out


# -- normalisation -------------------------------------------------------------------------
@vjp("BatchNormalization")
def _batch_norm(b, node, dys, needs):
    if attribute(node, "training_mode", 0):
        raise _unsupported(node, "training_mode=1; export the model in eval mode")
    x = node.input[0]
    eps = attribute(node, "epsilon", 1e-5)
    scale, var = b.as_float(node.input[1]), b.as_float(node.input[4])
    factor = b.op("Div", [scale, b.op("Sqrt", [b.add(var, b.scalar(eps))])])
    per_channel = b.op("Reshape", [factor, b.ints([-1] + [1] * (b.rank(x) - 2))])
    return [b.mul(dys[0], per_channel)] + [None] * (len(node.input) - 1)


@vjp("LayerNormalization")
def _layer_norm(b, node, dys, needs):
    x = b.as_float(node.input[0])
    rank = b.rank(node.input[0])
    axis = attribute(node, "axis", -1) % rank
    eps = attribute(node, "epsilon", 1e-5)
    axes = list(range(axis, rank))
    centred = b.op("Sub", [x, b.reduce("ReduceMean", x, axes)])
    variance = b.reduce("ReduceMean", b.mul(centred, centred), axes)
    inv_std = b.op("Reciprocal", [b.op("Sqrt", [b.add(variance, b.scalar(eps))])])
    x_hat = b.mul(centred, inv_std)
    g = b.mul(dys[0], b.as_float(node.input[1]))
    mean_g = b.reduce("ReduceMean", g, axes)
    mean_gx = b.reduce("ReduceMean", b.mul(g, x_hat), axes)
    inner = b.op("Sub", [b.op("Sub", [g, mean_g]), b.mul(x_hat, mean_gx)])
    return [b.mul(inv_std, inner)] + [None] * (len(node.input) - 1)


# -- joining and selecting -----------------------------------------------------------------
@vjp("Concat", inputs=None)
def _concat(b, node, dys, needs):
    rank = b.rank(node.output[0])
    axis = attribute(node, "axis") % rank
    out: list[Grad] = []
    offset = 0
    for name, need in zip(node.input, needs, strict=True):
        size = b.static_shape(name)[axis]
        if need:
            out.append(
                b.op("Slice", [dys[0], b.ints([offset]), b.ints([offset + size]), b.ints([axis])])
            )
        else:
            out.append(None)
        offset += size
    return out


@vjp("Split")
def _split(b, node, dys, needs):
    rank = b.rank(node.input[0])
    axis = attribute(node, "axis", 0) % rank
    parts = []
    for name, dy in zip(node.output, dys, strict=True):
        parts.append(dy if dy is not None else b.zeros_like_shape(b.shape_of(name)))
    return [b.op("Concat", parts, axis=axis)] + [None] * (len(node.input) - 1)


def _scatter_through_index_map(b: GraphBuilder, node: onnx.NodeProto, dy: str, add: bool) -> str:
    """Gradient of a selection op: apply the op to a map of flat input positions, then
    scatter the output gradient back to the positions it selected."""
    x = node.input[0]
    size = b.op("Size", [x])
    positions = b.op("Range", [b.const(0, np.int64), size, b.const(1, np.int64)])
    index_map = b.op("Reshape", [positions, b.shape_of(x)])
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    selected = b.op(node.op_type, [index_map, *node.input[1:]], **attrs)
    zeros = b.zeros_like_shape(b.op("Reshape", [size, b.ints([1])]))
    scatter_attrs = {"reduction": "add"} if add else {}
    flat = b.op(
        "ScatterElements",
        [zeros, b.op("Reshape", [selected, b.ints([-1])]), b.op("Reshape", [dy, b.ints([-1])])],
        axis=0,
        **scatter_attrs,
    )
    return b.reshape_like(flat, x)


@vjp("Slice")
def _slice(b, node, dys, needs):
    # Slice never selects a position twice, so a plain scatter is exact at every opset.
    return [_scatter_through_index_map(b, node, dys[0], add=False)] + [None] * (len(node.input) - 1)


@vjp("Gather")
def _gather(b, node, dys, needs):
    if b.opset >= 16:
        # Scatter-add is exact for any indices, repeated or computed at run time
        # (the dynamo exporter writes as_strided as a Gather over batch-dependent indices).
        return [_scatter_through_index_map(b, node, dys[0], add=True), None]
    indices = b.info.static_value(node.input[1])
    if indices is None:
        raise _unsupported(node, "indices computed at run time need opset >= 16")
    indices = np.asarray(indices)
    if np.unique(indices).size == indices.size:
        return [_scatter_through_index_map(b, node, dys[0], add=False), None]
    return [_gather_by_one_hot(b, node, dys[0], indices), None]


def _gather_by_one_hot(b: GraphBuilder, node: onnx.NodeProto, dy: str, indices: np.ndarray) -> str:
    """Repeated constant indices before opset 16 (no scatter-add): contract the gradient
    with a constant (picks x positions) count matrix along the gathered axis."""
    x = node.input[0]
    x_shape = b.static_shape(x)
    axis = attribute(node, "axis", 0) % len(x_shape)
    if axis == 0:
        raise _unsupported(node, "gathering along the batch axis is not supported")
    dim = x_shape[axis]
    flat = np.where(indices < 0, indices + dim, indices).reshape(-1)
    counts = np.zeros((flat.size, dim), dtype=np.float32)
    np.add.at(counts, (np.arange(flat.size), flat), 1.0)
    # Collapse the index dims of dy into one axis (leading dims copied with 0), move it last.
    collapsed = [0] * axis + [flat.size] + list(x_shape[axis + 1 :])
    dy = b.op("Reshape", [dy, b.ints(collapsed)])
    rank = len(x_shape)
    to_last = [i for i in range(rank) if i != axis] + [axis]
    back = [to_last.index(i) for i in range(rank)]
    moved = b.op("Transpose", [dy], perm=to_last)
    summed = b.op("MatMul", [moved, b.const(counts, hint="gather_counts")])
    return b.op("Transpose", [summed], perm=back)


@vjp("Pad")
def _pad(b, node, dys, needs):
    mode = attribute(node, "mode", b"constant")
    if mode not in (b"constant", "constant"):
        raise _unsupported(node, f"mode {mode!r}; only constant padding is supported")
    # Padding by -p undoes padding by p for either sign: added borders are cropped off,
    # cropped borders come back as zeros (they received no gradient).
    if b.opset >= 11:
        pads = _static_ints(b, node, 1, "pads")
        extra = [node.input[3]] if len(node.input) > 3 and node.input[3] else []
        grad = b.op("Pad", [dys[0], b.ints([-p for p in pads]), b.scalar(0.0), *extra])
    else:
        grad = b.op("Pad", [dys[0]], pads=[-p for p in attribute(node, "pads")], value=0.0)
    return [grad] + [None] * (len(node.input) - 1)
