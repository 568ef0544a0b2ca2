"""What a model looks like to the rewriter, without rewriting it (``sp2ps inspect``)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx

from ..errors import LayerNotFoundError
from .analysis import analyse, input_layout
from .locate import (
    RULE_NAMED,
    Layout,
    TokenLayout,
    choose_default_layer,
    find_score,
    head_ops,
    map_layout,
    resolve_layer,
)
from .model_io import (
    attribute,
    blame_invalid_model,
    constant_values,
    dims_of,
    graph_inputs,
    load_model,
    naming_the_model,
)


def inspect_model(
    model: str | os.PathLike | onnx.ModelProto,
    layer: str | None = None,
    input_size: tuple[int, int] | None = None,
    score: str = "logits",
    allow_domains: Iterable[str] = (),
    grid: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Inputs, outputs, the target layer, the head's ops with rule coverage, and weights.

    Unlike :class:`~sp2ps_onnx.CamModel` this does not fail on a head op without a gradient
    rule: it reports it (``head_ops[i]["has_rule"] is False``), which is what a user needs
    to pick a later layer. ``layer_rule`` says why the layer was chosen and
    ``layer_reshape`` how a token sequence becomes a map (``grid``: see CamModel).
    """
    proto, path = load_model(model, allow_domains)
    with blame_invalid_model(proto, path), naming_the_model(path):
        return _inspect(proto, path, layer, input_size, score, grid)


def _inspect(
    proto: onnx.ModelProto,
    path: str | None,
    layer: str | None,
    input_size: tuple[int, int] | None,
    score: str,
    grid: tuple[int, int] | None = None,
) -> dict[str, Any]:
    info = analyse(proto, input_size, path)
    score_tensor, cut = find_score(info, score)
    rule = None
    layout = None
    try:
        if layer:
            target, rule = resolve_layer(info, layer), RULE_NAMED
        else:
            target, rule = choose_default_layer(info, score_tensor)
        layer_error = None
    except LayerNotFoundError as exc:
        target, layer_error = None, f"{path}: {exc}" if path else str(exc)
    ops = head_ops(info, target, score_tensor) if target else []
    if target:
        try:
            layout = map_layout(info, target, grid)
        except LayerNotFoundError as exc:
            layer_error = str(exc)
    if target and layout is None and not layer_error and len(info.shapes.get(target, ())) == 4:
        layer_error = (
            f"cannot prove which axis of layer {target!r} holds the channels; choose a layer "
            "whose layout is known with --layer (e.g. a Conv output or its activation)"
        )
    if target and layout is None and not layer_error and len(info.shapes.get(target, ())) == 3:
        layer_error = (
            f"cannot prove which tokens of layer {target!r} form an image grid; state it "
            "with --grid HxW (the T - H*W leading tokens are dropped) or choose another --layer"
        )
    layer_shape = None
    if target in info.shapes:
        dims = info.shapes[target]
        layer_shape = list(dims[1:])
        if isinstance(layout, Layout):
            layer_shape = [dims[layout.channel_axis], *(dims[a] for a in layout.spatial_axes)]
        elif isinstance(layout, TokenLayout):
            layer_shape = [dims[layout.channel_axis], *layout.grid]
    params, zeros = weight_statistics(proto)
    return {
        "path": path,
        "opset": next(int(i.version) for i in proto.opset_import if i.domain in ("", "ai.onnx")),
        "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
        "inputs": [
            {"name": vi.name, "shape": dims_of(vi), "dtype": _dtype_name(vi)}
            for vi in graph_inputs(proto.graph)
        ],
        "outputs": [
            {"name": vi.name, "shape": dims_of(vi), "dtype": _dtype_name(vi)}
            for vi in proto.graph.output
        ],
        "input_layout": input_layout(info.declared_input_dims),
        "score_tensor": score_tensor,
        "softmax_cut": cut,
        "score_cut_ops": score_cut_ops(info, score_tensor) if cut else [],
        "input_quantization": info.input_quantization,
        "num_classes": int(np.prod(info.shapes[score_tensor][1:])),
        "layer": target,
        "layer_error": layer_error,
        "layer_shape": layer_shape,  # (C, H, W): channels first, as activations come back
        "layer_layout": layout.name if layout else None,  # how the graph stores the layer
        "layer_stored_shape": list(info.shapes[target][1:]) if target in info.shapes else None,
        "layer_rule": rule,
        # How a token sequence becomes the (C, H, W) map (emitted in the rewritten graph).
        "layer_reshape": layout.describe() if isinstance(layout, TokenLayout) else None,
        "head_ops": [{"node": n, "op": op, "has_rule": ok} for n, op, ok in ops],
        "all_ops_have_rules": all(ok for _, _, ok in ops),
        "batch": "fixed, run per sample" if info.fixed_batch else (
            "relaxed from a fixed batch of 1" if info.batch_relaxed else "dynamic"
        ),
        "parameters": params,
        "zero_weights": zeros,
        "sparsity": zeros / params if params else 0.0,
    }


# Weight operand of each weighted op: (position, zero-point position or None, channel axis).
_WEIGHT_OPERANDS = {
    "Conv": (1, None, 0),
    "ConvTranspose": (1, None, 1),
    "Gemm": (1, None, 0),
    "MatMul": (1, None, -1),
    "QLinearConv": (3, 5, 0),
    "QLinearMatMul": (3, 5, -1),
    "QGemm": (3, 5, 0),
    "ConvInteger": (1, 3, 0),
    "MatMulInteger": (1, 3, -1),
}
# Inputs that hold quantization metadata (scales, zero points), not parameters.
_QUANT_META_POSITIONS = {
    "QuantizeLinear": (1, 2),
    "DequantizeLinear": (1, 2),
    "QLinearConv": (1, 2, 4, 5, 6, 7),
    "QLinearMatMul": (1, 2, 4, 5, 6, 7),
    "QGemm": (1, 2, 4, 5, 7, 8),
    "ConvInteger": (2, 3),
    "MatMulInteger": (2, 3),
    "QLinearAdd": (1, 2, 4, 5, 6, 7),
    "QLinearMul": (1, 2, 4, 5, 6, 7),
    "QLinearGlobalAveragePool": (1, 2, 3, 4),
    "QLinearAveragePool": (1, 2, 3, 4),
    "QLinearSigmoid": (1, 2, 3, 4),
    "QLinearLeakyRelu": (1, 2, 3, 4),
    "QLinearSoftmax": (1, 2, 3, 4),
}
# Integer inputs that are parameters (quantized weights and int32 biases).
_INTEGER_PARAMETER_POSITIONS = {
    "DequantizeLinear": (0,),
    "QLinearConv": (3, 8),
    "QLinearMatMul": (0, 3),
    "QGemm": (0, 3, 6),
    "ConvInteger": (1,),
    "MatMulInteger": (0, 1),
    "QLinearAdd": (0, 3),
    "QLinearMul": (0, 3),
}


def parameter_count(model: onnx.ModelProto) -> int:
    """Elements of the model's parameters, in all three quantized forms too.

    Float initializers and Constant tensors count, except quantization scales; integer
    tensors count where they are quantized weights or biases (behind DequantizeLinear, or
    the weight/bias operands of QLinear*/ConvInteger/MatMulInteger). Shape constants and
    zero points do not count.
    """
    values = constant_values(model.graph)
    meta: set[str] = set()
    integer_params: set[str] = set()
    dynamic_scales = {
        node.output[1] for node in model.graph.node if node.op_type == "DynamicQuantizeLinear"
    }
    for node in model.graph.node:
        if node.op_type == "Mul" and any(i in dynamic_scales for i in node.input):
            meta.update(node.input)  # x_scale * w_scale after ConvInteger/MatMulInteger
        for position in _QUANT_META_POSITIONS.get(node.op_type, ()):
            if position < len(node.input) and node.input[position]:
                meta.add(node.input[position])
        for position in _INTEGER_PARAMETER_POSITIONS.get(node.op_type, ()):
            if position < len(node.input) and node.input[position]:
                integer_params.add(node.input[position])
    total = 0
    for name, value in values.items():
        if np.issubdtype(value.dtype, np.floating):
            total += 0 if name in meta else int(value.size)
        elif name in integer_params:
            total += int(value.size)
    return total


def score_cut_ops(info, score_tensor: str) -> list[str]:
    """Op types removed between the score and the model's first output (Softmax, Q/DQ, ...),
    in graph order."""
    output = next(o.name for o in info.graph.output if len(info.shapes.get(o.name, ())) >= 2)
    ops: list[str] = []
    current = output
    while current != score_tensor and current in info.producer:
        node = info.node(info.producer[current])
        ops.append(node.op_type)
        current = node.input[0]
        if node.op_type == "Div":  # a softmax written out: Div(Exp(z), ReduceSum(Exp(z)))
            ops += ["ReduceSum", "Exp"]
            break
    return ops[::-1]


def weight_statistics(model: onnx.ModelProto) -> tuple[int, int]:
    """(number of weights, number of zero weights) in the weight tensors of Conv, Gemm,
    MatMul and their quantized forms.

    Weights are read from initializers and Constant nodes: float weights directly, QDQ
    weights through DequantizeLinear, QOperator (QLinearConv, QLinearMatMul, QGemm) and
    dynamic (ConvInteger, MatMulInteger) weights from their integer operand. A quantized
    weight is zero where it equals its zero point (per channel where the zero point is).
    Biases and normalisation parameters are not counted.
    """
    values = constant_values(model.graph)
    producers = {o: n for n in model.graph.node for o in n.output}
    total = zeros = 0
    seen: set[str] = set()
    for node in model.graph.node:
        operand = _WEIGHT_OPERANDS.get(node.op_type)
        if operand is None or len(node.input) <= operand[0]:
            continue
        position, zero_position, axis = operand
        name = node.input[position]
        zero_name = (
            node.input[zero_position]
            if zero_position is not None and len(node.input) > zero_position
            else ""
        )
        source = producers.get(name)
        if source is not None and source.op_type == "DequantizeLinear":
            name = source.input[0]
            zero_name = source.input[2] if len(source.input) > 2 else ""
            axis = attribute(source, "axis", 1)
        if name in seen or name not in values:
            continue
        seen.add(name)
        weight = values[name]
        if node.op_type in ("MatMul", "MatMulInteger", "QLinearMatMul") and weight.ndim < 2:
            continue
        total += int(weight.size)
        zero_point = np.asarray(values.get(zero_name, 0)) if zero_name else np.asarray(0)
        if zero_point.size > 1:  # per-channel: broadcast along the quantisation axis
            shape = [1] * weight.ndim
            shape[axis % weight.ndim] = -1
            zero_point = zero_point.reshape(shape)
        zeros += int(np.count_nonzero(weight == zero_point))
    return total, zeros


def _dtype_name(vi: onnx.ValueInfoProto) -> str:
    elem = vi.type.tensor_type.elem_type
    return onnx.TensorProto.DataType.Name(elem).lower() if elem else "unknown"
