"""Vector-Jacobian product rules, one small function per ONNX op.

A rule receives the builder, the forward node, the output gradients ``dys`` (one per node
output, ``None`` where no gradient flows) and ``needs`` (which inputs need a gradient), and
returns one gradient tensor name (or ``None``) per node input. Rules emit standard
default-domain ONNX ops through :class:`~sp2ps_onnx.graph.builder.GraphBuilder`, which
speaks the graph's own opset. Gradients are float32; forward values are read through
``b.as_float``.

Adding an op: write one function, decorate it with ``@vjp("OpType", inputs=(...))`` naming
the inputs a gradient can flow into, add a finite-difference test, and list the op in
docs/ops.md (a test keeps the table and :data:`VJP_RULES` in step). ``@vjp`` registers the
function in :data:`VJP_RULES`, a :class:`~sp2ps_onnx.registry.Registry` like the CAM
methods' and the metric components'.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from ..errors import UnsupportedOpError
from ..registry import Registry
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
    domain: str = ""  # "" (ai.onnx) or "com.microsoft" for ONNX Runtime's contrib ops

    @classmethod
    def of(
        cls, op_type: str, fn: RuleFn | VJPRule, inputs: tuple[int, ...] | None = (0,),
        domain: str = "",
    ) -> VJPRule:
        """The registry entry for ``fn`` (a :class:`VJPRule` as it is)."""
        return fn if isinstance(fn, VJPRule) else cls(op_type, fn, inputs, domain)


#: op type -> its :class:`VJPRule`; filled by :func:`vjp`.
VJP_RULES: Registry[VJPRule] = Registry("op", entry=VJPRule.of)

# Outputs of these ops carry no gradient: shape arithmetic, comparisons, indices.
NON_DIFFERENTIABLE = frozenset(
    {
        "Shape", "Size", "ConstantOfShape", "Range", "Constant", "NonZero", "ArgMax",
        "ArgMin", "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Not", "And",
        "Or", "Xor", "Floor", "Ceil", "Round", "Sign", "EyeLike", "OneHot", "RandomNormal",
        "RandomUniform", "RandomNormalLike", "RandomUniformLike", "IsNaN", "IsInf",
    }
)  # fmt: skip


def vjp(*op_types: str, inputs: tuple[int, ...] | None = (0,), domain: str = ""):
    """Register ``fn`` as the VJP rule of ``op_types`` (in ``domain``)."""
    return VJP_RULES.register(*op_types, inputs=inputs, domain=domain)


def rule_for(node: onnx.NodeProto) -> VJPRule | None:
    """The rule for ``node``'s op in ``node``'s domain, if there is one.

    ONNX Runtime emits some QOperator ops (QLinearAdd, QGemm, ...) in com.microsoft and some
    (QLinearConv, QLinearMatMul) in the default domain; a rule declares which it covers.
    """
    rule = VJP_RULES.get(node.op_type, None)
    domain = "" if node.domain == "ai.onnx" else node.domain
    if rule is None or domain != rule.domain:
        return None
    return rule


def differentiable_inputs(node: onnx.NodeProto) -> list[int]:
    """Input positions of ``node`` through which a gradient can flow."""
    if node.op_type in NON_DIFFERENTIABLE:
        return []
    rule = rule_for(node)
    positions = range(len(node.input)) if rule is None or rule.inputs is None else rule.inputs
    return [i for i in positions if i < len(node.input) and node.input[i]]


# Ops that are piecewise linear in their inputs: a head made of them (and of the ops below
# with one input carrying the gradient) has a gradient that is piecewise constant in the
# layer, so its Hessian-vector product vanishes almost everywhere (ShapleyCAM's second-
# order term is then exactly 0, as torch autograd finds).
PIECEWISE_LINEAR_OPS = frozenset(
    {
        "Relu", "LeakyRelu", "PRelu", "Clip", "HardSigmoid", "Abs", "Neg", "Add", "Sub", "Sum",
        "Where", "GlobalAveragePool", "GlobalMaxPool", "AveragePool", "MaxPool", "ReduceMean",
        "ReduceSum", "ReduceMax", "ReduceMin", "Flatten", "Reshape", "Squeeze", "Unsqueeze",
        "Identity", "Dropout", "Cast", "QuantizeLinear", "DequantizeLinear",
        "DynamicQuantizeLinear", "Transpose", "Expand", "BatchNormalization", "Concat",
        "Split", "Slice", "Gather", "GatherND", "Pad", "Resize", "QLinearConcat",
        "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearLeakyRelu", "QLinearAdd",
    }
)  # fmt: skip
# Linear in each input: piecewise linear while only one input carries the gradient.
_MULTILINEAR_OPS = frozenset(
    {"Mul", "MatMul", "Gemm", "Conv", "ConvInteger", "MatMulInteger", "QLinearConv",
     "QLinearMatMul", "QGemm", "QLinearMul"}
)  # fmt: skip


def is_piecewise_linear(node: onnx.NodeProto, carrying: set[str]) -> bool:
    """Whether ``node``'s output is piecewise linear in its inputs in ``carrying`` (the
    tensors that depend on the layer), the others held fixed."""
    flowing = [node.input[i] for i in differentiable_inputs(node) if node.input[i] in carrying]
    if node.op_type in PIECEWISE_LINEAR_OPS:
        return True
    if node.op_type in _MULTILINEAR_OPS:
        return len(set(flowing)) <= 1 and len(flowing) <= 1
    if node.op_type == "Div":  # x / c is linear, c / x and x / y are not
        return node.input[1] not in carrying
    return False


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
    if b.guided_relu:
        return _guided_relu(b, positive, dys[0])
    return [b.mul(dys[0], _mask(b, positive))]


def _guided_relu(b: GraphBuilder, positive: str, dy: str) -> list[Grad]:
    """Guided Backprop's ReLU (Springenberg et al. 2015): the gradient passes only where the
    forward input and the incoming gradient are both positive."""
    b.guided_relus += 1
    passing = b.op("And", [positive, b.op("Greater", [dy, b.scalar(0.0)])])
    return [b.mul(dy, _mask(b, passing))]


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
    # Scaling before spreading multiplies N*C values instead of N*C*H*W.
    scaled = b.mul(dys[0], b.scalar(1.0 / count))
    return [b.op("Expand", [scaled, b.shape_of(x)])]


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
        if node.op_type == "ReduceMean":
            shape = b.static_shape(x)
            dy_keep = b.mul(dy_keep, b.scalar(1.0 / int(np.prod([shape[a] for a in axes]))))
        grad = b.op("Expand", [dy_keep, b.shape_of(x)])
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
    grad = _conv_input_grad(b, node, dys[0], b.as_float(weight), weight)
    return [grad] + [None] * (len(node.input) - 1)


def _conv_input_grad(
    b: GraphBuilder, node: onnx.NodeProto, dy: str, weight: str, weight_source: str
) -> str:
    """The gradient of a convolution (Conv, QLinearConv, ConvInteger) w.r.t. its input:
    ``ConvTranspose`` of ``dy`` with the float ``weight`` (of the shape of the node's
    ``weight_source`` input) and the node's own window."""
    kernel = list(b.static_shape(weight_source)[2:])
    win = _window(b, node, kernel)
    return b.op(
        "ConvTranspose",
        [dy, weight],
        group=attribute(node, "group", 1),
        kernel_shape=kernel,
        **_transposed_window(b, node, win),
    )


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


@vjp("Identity", "Dropout", "Cast", "DequantizeLinear")
def _pass_through(b, node, dys, needs):
    # Cast: gradients stay float32. DQ: the straight-through estimator.
    return [dys[0]] + [None] * (len(node.input) - 1)


# Ops whose output can be negative: a QuantizeLinear right after one that clamps at 0 is a
# ReLU fused into the quantization (ONNX Runtime's QDQ quantizer drops the Relu node).
_SIGNED_PRODUCERS = frozenset({"Conv", "Gemm", "MatMul", "Add", "Sub", "BatchNormalization"})


@vjp("QuantizeLinear")
def _quantize_linear(b, node, dys, needs):
    """The straight-through estimator, except at a ReLU fused into the quantization (ONNX
    Runtime's QDQ quantizer drops a Relu whose output range starts at 0): there the
    gradient passes only where x > 0, as through the ReLU it replaces. Other clamps (at
    the calibrated range's ends) pass the gradient: a sample beyond the calibration data
    keeps its explanation."""
    if not is_fused_relu(b, node):
        return [dys[0]] + [None] * (len(node.input) - 1)
    positive = b.op("Greater", [b.as_float(node.input[0]), b.scalar(0.0)])
    grad = _guided_relu(b, positive, dys[0])[0] if b.guided_relu else b.mul(dys[0], _mask(b, positive))
    return [grad] + [None] * (len(node.input) - 1)


def is_fused_relu(b: GraphBuilder, node: onnx.NodeProto) -> bool:
    """Whether a QuantizeLinear clamps at exactly 0 a value that can be negative (a ReLU
    fused into the quantization)."""
    if node.op_type != "QuantizeLinear":
        return False
    if len(node.input) > 2 and node.input[2]:
        zero = b.info.static_value(node.input[2])
        if zero is None or not np.issubdtype(np.asarray(zero).dtype, np.integer):
            return False
        zero = np.asarray(zero)
        if not (zero == np.iinfo(zero.dtype).min).all():
            return False
    else:  # no zero point: 0, in uint8 unless output_dtype says otherwise
        to = attribute(node, "output_dtype", 0)
        dtype = helper.tensor_dtype_to_np_dtype(to) if to else np.dtype(np.uint8)
        if not np.issubdtype(dtype, np.integer) or np.iinfo(dtype).min != 0:
            return False
    producer = b.info.producer.get(node.input[0])
    return producer is not None and b.info.node(producer).op_type in _SIGNED_PRODUCERS


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
    mode = mode.decode() if isinstance(mode, bytes) else mode
    rest = [None] * (len(node.input) - 1)
    if b.opset < 11:
        pads = list(attribute(node, "pads"))
    elif mode == "constant" and b.info.static_value(node.input[1]) is None:
        # Pads computed at run time (TF-"SAME" padding): negate them in the graph.
        negated = b.op("Neg", [node.input[1]])
        extra = [node.input[3]] if len(node.input) > 3 and node.input[3] else []
        return [b.op("Pad", [dys[0], negated, b.scalar(0.0), *extra])] + rest
    else:
        pads = _static_ints(b, node, 1, "pads")
    rank = b.rank(node.input[0])
    if b.opset >= 11 and len(node.input) > 3 and node.input[3]:
        axes = [a % rank for a in _static_ints(b, node, 3, "axes")]
    else:
        axes = list(range(rank))
    count = len(axes)
    begins, ends = pads[:count], pads[count:]
    if mode == "constant":
        # Padding by -p undoes padding by p for either sign: added borders are cropped off,
        # cropped borders come back as zeros (they received no gradient).
        full = [0] * (2 * rank)
        for a, lo, hi in zip(axes, begins, ends, strict=True):
            full[a], full[a + rank] = -lo, -hi
        if b.opset >= 11:
            return [b.op("Pad", [dys[0], b.ints(full), b.scalar(0.0)])] + rest
        return [b.op("Pad", [dys[0]], pads=full, value=0.0)]
    if mode not in ("reflect", "edge", "wrap"):
        raise _unsupported(node, f"mode {mode!r}")
    # reflect/edge/wrap: each padded axis is a constant 0/1 matrix M (out x in) applied along
    # that axis, so the gradient applies M transposed along the same axis.
    grad = dys[0]
    shape = list(b.static_shape(node.input[0]))
    for a, lo, hi in zip(axes, begins, ends, strict=True):
        if lo == 0 and hi == 0:
            continue
        if a == 0:
            raise _unsupported(node, "padding along the batch axis")
        matrix = _pad_matrix(shape[a], lo, hi, mode)
        grad = _along_axis(b, grad, matrix.T, a, rank)
    return [grad] + rest


def _pad_matrix(size: int, begin: int, end: int, mode: str) -> np.ndarray:
    """M with padded = M @ x along one axis, for reflect/edge/wrap padding (numpy's modes)."""
    numpy_mode = {"reflect": "reflect", "edge": "edge", "wrap": "wrap"}[mode]
    positions = np.arange(size)
    padded = np.pad(positions, (max(begin, 0), max(end, 0)), mode=numpy_mode)
    padded = padded[max(-begin, 0) : len(padded) - max(-end, 0)]
    matrix = np.zeros((padded.size, size), dtype=np.float32)
    matrix[np.arange(padded.size), padded] = 1.0
    return matrix


def _along_axis(b: GraphBuilder, x: str, matrix: np.ndarray, axis: int, rank: int) -> str:
    """``matrix @ x`` along ``axis`` (matrix: new size x old size) for a rank-``rank`` x."""
    to_last = [i for i in range(rank) if i != axis] + [axis]
    back = [to_last.index(i) for i in range(rank)]
    moved = b.op("Transpose", [x], perm=to_last)
    product = b.op("MatMul", [moved, b.const(np.ascontiguousarray(matrix.T), hint="axis_matrix")])
    return b.op("Transpose", [product], perm=back)


# -- resampling and normalisation (earlier layers) ------------------------------------------
@vjp("Resize")
def _resize(b, node, dys, needs):
    """Every Resize mode is separable and linear in x: one matrix per resized axis, read off
    ONNX Runtime by resizing the identity along that axis alone."""
    mode = attribute(node, "mode", b"nearest")
    transform = attribute(node, "coordinate_transformation_mode", b"half_pixel")
    if transform in (b"tf_crop_and_resize", "tf_crop_and_resize"):
        raise _unsupported(node, "coordinate_transformation_mode tf_crop_and_resize")
    policy = attribute(node, "keep_aspect_ratio_policy", b"stretch")
    if policy not in (b"stretch", "stretch"):
        raise _unsupported(node, f"keep_aspect_ratio_policy {policy!r}")
    x_shape = list(b.static_shape(node.input[0]))
    y_shape = list(_out_shape(b, node))
    rank = len(x_shape)
    scales = None
    if len(node.input) > 2 and node.input[2]:
        value = b.info.static_value(node.input[2])
        if value is None:
            raise _unsupported(node, f"its scales input {node.input[2]!r} is computed at run time")
        scales = [float(v) for v in np.asarray(value).reshape(-1)]
        if not scales:
            scales = None
    axes = list(attribute(node, "axes", None) or range(rank))
    if scales is not None and len(scales) != rank:
        full = [1.0] * rank
        for a, v in zip(axes, scales, strict=True):
            full[a % rank] = v
        scales = full
    grad = dys[0]
    for axis in range(rank):
        scale = scales[axis] if scales is not None else None
        if x_shape[axis] == y_shape[axis] and (scale is None or scale == 1.0):
            continue
        if axis < 2:
            raise _unsupported(node, "resizing along the batch or channel axis")
        matrix = _resize_matrix(b, node, rank, axis, x_shape[axis], y_shape[axis], scale, mode)
        grad = _along_axis(b, grad, matrix.T, axis, rank)
    return [grad] + [None] * (len(node.input) - 1)


def _resize_matrix(b, node, rank, axis, size_in, size_out, scale, mode) -> np.ndarray:
    """The (size_out x size_in) matrix of ``node``'s interpolation along ``axis``."""
    attrs = {
        a.name: helper.get_attribute_value(a)
        for a in node.attribute
        if a.name not in ("axes", "keep_aspect_ratio_policy")
    }
    shape_in = [1] * rank
    shape_in[0], shape_in[axis] = size_in, size_in
    inputs = ["x", "", ""]
    initializers = []
    if scale is not None:
        full = np.ones(rank, dtype=np.float32)
        full[axis] = scale
        initializers.append(onnx.numpy_helper.from_array(full, "scales"))
        inputs[2] = "scales"
    else:
        sizes = np.array(shape_in, dtype=np.int64)
        sizes[axis] = size_out
        initializers.append(onnx.numpy_helper.from_array(sizes, "sizes"))
        inputs = ["x", "", "", "sizes"]
    if b.opset < 13 and inputs[1] == "":
        initializers.append(onnx.numpy_helper.from_array(np.zeros(0, np.float32), "roi"))
        inputs[1] = "roi"
        if inputs[2] == "":
            initializers.append(onnx.numpy_helper.from_array(np.zeros(0, np.float32), "no_scales"))
            inputs[2] = "no_scales"
    resize = helper.make_node("Resize", inputs, ["y"], **attrs)
    graph = helper.make_graph(
        [resize],
        "resize_matrix",
        [helper.make_tensor_value_info("x", FLOAT, shape_in)],
        [helper.make_tensor_value_info("y", FLOAT, None)],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", b.opset)])
    model.ir_version = b.info.model.ir_version
    basis = np.eye(size_in, dtype=np.float32).reshape(shape_in)
    resized = cpu_session(model).run(None, {"x": basis})[0]
    if resized.shape[axis] != size_out:
        raise _unsupported(node, f"could not reproduce its output size along axis {axis}")
    # resized[k, ..., j, ...] = M[j, k]
    return np.moveaxis(resized, axis, 1).reshape(size_in, size_out).T.copy()


@vjp("InstanceNormalization")
def _instance_norm(b, node, dys, needs):
    x = b.as_float(node.input[0])
    rank = b.rank(node.input[0])
    eps = attribute(node, "epsilon", 1e-5)
    scale = b.op("Reshape", [b.as_float(node.input[1]), b.ints([-1] + [1] * (rank - 2))])
    return [_normalised_grad(b, x, dys[0], scale, list(range(2, rank)), eps), None, None]


def _normalised_grad(b: GraphBuilder, x: str, dy: str, scale: str, axes: list[int], eps: float) -> str:
    """Gradient of ``scale * (x - mean) / sqrt(var + eps) + bias`` over ``axes``."""
    centred = b.op("Sub", [x, b.reduce("ReduceMean", x, axes)])
    variance = b.reduce("ReduceMean", b.mul(centred, centred), axes)
    inv_std = b.op("Reciprocal", [b.op("Sqrt", [b.add(variance, b.scalar(eps))])])
    x_hat = b.mul(centred, inv_std)
    g = b.mul(dy, scale)
    mean_g = b.reduce("ReduceMean", g, axes)
    mean_gx = b.reduce("ReduceMean", b.mul(g, x_hat), axes)
    inner = b.op("Sub", [b.op("Sub", [g, mean_g]), b.mul(x_hat, mean_gx)])
    return b.mul(inv_std, inner)


@vjp("ReduceL2")
def _reduce_l2(b, node, dys, needs):
    x = b.as_float(node.input[0])
    axes = _reduce_axes(b, node)
    rest = [None] * (len(node.input) - 1)
    if axes is None:
        return [dys[0]] + rest
    keep = attribute(node, "keepdims", 1)
    y = b.as_float(node.output[0])
    y_keep = y if keep else b.unsqueeze(y, axes)
    dy_keep = dys[0] if keep else b.unsqueeze(dys[0], axes)
    # d||x|| / dx = x / ||x||, and 0 where the norm is 0 (as torch.linalg.vector_norm).
    positive = b.op("Greater", [y_keep, b.scalar(0.0)])
    safe = b.op("Where", [positive, y_keep, b.scalar(1.0)])
    ratio = b.op("Where", [positive, b.op("Div", [dy_keep, safe]), b.scalar(0.0)])
    return [b.mul(x, ratio)] + rest


@vjp("GatherND")
def _gather_nd(b, node, dys, needs):
    if b.opset >= 16:
        return [_scatter_through_index_map(b, node, dys[0], add=True), None]
    indices = b.info.static_value(node.input[1])
    if indices is None:
        raise _unsupported(node, "indices computed at run time need opset >= 16")
    # Unique positions: a plain scatter is exact. Repeated ones need scatter-add (opset 16).
    probe = _gathered_positions(b, node, np.asarray(indices))
    if np.unique(probe).size != probe.size:
        raise _unsupported(node, "repeated indices need opset >= 16")
    return [_scatter_through_index_map(b, node, dys[0], add=False), None]


def _gathered_positions(b: GraphBuilder, node: onnx.NodeProto, indices: np.ndarray) -> np.ndarray:
    shape = b.static_shape(node.input[0])
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    positions = np.arange(int(np.prod(shape))).reshape(shape)
    graph = helper.make_graph(
        [helper.make_node("GatherND", ["x", "i"], ["y"], **attrs)],
        "positions",
        [
            helper.make_tensor_value_info("x", onnx.TensorProto.INT64, list(shape)),
            helper.make_tensor_value_info("i", onnx.TensorProto.INT64, list(indices.shape)),
        ],
        [helper.make_tensor_value_info("y", onnx.TensorProto.INT64, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", b.opset)])
    model.ir_version = b.info.model.ir_version
    return cpu_session(model).run(None, {"x": positions, "i": indices.astype(np.int64)})[0]


# -- quantized ops: straight-through ---------------------------------------------------------
# The gradient of a quantized op is that of its dequantized float equivalent: the rounding
# to integer codes is treated as the identity (straight-through estimator). Gradients of
# integer activations are taken w.r.t. their dequantized values, ``(q - zp) * scale``.


def _dequantized_weight(b: GraphBuilder, node: onnx.NodeProto, codes: int, scale: int, zero: int, axis: int) -> str:
    zp = node.input[zero] if len(node.input) > zero and node.input[zero] else None
    return b.dequantize(node.input[codes], node.input[scale], zp, axis=axis)


@vjp("DynamicQuantizeLinear")
def _dynamic_quantize(b, node, dys, needs):
    # Only y carries a gradient; its scale and zero point are treated as constants.
    return [dys[0]]


@vjp("ConvInteger", inputs=(0,))
def _conv_integer(b, node, dys, needs):
    # y = conv(x - x_zp, w - w_zp) in integer units = conv(deq(x), w - w_zp) / x_scale.
    weight = _integer_operand(b, node, 1, 3, axis=0)
    grad = _conv_input_grad(b, node, dys[0], weight, node.input[1])
    return [_per_code_unit(b, node.input[0], grad)] + [None] * (len(node.input) - 1)


@vjp("MatMulInteger", inputs=(0,))
def _matmul_integer(b, node, dys, needs):
    weight = _integer_operand(b, node, 1, 3, axis=-1)
    grad = _matmul_left_grad(b, node, dys[0], weight, node.input[1])
    return [_per_code_unit(b, node.input[0], grad)] + [None] * (len(node.input) - 1)


def _integer_operand(b: GraphBuilder, node: onnx.NodeProto, position: int, zero: int, axis: int) -> str:
    """``w - w_zp`` in float32 (integer units) for a ConvInteger/MatMulInteger operand."""
    codes = b.info.static_value(node.input[position])
    zp_name = node.input[zero] if len(node.input) > zero and node.input[zero] else None
    zp = b.info.static_value(zp_name) if zp_name else 0
    if codes is None or zp is None:
        raise _unsupported(node, "weights computed at run time are not supported")
    codes = np.asarray(codes)
    return b.const(_minus_zero_point(codes, np.asarray(zp), axis), hint="integer_weight")


def _minus_zero_point(codes: np.ndarray, zero: np.ndarray, axis: int) -> np.ndarray:
    zero = zero.astype(np.float64)
    if zero.size > 1:
        shape = [1] * codes.ndim
        shape[axis % codes.ndim] = -1
        zero = zero.reshape(shape)
    return (codes.astype(np.float64) - zero).astype(np.float32)


def _per_code_unit(b: GraphBuilder, x: str, grad: str) -> str:
    """Turn a gradient w.r.t. integer codes into one w.r.t. their dequantized values."""
    params = b.info.quant_params.get(x)
    if params is None:
        return grad  # plain integers: the codes are the values
    return b.op("Div", [grad, b.op("Cast", [params[0]], to=FLOAT)])


def _matmul_left_grad(
    b: GraphBuilder, node: onnx.NodeProto, dy: str, weight: str, weight_source: str
) -> str:
    """d(A @ W)/dA for a constant float32 W of rank 2 (shaped like ``weight_source``)."""
    a = node.input[0]
    if b.rank(weight_source) != 2:
        raise _unsupported(node, "only a 2-D constant right operand is supported")
    grad = b.op("MatMul", [dy, b.op("Transpose", [weight], perm=[1, 0])])
    shape = (*_out_shape(b, node)[:-1], b.static_shape(weight_source)[0])
    return b.unbroadcast(grad, shape, a)


@vjp("QLinearConv", inputs=(0,))
def _qlinear_conv(b, node, dys, needs):
    weight = _dequantized_weight(b, node, 3, 4, 5, axis=0)
    dy = _inside_output_range(b, node, dys[0], lambda: _qlinear_conv_float(b, node, weight), 6, 7)
    return [_conv_input_grad(b, node, dy, weight, node.input[3])] + [None] * (len(node.input) - 1)


def _qlinear_conv_float(b: GraphBuilder, node: onnx.NodeProto, weight: str) -> str:
    """The QLinearConv's output before its quantization, in float32: the same convolution
    of the dequantized input, weights and bias (int32, scale x_scale * w_scale)."""
    inputs = [b.as_float(node.input[0]), weight]
    if len(node.input) > 8 and node.input[8]:
        x_scale, w_scale, bias = (b.info.static_value(node.input[i]) for i in (1, 4, 8))
        if x_scale is None or w_scale is None or bias is None:
            raise _unsupported(node, "its scales or bias are computed at run time")
        value = np.asarray(bias, np.float64) * float(np.asarray(x_scale)) * np.asarray(w_scale, np.float64)
        inputs.append(b.const(value.reshape(-1), hint="dequantized_bias"))
    out = b.fresh("qlinearconv_float")
    conv = helper.make_node("Conv", inputs, [out], name=b.fresh("node_Conv"))
    conv.attribute.extend(node.attribute)
    b.nodes.append(conv)
    return out


def _inside_output_range(
    b: GraphBuilder, node: onnx.NodeProto, dy: str, pre_activation, scale: int, zero: int
) -> str:
    """``dy`` of a QLinear op, stopped where a ReLU fused into its output quantization (zero
    point at the lowest code) clamps the float result ``pre_activation()`` (emitted only
    then) at 0, as the ReLU did; Guided Backprop also drops negative ``dy`` there. Other
    outputs: the straight-through estimator."""
    del scale  # the clamp at 0 does not depend on the scale
    y_zero = b.info.static_value(node.input[zero]) if len(node.input) > zero and node.input[zero] else None
    if y_zero is None or not np.issubdtype(np.asarray(y_zero).dtype, np.integer):
        return dy
    y_zero = np.asarray(y_zero)
    if not (y_zero == np.iinfo(y_zero.dtype).min).all():
        return dy
    positive = b.op("Greater", [pre_activation(), b.scalar(0.0)])
    if b.guided_relu:
        return _guided_relu(b, positive, dy)[0]
    return b.mul(dy, _mask(b, positive))


@vjp("QLinearMatMul", inputs=(0, 3))
def _qlinear_matmul(b, node, dys, needs):
    out: list[Grad] = [None] * len(node.input)
    a = b.as_float(node.input[0])
    w = b.as_float(node.input[3]) if needs[3] else _dequantized_weight(b, node, 3, 4, 5, axis=-1)
    if needs[0]:
        grad = b.op("MatMul", [dys[0], _swap_last(b, w, b.rank(node.input[3]))])
        shape = (*_out_shape(b, node)[:-1], b.static_shape(node.input[3])[-2])
        out[0] = b.unbroadcast(grad, shape, node.input[0])
    if needs[3]:
        grad = b.op("MatMul", [_swap_last(b, a, b.rank(node.input[0])), dys[0]])
        shape = (*_out_shape(b, node)[:-2], b.static_shape(node.input[0])[-1], _out_shape(b, node)[-1])
        out[3] = b.unbroadcast(grad, shape, node.input[3])
    return out


@vjp("QGemm", inputs=(0,), domain="com.microsoft")
def _qgemm(b, node, dys, needs):
    alpha = attribute(node, "alpha", 1.0)
    trans_a = attribute(node, "transA", 0)
    trans_b = attribute(node, "transB", 0)
    w = _dequantized_weight(b, node, 3, 4, 5, axis=0 if trans_b else -1)
    if trans_a:
        grad = b.op("Gemm", [w, dys[0]], alpha=alpha, transA=trans_b, transB=1)
    else:
        grad = b.op("Gemm", [dys[0], w], alpha=alpha, transB=1 - trans_b)
    return [grad] + [None] * (len(node.input) - 1)


@vjp("QLinearAdd", inputs=(0, 3), domain="com.microsoft")
def _qlinear_add(b, node, dys, needs):
    shape = _out_shape(b, node)
    out: list[Grad] = [None] * len(node.input)
    total = lambda: b.add(_quantized_operand(b, node, 0), _quantized_operand(b, node, 3))  # noqa: E731
    dy = _inside_output_range(b, node, dys[0], total, 6, 7)
    for position in (0, 3):
        if needs[position]:
            out[position] = b.unbroadcast(dy, shape, node.input[position])
    return out


@vjp("QLinearMul", inputs=(0, 3), domain="com.microsoft")
def _qlinear_mul(b, node, dys, needs):
    shape = _out_shape(b, node)
    out: list[Grad] = [None] * len(node.input)
    for position, other in ((0, 3), (3, 0)):
        if needs[position]:
            factor = _quantized_operand(b, node, other)
            out[position] = b.unbroadcast(b.mul(dys[0], factor), shape, node.input[position])
    return out


def _quantized_operand(b: GraphBuilder, node: onnx.NodeProto, position: int) -> str:
    """The dequantized value of a QLinear binary op's operand (activation or constant)."""
    name = node.input[position]
    if name in b.info.quant_params:
        return b.as_float(name)
    return _dequantized_weight(b, node, position, position + 1, position + 2, axis=1)


@vjp("QLinearGlobalAveragePool", domain="com.microsoft")
def _qlinear_global_average_pool(b, node, dys, needs):
    x = node.input[0]
    shape = b.static_shape(x)
    spatial = shape[1:-1] if attribute(node, "channels_last", 0) else shape[2:]
    scaled = b.mul(dys[0], b.scalar(1.0 / int(np.prod(spatial))))
    return [b.op("Expand", [scaled, b.shape_of(x)])] + [None] * 4


@vjp("QLinearAveragePool", domain="com.microsoft")
def _qlinear_average_pool(b, node, dys, needs):
    if attribute(node, "channels_last", 0):
        raise _unsupported(node, "channels_last=1")
    float_pool = helper.make_node(
        "AveragePool",
        [node.input[0]],
        [node.output[0]],
        name=node.name,
        **{a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "channels_last"},
    )
    return _average_pool(b, float_pool, dys, [True]) + [None] * 4


@vjp("QLinearSigmoid", domain="com.microsoft")
def _qlinear_sigmoid(b, node, dys, needs):
    y = b.as_float(node.output[0])
    return [b.mul(dys[0], b.mul(y, b.op("Sub", [b.scalar(1.0), y])))] + [None] * 4


@vjp("QLinearLeakyRelu", domain="com.microsoft")
def _qlinear_leaky_relu(b, node, dys, needs):
    alpha = attribute(node, "alpha", 0.01)
    positive = b.op("Greater", [b.as_float(node.input[0]), b.scalar(0.0)])
    slope = b.op("Where", [positive, b.scalar(1.0), b.scalar(alpha)])
    return [b.mul(dys[0], slope)] + [None] * 4


@vjp("QLinearConcat", inputs=None, domain="com.microsoft")
def _qlinear_concat(b, node, dys, needs):
    rank = b.rank(node.output[0])
    axis = attribute(node, "axis") % rank
    out: list[Grad] = [None] * len(node.input)
    offset = 0
    for position in range(2, len(node.input), 3):
        size = b.static_shape(node.input[position])[axis]
        if needs[position]:
            out[position] = b.op(
                "Slice", [dys[0], b.ints([offset]), b.ints([offset + size]), b.ints([axis])]
            )
        offset += size
    return out
