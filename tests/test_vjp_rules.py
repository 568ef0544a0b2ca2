"""Every gradient rule against central finite differences computed by ONNX Runtime.

Each case is a small hand-built graph: the graph input ``X`` (N, C, H, W) with a dynamic batch
is the CAM layer, then the op under test, then a fixed linear glue head (Flatten → Gemm) to
an (N, K) score. The reference is a central finite difference of ``score[n, target[n]]`` with
respect to every element of ``X``, computed by ONNX Runtime on the ORIGINAL graph (all the
perturbed copies go through one batched run, which is valid because no op here mixes samples).

Precision of the reference:
- float64 graph when ONNX Runtime's CPU kernels accept double for every op of the case:
  eps = 1e-6, tolerance ``max|g - fd| <= 2e-4 * max|fd|`` (the engine itself runs float32);
- otherwise a float32 graph: eps = 2e-3, tolerance ``max|g - fd| <= 1e-2 * max|fd|`` (rounding
  error of a float32 difference quotient is about 1e-7 * |score| / eps).
Inputs are distinct values on a 0.02 grid (no value within 0.01 of 0 or of another value), so
no perturbation crosses a ReLU kink, a Clip bound or a max-pooling tie.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sp2ps_onnx import CamModel, UnsupportedOpError

OPSETS = (11, 13, 17, 21)
N, C, H, W = 2, 3, 5, 6
K = 4
TARGETS = np.array([1, 3], dtype=np.int64)
GRID_SPACING = 0.02
EPS_DOUBLE, TOL_DOUBLE = 1e-6, 2e-4
EPS_FLOAT, TOL_FLOAT = 2e-3, 1e-2
MS = "com.microsoft"

_NP_OF = {
    TensorProto.FLOAT: np.float32,
    TensorProto.DOUBLE: np.float64,
    TensorProto.FLOAT16: np.float16,
}


class Builder:
    """Appends nodes and initializers of one float element type to a graph under construction."""

    def __init__(self, elem_type: int, opset: int) -> None:
        self.elem_type = elem_type
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    @property
    def np_dtype(self) -> type:
        return _NP_OF[self.elem_type]

    def _name(self, stem: str) -> str:
        self._count += 1
        return f"{stem}_{self._count}"

    def const(self, value, name: str | None = None) -> str:
        """A float initializer in the graph's element type."""
        name = name or self._name("c")
        array = np.asarray(value, dtype=np.float64).astype(self.np_dtype)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def ints(self, value, name: str | None = None) -> str:
        """An int64 initializer (shapes, axes, indices)."""
        name = name or self._name("i")
        self.initializers.append(numpy_helper.from_array(np.asarray(value, np.int64), name))
        return name

    def raw(self, array: np.ndarray, name: str | None = None) -> str:
        """An initializer with the array's own dtype (quantized weights, scales)."""
        name = name or self._name("r")
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: int = 1, **attrs) -> list[str]:
        names = [self._name(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(
            helper.make_node(op_type, inputs, names, name=self._name(f"node_{op_type}"), **attrs)
        )
        return names

    def one(self, op_type: str, inputs: list[str], **attrs) -> str:
        return self.op(op_type, inputs, 1, **attrs)[0]

    def axes(self, op_type: str, data: str, axes: list[int], input_from: int, **attrs) -> str:
        """``op_type`` with ``axes`` as an input from opset ``input_from``, else an attribute."""
        if self.opset >= input_from:
            return self.one(op_type, [data, self.ints(axes)], **attrs)
        return self.one(op_type, [data], axes=axes, **attrs)


Body = Callable[[Builder, str], str]


@dataclass
class Case:
    """One graph under test: ``body`` maps the layer X to the tensor that the glue head reads."""

    id: str
    body: Body
    min_opset: int = 1
    max_opset: int = 1000
    #: A different body for the finite-difference reference (straight-through ops).
    reference_body: Body | None = None
    scale: float = 1.0
    offset: float = 0.0
    opsets: tuple[int, ...] = field(default=OPSETS)
    #: Extra tolerance where the rule reads quantized forward values (straight-through).
    tolerance: float | None = None


def _minimal_ir_version(opset: int) -> int:
    return max(7, helper.find_min_ir_version_for([helper.make_opsetid("", opset)]))


def build_model(
    body: Body, opset: int, elem_type: int = TensorProto.FLOAT
) -> onnx.ModelProto:
    """The case's graph: X → body → Flatten → Gemm (fixed random weights) → ``score``."""
    builder = Builder(elem_type, opset)
    out = body(builder, "X")
    x_info = helper.make_tensor_value_info("X", elem_type, ["N", C, H, W])
    probe = _make_model(builder, x_info, out, opset, elem_type, shape=None)
    sample = _distinct_input((N, C, H, W)).astype(_NP_OF[elem_type])
    feature_shape = _session(probe).run(None, {"X": sample})[0].shape
    assert feature_shape[0] == N, "the body must keep the batch as its first axis"
    features = int(np.prod(feature_shape[1:]))
    flat = builder.one("Flatten", [out], axis=1)
    glue_rng = np.random.default_rng(11)
    weight = builder.const(glue_rng.standard_normal((features, K)) / np.sqrt(features))
    bias = builder.const(glue_rng.standard_normal(K))
    builder.nodes.append(helper.make_node("Gemm", [flat, weight, bias], ["score"], name="glue_gemm"))
    return _make_model(builder, x_info, "score", opset, elem_type, shape=["N", K])


def _make_model(builder, x_info, out, opset, elem_type, shape) -> onnx.ModelProto:
    y_info = helper.make_tensor_value_info(out, elem_type, shape)
    graph = helper.make_graph(
        list(builder.nodes), "case", [x_info], [y_info], list(builder.initializers)
    )
    imports = [helper.make_opsetid("", opset)]
    if any(node.domain == MS for node in builder.nodes):
        imports.append(helper.make_opsetid(MS, 1))
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = _minimal_ir_version(opset)
    return model


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    # Disable graph optimizations so the reference runs the ops exactly as written.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _distinct_input(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Distinct values on a GRID_SPACING grid, symmetric around 0, shuffled."""
    count = int(np.prod(shape))
    values = (np.arange(count) - (count - 1) / 2.0) * GRID_SPACING
    return np.random.default_rng(seed).permutation(values).reshape(shape)


def _reference_session(body: Body, opset: int) -> tuple[ort.InferenceSession, int]:
    """A session of the graph in float64 when ORT can run it, else in float32."""
    try:
        model = build_model(body, opset, TensorProto.DOUBLE)
        session = _session(model)
        session.run(None, {"X": _distinct_input((1, C, H, W))})
        return session, TensorProto.DOUBLE
    except Exception:  # ORT has no double kernel for some op of the case
        return _session(build_model(body, opset, TensorProto.FLOAT)), TensorProto.FLOAT


def finite_difference_gradient(
    session: ort.InferenceSession, x: np.ndarray, targets: np.ndarray, eps: float
) -> np.ndarray:
    """Central differences of score[n, targets[n]] w.r.t. every element of x[n], batched."""
    batch, *sample_shape = x.shape
    size = int(np.prod(sample_shape))
    flat = x.reshape(batch, size)
    rows = np.repeat(flat, 2 * size, axis=0).reshape(batch, size, 2, size)
    index = np.arange(size)
    rows[:, index, 0, index] += eps
    rows[:, index, 1, index] -= eps
    feed = rows.reshape(batch * size * 2, *sample_shape)
    scores = session.run(None, {"X": feed})[0].reshape(batch, size, 2, -1)
    picked = scores[np.arange(batch), :, :, targets]
    gradient = (picked[:, :, 0] - picked[:, :, 1]) / (2.0 * eps)
    return gradient.reshape(x.shape)


def _assert_close(actual: np.ndarray, reference: np.ndarray, rel_tol: float, what: str) -> None:
    assert actual.shape == reference.shape, f"{what}: shape {actual.shape} != {reference.shape}"
    scale = float(np.abs(reference).max())
    assert scale > 0, f"{what}: the reference gradient is identically zero; the case is useless"
    error = float(np.abs(actual - reference).max())
    assert error <= rel_tol * scale, (
        f"{what}: max|engine - reference| = {error:.3g} > {rel_tol} * max|reference| "
        f"({scale:.3g})"
    )


def check_case(case: Case, opset: int) -> None:
    model = build_model(case.body, opset)
    if not any(imp.domain == MS for imp in model.opset_import):
        onnx.checker.check_model(model, full_check=True)
    x = (_distinct_input((N, C, H, W)) * case.scale + case.offset).astype(np.float32)

    reference_body = case.reference_body or case.body
    session, elem_type = _reference_session(reference_body, opset)
    if elem_type == TensorProto.DOUBLE:
        eps, tol, x_ref = EPS_DOUBLE, TOL_DOUBLE, x.astype(np.float64)
    else:
        eps, tol, x_ref = EPS_FLOAT * max(case.scale, 1.0), TOL_FLOAT, x
    fd = finite_difference_gradient(session, x_ref, TARGETS, eps)

    cam = CamModel(model, layer="X")
    assert cam.layer == "X"
    result = cam.run(x, targets=TARGETS)
    np.testing.assert_array_equal(np.asarray(result.targets), TARGETS)
    np.testing.assert_allclose(np.asarray(result.activations), x, rtol=0, atol=0)
    expected_score = _session(model).run(None, {"X": x})[0]
    np.testing.assert_allclose(
        np.asarray(result.score), expected_score, rtol=1e-5, atol=1e-5 * np.abs(expected_score).max()
    )
    tol = case.tolerance or tol
    _assert_close(np.asarray(result.gradients, dtype=np.float64), fd, tol, f"{case.id}@{opset}")


# ---------------------------------------------------------------------------------------------
# The cases. Each body gets the builder and the name of X and returns its output tensor name.
# ---------------------------------------------------------------------------------------------

_RNG = np.random.default_rng(3)


def _fixed(seed: int) -> np.random.Generator:
    """A generator for constants drawn inside a body: every build must get the same values."""
    return np.random.default_rng(1000 + seed)


def _per_channel(values: np.ndarray | None = None) -> np.ndarray:
    return (values if values is not None else _RNG.uniform(0.5, 1.5, C)).reshape(1, C, 1, 1)


_CHANNEL_FACTOR = _per_channel()
_ROW_FACTOR = _RNG.uniform(-1.0, 1.0, W)


def _unary(op_type: str, **attrs) -> Body:
    return lambda b, x: b.one(op_type, [x], **attrs)


def _clip(min_value: float | None, max_value: float | None) -> Body:
    def body(b: Builder, x: str) -> str:
        inputs = [x, b.const(min_value) if min_value is not None else ""]
        if max_value is not None:
            inputs.append(b.const(max_value))
        return b.one("Clip", inputs)

    return body


def _clip_attribute(b: Builder, x: str) -> str:
    return b.one("Clip", [x], min=-0.5, max=0.74)


def _prelu(slope_shape: tuple[int, ...]) -> Body:
    slope = _RNG.uniform(0.05, 0.4, slope_shape)
    return lambda b, x: b.one("PRelu", [x, b.const(slope)])


def _binary_const(op_type: str, constant: np.ndarray, const_first: bool = False) -> Body:
    def body(b: Builder, x: str) -> str:
        c = b.const(constant)
        return b.one(op_type, [c, x] if const_first else [x, c])

    return body


def _square(b: Builder, x: str) -> str:
    return b.one("Mul", [x, x])


def _x_over_x_plus_3(b: Builder, x: str) -> str:
    return b.one("Div", [x, b.one("Add", [x, b.const(3.0)])])


def _x_minus_relu(b: Builder, x: str) -> str:
    return b.one("Sub", [x, b.one("Relu", [x])])


def _squeeze_excite(b: Builder, x: str) -> str:
    # x * sigmoid(mean over H, W): the (N, C, 1, 1) operand broadcasts and is on the path too.
    pooled = b.one("GlobalAveragePool", [x])
    return b.one("Mul", [x, b.one("Sigmoid", [pooled])])


def _add_channel_mean(b: Builder, x: str) -> str:
    mean = b.axes("ReduceMean", x, [1], input_from=18, keepdims=1)
    return b.one("Add", [mean, x])


def _silu(b: Builder, x: str) -> str:
    return b.one("Mul", [b.one("Sigmoid", [x]), x])


def _pow(exponent: float, shift: float) -> Body:
    def body(b: Builder, x: str) -> str:
        base = b.one("Add", [x, b.const(shift)]) if shift else x
        return b.one("Pow", [base, b.const(exponent)])

    return body


def _sqrt_of_shifted(b: Builder, x: str) -> str:
    return b.one("Sqrt", [b.one("Add", [x, b.const(_CHANNEL_FACTOR + 2.0)])])


def _exp_times_row(b: Builder, x: str) -> str:
    return b.one("Mul", [b.one("Exp", [x]), b.const(_ROW_FACTOR)])


def _neg_then_div(b: Builder, x: str) -> str:
    return b.one("Div", [b.const(1.0), b.one("Sub", [b.const(3.0), b.one("Neg", [x])])])


def _reduce(op_type: str, axes: list[int], keepdims: int) -> Body:
    input_from = 13 if op_type == "ReduceSum" else 18
    return lambda b, x: b.axes(op_type, x, axes, input_from=input_from, keepdims=keepdims)


def _pool(op_type: str, **attrs) -> Body:
    return lambda b, x: b.one(op_type, [x], **attrs)


def _reshape(shape: list[int]) -> Body:
    return lambda b, x: b.one("Reshape", [x, b.ints(shape)])


def _squeeze(b: Builder, x: str) -> str:
    pooled = b.one("GlobalAveragePool", [x])
    return b.axes("Squeeze", pooled, [2, 3], input_from=13)


def _unsqueeze(b: Builder, x: str) -> str:
    expanded = b.axes("Unsqueeze", x, [1, 4], input_from=13)
    return b.one("Mul", [expanded, b.const(_fixed(1).uniform(0.5, 1.5, (1, 1, C, H, 1, W)))])


def _transpose(b: Builder, x: str) -> str:
    moved = b.one("Transpose", [x], perm=[0, 2, 3, 1])
    return b.one("Mul", [moved, b.const(_fixed(2).uniform(0.5, 1.5, (H, W, C)))])


def _cast_roundtrip(b: Builder, x: str) -> str:
    half = b.one("Cast", [x], to=TensorProto.FLOAT16)
    return b.one("Cast", [half], to=b.elem_type)


def _gemm(trans_a: int, trans_b: int, alpha: float, beta: float, c_shape) -> Body:
    features = C * H * W
    weight = _RNG.standard_normal((K, features) if trans_b else (features, K)) / 10.0
    bias = None if c_shape is None else _RNG.standard_normal(c_shape)

    def body(b: Builder, x: str) -> str:
        a = b.one("Flatten", [x], axis=1)
        if trans_a:
            a = b.one("Transpose", [a], perm=[1, 0])
        inputs = [a, b.const(weight)] + ([b.const(bias)] if bias is not None else [])
        return b.one("Gemm", inputs, transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)

    return body


def _matmul_2d(b: Builder, x: str) -> str:
    flat = b.one("Flatten", [x], axis=1)
    return b.one("MatMul", [flat, b.const(_fixed(3).standard_normal((C * H * W, 7)) / 10)])


def _matmul_batched(b: Builder, x: str) -> str:
    return b.one("MatMul", [x, b.const(_fixed(4).standard_normal((W, 2)))])


def _matmul_both_operands(b: Builder, x: str) -> str:
    return b.one("MatMul", [x, b.one("Transpose", [x], perm=[0, 1, 3, 2])])


def _matmul_broadcast_left(b: Builder, x: str) -> str:
    return b.one("MatMul", [b.const(_fixed(5).standard_normal((4, H))), x])


def _conv(out_channels: int, kernel: int, group: int = 1, bias: bool = True, **attrs) -> Body:
    weight = _RNG.standard_normal((out_channels, C // group, kernel, kernel)) / 3
    conv_bias = _RNG.standard_normal(out_channels)

    def body(b: Builder, x: str) -> str:
        inputs = [x, b.const(weight)] + ([b.const(conv_bias)] if bias else [])
        return b.one("Conv", inputs, group=group, kernel_shape=[kernel, kernel], **attrs)

    return body


def _grouped_conv(b: Builder, x: str) -> str:
    # Widen to 4 channels first so that a 2-group conv (neither dense nor depthwise) exists.
    widen = b.one("Conv", [x, b.const(_fixed(6).standard_normal((4, C, 1, 1)))], kernel_shape=[1, 1])
    weight = b.const(_fixed(7).standard_normal((6, 2, 3, 3)) / 3)
    return b.one("Conv", [widen, weight], group=2, kernel_shape=[3, 3], pads=[1, 0, 1, 2])


def _batchnorm(b: Builder, x: str) -> str:
    params = [
        _fixed(8).uniform(0.5, 1.5, C),
        _fixed(9).standard_normal(C),
        _fixed(10).standard_normal(C) * 0.2,
        _fixed(11).uniform(0.3, 2.0, C),
    ]
    return b.one("BatchNormalization", [x] + [b.const(p) for p in params], epsilon=1e-3)


def _layernorm(axis: int) -> Body:
    norm_shape = (N, C, H, W)[axis:]
    scale = _RNG.uniform(0.5, 1.5, norm_shape)
    shift = _RNG.standard_normal(norm_shape)

    def body(b: Builder, x: str) -> str:
        return b.one("LayerNormalization", [x, b.const(scale), b.const(shift)], axis=axis)

    return body


def _concat(axis: int) -> Body:
    def body(b: Builder, x: str) -> str:
        doubled = b.one("Mul", [x, b.const(2.0)])
        return b.one("Concat", [b.one("Relu", [x]), doubled, x], axis=axis)

    return body


def _split_equal(b: Builder, x: str) -> str:
    attrs = {"axis": 3}
    if b.opset >= 18:
        attrs["num_outputs"] = 2
    left, right = b.op("Split", [x], outputs=2, **attrs)
    return b.one("Sub", [b.one("Mul", [left, b.const(1.7)]), b.one("Tanh", [right])])


def _split_sizes(b: Builder, x: str) -> str:
    if b.opset >= 13:
        first, rest = b.op("Split", [x, b.ints([1, 2])], outputs=2, axis=1)
    else:
        first, rest = b.op("Split", [x], outputs=2, axis=1, split=[1, 2])
    return b.one("Mul", [first, rest])


def _split_unused_output(b: Builder, x: str) -> str:
    if b.opset >= 13:
        _, used = b.op("Split", [x, b.ints([2, 4])], outputs=2, axis=3)
    else:
        _, used = b.op("Split", [x], outputs=2, axis=3, split=[2, 4])
    return used


def _slice(starts, ends, axes=None, steps=None) -> Body:
    def body(b: Builder, x: str) -> str:
        inputs = [x, b.ints(starts), b.ints(ends)]
        if axes is not None:
            inputs.append(b.ints(axes))
        if steps is not None:
            inputs.append(b.ints(steps))
        return b.one("Slice", inputs)

    return body


def _gather(indices, axis: int) -> Body:
    return lambda b, x: b.one("Gather", [x, b.ints(indices)], axis=axis)


def _pad(pads: list[int], value: float) -> Body:
    return lambda b, x: b.one("Pad", [x, b.ints(pads), b.const(value)], mode="constant")


def _expand(b: Builder, x: str) -> str:
    pooled = b.one("GlobalMaxPool", [x])
    expanded = b.one("Expand", [pooled, b.ints([1, 1, 4, 5])])
    return b.one("Mul", [expanded, b.const(_fixed(12).uniform(0.5, 1.5, (4, 5)))])


_DQ_WEIGHT_INT8 = _RNG.integers(-100, 100, (5, C, 3, 3)).astype(np.int8)
_DQ_WEIGHT_SCALE = np.float32(0.01)


def _qdq(remove: bool) -> Body:
    # Activations go through Quantize/Dequantize; the conv weight arrives as DequantizeLinear
    # of int8 (as in quantized exports). The reference removes the activation QDQ pair and
    # uses the dequantized weight values directly: the straight-through estimator.
    def body(b: Builder, x: str) -> str:
        weight_values = _DQ_WEIGHT_INT8.astype(np.float64) * float(_DQ_WEIGHT_SCALE)
        if remove:
            weight = b.const(weight_values)
            activation = x
        else:
            scale = b.raw(np.array(0.02, np.float32))
            zero = b.raw(np.array(128, np.uint8))
            quantized = b.one("QuantizeLinear", [x, scale, zero])
            activation = b.one("DequantizeLinear", [quantized, scale, zero])
            weight = b.one(
                "DequantizeLinear",
                [b.raw(_DQ_WEIGHT_INT8), b.raw(np.array(_DQ_WEIGHT_SCALE)), b.raw(np.int8(0))],
            )
        conv = b.one("Conv", [activation, weight], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        return b.one("Mul", [conv, b.const(0.5)])

    return body


def _identity_chain(b: Builder, x: str) -> str:
    return b.one("Identity", [b.one("Dropout", [x])])


def _pad_mode(pads: list[int], mode: str) -> Body:
    return lambda b, x: b.one("Pad", [x, b.ints(pads)], mode=mode)


def _runtime_pads(b: Builder, x: str) -> list[str]:
    """Pads computed from Shape(x), as TF-"SAME" exports do: [0,0,1,2, 0,0,2,1] here."""
    shape = b.one("Shape", [x])
    ones = b.one("Div", [shape, shape])
    begin = b.one("Mul", [ones, b.ints([0, 0, 1, 2])])
    end = b.one("Mul", [ones, b.ints([0, 0, 2, 1])])
    return b.one("Concat", [begin, end], axis=0)


def _pad_runtime(mode: str) -> Body:
    def body(b: Builder, x: str) -> str:
        inputs = [x, _runtime_pads(b, x)] + ([b.const(0.3)] if mode == "constant" else [])
        return b.one("Pad", inputs, mode=mode)

    return body


def _resize_inputs(b: Builder, scales=None, sizes=None) -> list[str]:
    roi = b.const(np.zeros(0)) if b.opset < 13 or sizes is not None else ""
    if sizes is not None:
        return [roi or b.const(np.zeros(0)), b.const(np.zeros(0)) if b.opset < 13 else "", sizes]
    return [roi, b.raw(np.asarray(scales, np.float32))]


def _resize(mode: str, scales=None, out_hw=None, **attrs) -> Body:
    def body(b: Builder, x: str) -> str:
        sizes = b.ints([N, C, *out_hw]) if out_hw is not None else None
        return b.one("Resize", [x, *_resize_inputs(b, scales, sizes)], mode=mode, **attrs)

    return body


def _resize_axes(mode: str, out_hw: tuple[int, int]) -> Body:
    def body(b: Builder, x: str) -> str:
        return b.one("Resize", [x, "", "", b.ints(list(out_hw))], mode=mode, axes=[2, 3])

    return body


def _resize_runtime_sizes(b: Builder, x: str) -> str:
    # interpolate(scale_factor=2) in torch's legacy exporter: sizes = Shape(x) * [1, 1, 2, 2].
    sizes = b.one("Mul", [b.one("Shape", [x]), b.ints([1, 1, 2, 2])])
    inputs = [x, *_resize_inputs(b, sizes=sizes)]
    return b.one("Resize", inputs, mode="linear", coordinate_transformation_mode="half_pixel")


def _instance_norm(b: Builder, x: str) -> str:
    scale, bias = _fixed(13).uniform(0.5, 1.5, C), _fixed(14).standard_normal(C)
    return b.one("InstanceNormalization", [x, b.const(scale), b.const(bias)], epsilon=1e-3)


def _reduce_l2(axes: list[int], keepdims: int) -> Body:
    def body(b: Builder, x: str) -> str:
        norm = b.axes("ReduceL2", x, axes, input_from=18, keepdims=keepdims)
        # ConvNeXt-V2's GRN divides by the mean norm: the norm feeds a product with x.
        return b.one("Mul", [norm, b.const(1.3)]) if not keepdims else b.one("Mul", [x, norm])

    return body


def _gather_nd(b: Builder, x: str) -> str:
    # Batch moved off the front, so the gathered (c, h) pairs never mix samples.
    moved = b.one("Transpose", [x], perm=[1, 2, 0, 3])
    picked = b.one("GatherND", [moved, b.ints([[2, 4], [0, 1], [1, 3]])])
    return b.one("Transpose", [picked], perm=[1, 0, 2])


# -- quantized ops: each body has a float twin (dequantized weights, float op) ---------------
# X holds odd multiples of 0.01 in [-1.79, 1.79]: with a 0.015 step none rounds to 0, so
# sign-dependent rules (LeakyRelu) see the same signs as the float twin. Rules that read
# dequantized forward values (Mul, Sigmoid) differ from the twin by the rounding error.
_X_SCALE, _X_ZERO = 0.015, 128
_Q_WEIGHT = _RNG.integers(-90, 90, (5, C, 3, 3)).astype(np.int8)
_Q_WEIGHT_SCALES = _RNG.uniform(0.005, 0.02, 5).astype(np.float32)
_Q_BIAS = _RNG.integers(-500, 500, 5).astype(np.int32)
_Q_MATRIX = _RNG.integers(-100, 100, (W, 2)).astype(np.int8)


def _quantize(b: Builder, x: str, scale: float = _X_SCALE, zero: int = _X_ZERO) -> list[str]:
    s, z = b.raw(np.array(scale, np.float32)), b.raw(np.array(zero, np.uint8))
    return [b.one("QuantizeLinear", [x, s, z]), s, z]


def _dequantize(b: Builder, q: str, scale: float, zero: int) -> str:
    return b.one(
        "DequantizeLinear", [q, b.raw(np.array(scale, np.float32)), b.raw(np.array(zero, np.uint8))]
    )


def _qlinear(kind: str, quantized: bool) -> Body:
    out_scale, out_zero = 0.05, 128

    def body(b: Builder, x: str) -> str:
        if kind == "QLinearConv":
            if not quantized:
                w = _Q_WEIGHT * _Q_WEIGHT_SCALES.reshape(-1, 1, 1, 1)
                bias = _Q_BIAS * _Q_WEIGHT_SCALES * _X_SCALE
                return b.one("Conv", [x, b.const(w), b.const(bias)], pads=[1, 1, 1, 1])
            q = _quantize(b, x)
            inputs = q + [
                b.raw(_Q_WEIGHT), b.raw(_Q_WEIGHT_SCALES), b.raw(np.zeros(5, np.int8)),
                b.raw(np.array(out_scale, np.float32)), b.raw(np.array(out_zero, np.uint8)),
                b.raw(_Q_BIAS),
            ]
            y = b.one("QLinearConv", inputs, pads=[1, 1, 1, 1])
        elif kind == "QLinearMatMul":
            if not quantized:
                return b.one("MatMul", [x, b.const(_Q_MATRIX * 0.01)])
            inputs = _quantize(b, x) + [
                b.raw(_Q_MATRIX), b.raw(np.array(0.01, np.float32)), b.raw(np.array(0, np.int8)),
                b.raw(np.array(out_scale, np.float32)), b.raw(np.array(out_zero, np.uint8)),
            ]
            y = b.one("QLinearMatMul", inputs)
        elif kind == "QGemm":
            flat = b.one("Flatten", [x], axis=1)
            weight = _fixed(20).integers(-100, 100, (7, C * H * W)).astype(np.int8)
            if not quantized:
                return b.one("Gemm", [flat, b.const(weight * 0.004)], transB=1, alpha=0.5)
            inputs = _quantize(b, flat) + [
                b.raw(weight), b.raw(np.array(0.004, np.float32)), b.raw(np.array(0, np.int8)),
                "", b.raw(np.array(out_scale, np.float32)), b.raw(np.array(out_zero, np.uint8)),
            ]
            y = b.one("QGemm", inputs, domain=MS, transB=1, alpha=0.5)
        elif kind in ("QLinearAdd", "QLinearMul"):
            half = b.one("Mul", [x, b.const(0.5)])
            if not quantized:
                return b.one(kind[len("QLinear"):], [x, half])
            inputs = _quantize(b, x) + _quantize(b, half, 0.01) + [
                b.raw(np.array(out_scale, np.float32)), b.raw(np.array(out_zero, np.uint8)),
            ]
            y = b.one(kind, inputs, domain=MS)
        elif kind == "QLinearConcat":
            half = b.one("Mul", [x, b.const(0.5)])
            if not quantized:
                return b.one("Concat", [x, half], axis=1)
            inputs = [b.raw(np.array(out_scale, np.float32)), b.raw(np.array(out_zero, np.uint8))]
            y = b.one("QLinearConcat", inputs + _quantize(b, x) + _quantize(b, half, 0.01), axis=1, domain=MS)
        else:  # unary: QLinearSigmoid, QLinearLeakyRelu, QLinearGlobalAveragePool, QLinearAveragePool
            float_op, attrs = {
                "QLinearSigmoid": ("Sigmoid", {}),
                "QLinearLeakyRelu": ("LeakyRelu", {"alpha": 0.2}),
                "QLinearGlobalAveragePool": ("GlobalAveragePool", {}),
                "QLinearAveragePool": ("AveragePool", {"kernel_shape": [2, 2], "strides": [1, 2]}),
            }[kind]
            if not quantized:
                return b.one(float_op, [x], **attrs)
            scale = 1.0 / 256 if kind == "QLinearSigmoid" else out_scale
            zero = 0 if kind == "QLinearSigmoid" else out_zero
            inputs = _quantize(b, x) + [
                b.raw(np.array(scale, np.float32)), b.raw(np.array(zero, np.uint8)),
            ]
            y = b.one(kind, inputs, domain=MS, **attrs)
            return _dequantize(b, y, scale, zero)
        return _dequantize(b, y, out_scale, out_zero)

    return body


def _dynamic(kind: str, quantized: bool) -> Body:
    conv_weight = _fixed(21).integers(-100, 100, (4, C, 3, 3)).astype(np.int8)
    matrix = _fixed(22).integers(0, 255, (C * H * W, 6)).astype(np.uint8)
    w_scale, m_zero = 0.01, 120

    def body(b: Builder, x: str) -> str:
        source = x if kind == "ConvInteger" else b.one("Flatten", [x], axis=1)
        if not quantized:
            if kind == "ConvInteger":
                return b.one("Conv", [source, b.const(conv_weight * w_scale)], pads=[1, 1, 1, 1])
            return b.one("MatMul", [source, b.const((matrix.astype(np.float64) - m_zero) * w_scale)])
        codes, scale, zero = b.op("DynamicQuantizeLinear", [source], outputs=3)
        if kind == "ConvInteger":
            acc = b.one("ConvInteger", [codes, b.raw(conv_weight), zero], pads=[1, 1, 1, 1])
        else:
            acc = b.one("MatMulInteger", [codes, b.raw(matrix), zero, b.raw(np.array(m_zero, np.uint8))])
        factor = b.one("Mul", [scale, b.raw(np.array(w_scale, np.float32))])
        return b.one("Mul", [b.one("Cast", [acc], to=TensorProto.FLOAT), factor])

    return body


def _quantized_case(kind: str, tolerance: float | None = None) -> Case:
    return Case(
        kind, _qlinear(kind, True), reference_body=_qlinear(kind, False), opsets=(13, 21),
        tolerance=tolerance,
    )


def _fused_relu(kind: str, quantized: bool) -> Body:
    """A ReLU fused into an output quantization whose zero point is the lowest code (ONNX
    Runtime's quantizers drop the Relu node); the float twin is the op, then Relu. Each op's
    result has the sign of x (never near 0), so rounding moves no value across the kink."""

    def body(b: Builder, x: str) -> str:
        if kind == "QuantizeLinear":
            shifted = b.one("Add", [x, b.const(0.0)])
            if not quantized:
                return b.one("Relu", [shifted])
            s, z = b.raw(np.array(0.01, np.float32)), b.raw(np.array(0, np.uint8))
            return b.one("DequantizeLinear", [b.one("QuantizeLinear", [shifted, s, z]), s, z])
        if kind == "QLinearAdd":
            half = b.one("Mul", [x, b.const(0.5)])
            if not quantized:
                return b.one("Relu", [b.one("Add", [x, half])])
            inputs = _quantize(b, x) + _quantize(b, half, 0.01) + [
                b.raw(np.array(0.02, np.float32)), b.raw(np.array(0, np.uint8)),
            ]
            return _dequantize(b, b.one("QLinearAdd", inputs, domain=MS), 0.02, 0)
        # QLinearConv, 1x1: weight 2 on the diagonal and a bias below 0.003.
        codes = (100 * np.eye(C)).reshape(C, C, 1, 1).astype(np.int8)
        scales = np.full(C, 0.02, np.float32)
        bias = np.array([5, -7, 3], np.int32)
        if not quantized:
            weight = codes.astype(np.float64) * 0.02
            conv = b.one("Conv", [x, b.const(weight), b.const(bias * 0.02 * _X_SCALE)])
            return b.one("Relu", [conv])
        inputs = _quantize(b, x) + [
            b.raw(codes), b.raw(scales), b.raw(np.zeros(C, np.int8)),
            b.raw(np.array(0.03, np.float32)), b.raw(np.array(0, np.uint8)), b.raw(bias),
        ]
        return _dequantize(b, b.one("QLinearConv", inputs), 0.03, 0)

    return body


def _fused_relu_case(kind: str) -> Case:
    return Case(
        f"{kind}-fused-relu", _fused_relu(kind, True), reference_body=_fused_relu(kind, False),
        opsets=(13, 21),
    )


CASES: list[Case] = [
    # Activations
    Case("Relu", _unary("Relu")),
    Case("LeakyRelu", _unary("LeakyRelu", alpha=0.13)),
    Case("PRelu-channel", _prelu((C, 1, 1))),
    Case("PRelu-scalar", _prelu((1,))),
    Case("Elu", _unary("Elu", alpha=0.7)),
    Case("Selu", _unary("Selu")),
    Case("Clip-min-max", _clip(-0.5, 0.74), min_opset=11),
    Case("Clip-min-only", _clip(-0.5, None), min_opset=11),
    Case("Clip-max-only", _clip(None, 0.74), min_opset=11),
    Case("Clip-attributes", _clip_attribute, opsets=(10,)),
    Case("Sigmoid", _unary("Sigmoid")),
    Case("HardSigmoid", _unary("HardSigmoid", alpha=0.25, beta=0.45)),
    Case("HardSwish", _unary("HardSwish"), min_opset=14, scale=2.0),
    Case("Tanh", _unary("Tanh")),
    Case("Softplus", _unary("Softplus")),
    Case("Gelu-none", _unary("Gelu"), min_opset=20),
    Case("Gelu-tanh", _unary("Gelu", approximate="tanh"), min_opset=20),
    Case("Erf", _unary("Erf")),
    Case("SiLU", _silu),
    # Elementwise arithmetic with broadcasting and with both operands on the path
    Case("Mul-const-channel", _binary_const("Mul", _CHANNEL_FACTOR)),
    Case("Mul-const-left-row", _binary_const("Mul", _ROW_FACTOR, const_first=True)),
    Case("Mul-square", _square),
    Case("Mul-squeeze-excite", _squeeze_excite),
    Case("Add-const-channel", _binary_const("Add", _CHANNEL_FACTOR)),
    Case("Add-broadcast-mean", _add_channel_mean),
    Case("Sub-const-left", _binary_const("Sub", _ROW_FACTOR, const_first=True)),
    Case("Sub-both", _x_minus_relu),
    Case("Div-const", _binary_const("Div", _CHANNEL_FACTOR)),
    Case("Div-both", _x_over_x_plus_3),
    Case("Neg-Div-const-left", _neg_then_div),
    Case("Pow-2", _pow(2.0, 0.0)),
    Case("Pow-1.5", _pow(1.5, 2.5)),
    Case("Sqrt", _sqrt_of_shifted),
    Case("Exp", _exp_times_row),
    # Softmax family: opset < 13 coerces to 2-D from `axis`, opset >= 13 uses one axis
    Case("Softmax-axis1", _unary("Softmax", axis=1), scale=3.0),
    Case("Softmax-axis-1", _unary("Softmax", axis=-1), scale=3.0),
    Case("LogSoftmax-axis1", _unary("LogSoftmax", axis=1), scale=3.0),
    Case("LogSoftmax-axis3", _unary("LogSoftmax", axis=3), scale=3.0),
    # Pooling and reductions
    Case("GlobalAveragePool", _unary("GlobalAveragePool")),
    Case("GlobalMaxPool", _unary("GlobalMaxPool")),
    Case("ReduceMean-hw-keep", _reduce("ReduceMean", [2, 3], 1)),
    Case("ReduceMean-hw-drop", _reduce("ReduceMean", [2, 3], 0)),
    Case("ReduceMean-c-neg", _reduce("ReduceMean", [-3], 0)),
    Case("ReduceSum-hw-keep", _reduce("ReduceSum", [2, 3], 1)),
    Case("ReduceSum-w-drop", _reduce("ReduceSum", [3], 0)),
    Case("ReduceMax-hw-keep", _reduce("ReduceMax", [2, 3], 1)),
    Case("ReduceMax-c-drop", _reduce("ReduceMax", [1], 0)),
    Case(
        "AveragePool-include-pad",
        _pool("AveragePool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
              count_include_pad=1),
    ),
    Case(
        "AveragePool-exclude-pad",
        _pool("AveragePool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
              count_include_pad=0),
    ),
    Case(
        "AveragePool-ceil",
        _pool("AveragePool", kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
    ),
    Case("AveragePool-2x2", _pool("AveragePool", kernel_shape=[2, 2], strides=[1, 2])),
    Case(
        "MaxPool-3x3-s2-p1",
        _pool("MaxPool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    ),
    Case("MaxPool-ceil", _pool("MaxPool", kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)),
    Case("MaxPool-dilated", _pool("MaxPool", kernel_shape=[2, 2], dilations=[2, 2])),
    # Shape ops
    Case("Flatten", _unary("Flatten", axis=1)),
    Case("Reshape", _reshape([0, C, H * W])),
    Case("Reshape-minus1", _reshape([-1, W, H * C])),
    Case("Squeeze", _squeeze),
    Case("Unsqueeze", _unsqueeze),
    Case("Transpose", _transpose),
    Case("Identity-Dropout", _identity_chain),
    Case("Cast-float16", _cast_roundtrip, reference_body=_unary("Identity")),
    # Linear algebra
    Case("Gemm-transB-alpha-beta-C1d", _gemm(0, 1, 0.7, 0.3, (K,))),
    Case("Gemm-transA-C2d", _gemm(1, 0, 1.0, 1.0, (1, K))),
    Case("Gemm-plain-noC", _gemm(0, 0, 1.3, 1.0, None)),
    Case("MatMul-2d", _matmul_2d),
    Case("MatMul-batched", _matmul_batched),
    Case("MatMul-both-operands", _matmul_both_operands),
    Case("MatMul-broadcast-left", _matmul_broadcast_left),
    Case("Conv-3x3-pads", _conv(5, 3, pads=[1, 1, 1, 1])),
    Case("Conv-stride2-nobias", _conv(4, 3, bias=False, strides=[2, 2], pads=[0, 1, 1, 0])),
    Case("Conv-dilated", _conv(2, 2, dilations=[2, 2])),
    Case("Conv-same-upper", _conv(4, 3, strides=[2, 2], auto_pad="SAME_UPPER")),
    Case("Conv-1x1", _conv(6, 1)),
    Case("Conv-depthwise", _conv(C, 3, group=C, pads=[1, 1, 1, 1])),
    Case("Conv-depthwise-multiplier", _conv(2 * C, 3, group=C, pads=[1, 1, 1, 1])),
    Case("Conv-grouped", _grouped_conv),
    Case("BatchNormalization", _batchnorm),
    Case("LayerNormalization-last", _layernorm(-1), min_opset=17),
    Case("LayerNormalization-axis1", _layernorm(1), min_opset=17),
    # Data movement
    Case("Concat-channels", _concat(1)),
    Case("Concat-width", _concat(3)),
    Case("Split-equal", _split_equal),
    Case("Split-sizes", _split_sizes),
    Case("Split-unused-output", _split_unused_output),
    Case("Slice-steps", _slice([0, 1], [3, 6], [2, 3], [2, 2])),
    Case("Slice-negative", _slice([-2], [10**9], [1])),
    Case("Slice-negative-step", _slice([-1], [-7], [3], [-2])),
    Case("Slice-all-axes", _slice([0, 0, 1, 0], [10**9, 2, 4, -1])),
    Case("Gather-repeated", _gather([2, 0, 2], axis=1)),
    Case("Gather-negative-2d", _gather([[-1, 0], [3, 2]], axis=3)),
    Case("Pad-constant", _pad([0, 0, 1, 2, 0, 0, 2, 1], 0.5)),
    Case("Pad-negative", _pad([0, 0, -1, 1, 0, 0, 0, -2], 0.0)),
    Case("Expand", _expand),
    Case("QDQ", _qdq(remove=False), min_opset=13, reference_body=_qdq(remove=True)),
    # Ops met when the layer is set one stage earlier
    Case("Pad-reflect", _pad_mode([0, 0, 2, 1, 0, 0, 1, 2], "reflect")),
    Case("Pad-edge", _pad_mode([0, 0, 1, 3, 0, 0, 2, 0], "edge")),
    Case("Pad-wrap", _pad_mode([0, 0, 1, 2, 0, 0, 2, 1], "wrap"), min_opset=19),
    Case("Pad-runtime-constant", _pad_runtime("constant")),
    Case("Pad-runtime-reflect", _pad_runtime("reflect")),
    Case("Resize-nearest-x2", _resize("nearest", scales=[1, 1, 2, 2]), min_opset=13),
    Case("Resize-linear-sizes-axes", _resize_axes("linear", (7, 9)), min_opset=18),
    Case(
        "Resize-cubic-align-corners",
        _resize("cubic", scales=[1, 1, 1.5, 0.5], coordinate_transformation_mode="align_corners"),
        min_opset=13,
    ),
    Case("Resize-linear-runtime-sizes", _resize_runtime_sizes, min_opset=13),
    Case("InstanceNormalization", _instance_norm),
    Case("ReduceL2-hw-keep", _reduce_l2([2, 3], 1)),
    Case("ReduceL2-c-drop", _reduce_l2([1], 0)),
    Case("GatherND", _gather_nd),
    # Quantized ops against their dequantized float twins (straight-through)
    _quantized_case("QLinearConv"),
    _quantized_case("QLinearMatMul"),
    _quantized_case("QGemm"),
    _quantized_case("QLinearAdd"),
    _quantized_case("QLinearMul", tolerance=1e-2),
    _quantized_case("QLinearConcat"),
    _quantized_case("QLinearSigmoid", tolerance=3e-2),
    _quantized_case("QLinearLeakyRelu"),
    _quantized_case("QLinearGlobalAveragePool"),
    _quantized_case("QLinearAveragePool"),
    Case("ConvInteger", _dynamic("ConvInteger", True), reference_body=_dynamic("ConvInteger", False), opsets=(13, 21)),
    Case("MatMulInteger", _dynamic("MatMulInteger", True), reference_body=_dynamic("MatMulInteger", False), opsets=(13, 21)),
    # ReLUs fused into a quantization stop the gradient where the ReLU did
    _fused_relu_case("QuantizeLinear"),
    _fused_relu_case("QLinearAdd"),
    _fused_relu_case("QLinearConv"),
]


def _params() -> list:
    params = []
    for case in CASES:
        for opset in case.opsets:
            if case.min_opset <= opset <= case.max_opset:
                params.append(pytest.param(case, opset, id=f"{case.id}-opset{opset}"))
    return params


@pytest.mark.parametrize(("case", "opset"), _params())
def test_gradient_matches_finite_differences(case: Case, opset: int) -> None:
    check_case(case, opset)


def test_float16_model_matches_float32_finite_differences() -> None:
    def body(b: Builder, x: str) -> str:
        rng = np.random.default_rng(5)
        conv = b.one(
            "Conv", [x, b.const(rng.standard_normal((4, C, 3, 3)) / 3), b.const(rng.normal(size=4))],
            kernel_shape=[3, 3], pads=[1, 1, 1, 1],
        )
        activated = b.one("Sigmoid", [conv])
        return b.one("AveragePool", [activated], kernel_shape=[2, 2], strides=[2, 2])

    half_model = build_model(body, 17, TensorProto.FLOAT16)
    onnx.checker.check_model(half_model, full_check=True)
    # Evaluate both graphs at the same point: the input rounded to float16.
    x = _distinct_input((N, C, H, W)).astype(np.float16).astype(np.float32)
    reference = _session(build_model(body, 17, TensorProto.FLOAT))
    fd = finite_difference_gradient(reference, x, TARGETS, EPS_FLOAT)

    result = CamModel(half_model, layer="X").run(x, targets=TARGETS)
    # float16 keeps about 3 decimal digits; the backward pass accumulates a few roundings.
    _assert_close(np.asarray(result.gradients, dtype=np.float64), fd, 3e-2, "float16 graph")


def _head_with(op_type: str, **attrs) -> onnx.ModelProto:
    builder = Builder(TensorProto.FLOAT, 17)
    pooled = builder.one("GlobalAveragePool", ["X"])
    flat = builder.one("Flatten", [pooled], axis=1)
    logits = builder.one("Gemm", [flat, builder.const(np.ones((C, K)))])
    if op_type == "TopK":
        values, _ = builder.op("TopK", [logits, builder.ints([K - 1])], outputs=2)
        out = values
    else:
        out = builder.one(op_type, [logits], **attrs)
    builder.nodes[-1].name = "the_head_node"
    x_info = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", C, H, W])
    return _make_model(builder, x_info, out, 17, TensorProto.FLOAT, shape=None)


@pytest.mark.parametrize("op_type", ["Cos", "TopK"])
def test_op_without_rule_raises_unsupported_op_error(op_type: str) -> None:
    model = _head_with(op_type)
    x = _distinct_input((N, C, H, W)).astype(np.float32)
    with pytest.raises(UnsupportedOpError) as caught:
        CamModel(model, layer="X").run(x, targets=np.array([0, 1]))
    assert caught.value.op_type == op_type
    assert caught.value.node_name == "the_head_node"
    assert op_type in str(caught.value) and "the_head_node" in str(caught.value)


def _softmax_head_model() -> tuple[onnx.ModelProto, str]:
    builder = Builder(TensorProto.FLOAT, 17)
    pooled = builder.one("GlobalAveragePool", ["X"])
    flat = builder.one("Flatten", [pooled], axis=1)
    weight = np.random.default_rng(8).standard_normal((C, K))
    logits = builder.one("Gemm", [flat, builder.const(weight)])
    probabilities = builder.one("Softmax", [logits], axis=1)
    x_info = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", C, H, W])
    model = _make_model(builder, x_info, probabilities, 17, TensorProto.FLOAT, shape=["N", K])
    # Expose the logits as well, to build the reference for score="logits".
    model.graph.output.append(helper.make_tensor_value_info(logits, TensorProto.FLOAT, None))
    return model, logits


@pytest.mark.parametrize("score", ["logits", "probabilities"])
def test_trailing_softmax_is_dropped_only_for_logits(score: str) -> None:
    model, logits_name = _softmax_head_model()
    x = _distinct_input((N, C, H, W)).astype(np.float32)
    both = _session(model)
    probabilities, logits = both.run(None, {"X": x})

    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    wanted = logits_name if score == "logits" else reference.graph.output[0].name
    kept = [o for o in reference.graph.output if o.name == wanted]
    del reference.graph.output[:]
    reference.graph.output.extend(kept)
    fd = finite_difference_gradient(_session(reference), x, TARGETS, EPS_FLOAT)

    clean = onnx.ModelProto()
    clean.CopyFrom(model)
    del clean.graph.output[1:]
    result = CamModel(clean, layer="X", score=score).run(x, targets=TARGETS)
    expected_score = logits if score == "logits" else probabilities
    np.testing.assert_allclose(np.asarray(result.score), expected_score, rtol=1e-5, atol=1e-6)
    _assert_close(np.asarray(result.gradients, dtype=np.float64), fd, TOL_FLOAT, score)
