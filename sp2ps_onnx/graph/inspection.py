"""What a model looks like to the rewriter, without rewriting it (``sp2ps inspect``)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx

from ..errors import LayerNotFoundError
from .analysis import analyse, input_layout
from .locate import default_layer, find_score, head_ops, layout_of, resolve_layer
from .model_io import (
    attribute,
    blame_invalid_model,
    constant_values,
    dims_of,
    graph_inputs,
    load_model,
    naming_the_model,
)

_WEIGHT_OPS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}


def inspect_model(
    model: str | os.PathLike | onnx.ModelProto,
    layer: str | None = None,
    input_size: tuple[int, int] | None = None,
    score: str = "logits",
    allow_domains: Iterable[str] = (),
) -> dict[str, Any]:
    """Inputs, outputs, the target layer, the head's ops with rule coverage, and weights.

    Unlike :class:`~sp2ps_onnx.CamModel` this does not fail on a head op without a gradient
    rule: it reports it (``head_ops[i]["has_rule"] is False``), which is what a user needs
    to pick a later layer.
    """
    proto, path = load_model(model, allow_domains)
    with blame_invalid_model(proto, path), naming_the_model(path):
        return _inspect(proto, path, layer, input_size, score)


def _inspect(
    proto: onnx.ModelProto,
    path: str | None,
    layer: str | None,
    input_size: tuple[int, int] | None,
    score: str,
) -> dict[str, Any]:
    info = analyse(proto, input_size, path)
    score_tensor, cut = find_score(info, score)
    try:
        target = resolve_layer(info, layer) if layer else default_layer(info, score_tensor)
        layer_error = None
    except LayerNotFoundError as exc:
        target, layer_error = None, f"{path}: {exc}" if path else str(exc)
    ops = head_ops(info, target, score_tensor) if target else []
    layout = layout_of(info, target) if target else None
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
        "num_classes": int(np.prod(info.shapes[score_tensor][1:])),
        "layer": target,
        "layer_error": layer_error,
        "layer_shape": list(info.shapes[target][1:]) if target in info.shapes else None,
        "layer_layout": layout.name if layout else None,
        "head_ops": [{"node": n, "op": op, "has_rule": ok} for n, op, ok in ops],
        "all_ops_have_rules": all(ok for _, _, ok in ops),
        "batch": "fixed, run per sample" if info.fixed_batch else (
            "relaxed from a fixed batch of 1" if info.batch_relaxed else "dynamic"
        ),
        "parameters": params,
        "zero_weights": zeros,
        "sparsity": zeros / params if params else 0.0,
    }


def weight_statistics(model: onnx.ModelProto) -> tuple[int, int]:
    """(number of weights, number of exact zeros) in Conv/Gemm/MatMul weight tensors.

    Weights are read from initializers and Constant nodes, through DequantizeLinear for
    quantized models; biases and normalisation parameters are not counted.
    """
    values = constant_values(model.graph)
    producers = {o: n for n in model.graph.node for o in n.output}
    total = zeros = 0
    seen: set[str] = set()
    for node in model.graph.node:
        position = _WEIGHT_OPS.get(node.op_type)
        if position is None or len(node.input) <= position:
            continue
        name = node.input[position]
        source = producers.get(name)
        if source is not None and source.op_type == "DequantizeLinear":
            name = source.input[0]
        if name in seen or name not in values:
            continue
        seen.add(name)
        weight = values[name]
        if node.op_type == "MatMul" and weight.ndim < 2:
            continue
        total += int(weight.size)
        if source is not None and source.op_type == "DequantizeLinear" and len(source.input) > 2:
            zero_point = np.asarray(values.get(source.input[2], 0))
            if zero_point.size > 1:  # per-channel: broadcast along the quantisation axis
                axis = attribute(source, "axis", 1) % weight.ndim
                shape = [1] * weight.ndim
                shape[axis] = -1
                zero_point = zero_point.reshape(shape)
            zeros += int(np.count_nonzero(weight == zero_point))
        else:
            zeros += int(weight.size - np.count_nonzero(weight))
    return total, zeros


def _dtype_name(vi: onnx.ValueInfoProto) -> str:
    elem = vi.type.tensor_type.elem_type
    return onnx.TensorProto.DataType.Name(elem).lower() if elem else "unknown"
