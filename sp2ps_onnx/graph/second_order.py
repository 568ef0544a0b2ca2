"""The head's Hessian-vector product (ShapleyCAM's second-order term), reverse over reverse.

The first backward pass is itself a graph of standard ONNX ops, emitted by the rules. The
product ``H · v`` at the layer is the gradient of ``sum(g(a) * v)`` with respect to the layer
``a``, where ``g`` is that first pass's gradient and ``v`` is held fixed: the same rules,
run over the first pass's own nodes. ``v`` is the layer's activations (pytorch-grad-cam's
``torch.autograd.grad(grads, activations, grad_outputs=activations)``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx
from onnx import helper

from ..errors import UnsupportedModelError, UnsupportedOpError
from .analysis import GraphInfo, analyse, input_layout
from .autodiff import backward
from .builder import GraphBuilder
from .locate import backward_nodes, requires_grad


def hessian_vector_product(
    model: onnx.ModelProto,
    info: GraphInfo,
    layer: str,
    activations: str,
    gradient: str,
    runtime_inputs: Sequence[tuple[str, int]],
    finish: Callable[[GraphBuilder, str], str],
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]:
    """Nodes and initializers to append to ``model`` (the rewritten model, whose nodes
    compute ``gradient``, the first pass's gradient at ``layer``, and ``activations``, the
    layer as float32), and the name of ``finish(builder, H · activations)``.

    ``runtime_inputs``: (name, classes) of the rewritten model's inputs besides the image
    (the target, 0 classes; the target weights, K classes). The product's nodes are derived
    on a probe copy where those are computed from the image instead, so that the probe runs
    and nothing derived from them folds into a constant.
    """
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    stand_in = GraphBuilder(info, prefix="sp2ps_probe")
    zeros = stand_in.reduce(
        "ReduceSum", stand_in.mul(stand_in.as_float(info.input_name), stand_in.scalar(0.0)),
        list(range(1, len(info.input_shape))), keepdims=False,
    )  # fmt: skip
    for name, classes in runtime_inputs:
        if classes:  # target weights: (N, K) zeros
            value = stand_in.mul(stand_in.unsqueeze(zeros, [1]), stand_in.const(np.zeros((1, classes))))
        else:  # target: -1, each sample's top class
            value = stand_in.op("Cast", [stand_in.add(zeros, stand_in.scalar(-1.0))], to=onnx.TensorProto.INT64)
        stand_in.nodes.append(helper.make_node("Identity", [value], [name], name=stand_in.fresh("in")))
    fed = {name for name, _ in runtime_inputs}
    kept = [vi for vi in probe.graph.input if vi.name not in fed]
    del probe.graph.input[:]
    probe.graph.input.extend(kept)

    # sum(g * stop(a)): the Identity's output is cut from the second pass, so v stays fixed.
    own = GraphBuilder(info, prefix="sp2ps_hvp")  # a prefix of its own: no name is taken
    held = own.op("Identity", [activations])
    rank = len(info.shapes[layer])
    dot = own.reduce("ReduceSum", own.mul(gradient, held), list(range(rank)), keepdims=False)
    nodes = [*stand_in.nodes, *probe.graph.node, *own.nodes]
    del probe.graph.node[:]
    probe.graph.node.extend(nodes)
    probe.graph.initializer.extend(stand_in.initializers + own.initializers)
    del probe.graph.output[:]
    probe.graph.output.append(helper.make_tensor_value_info(dot, onnx.TensorProto.FLOAT, []))

    second = analyse(probe, _spatial_size(info), None)
    try:
        path = backward_nodes(second, [layer], dot, cut=[held])
    except UnsupportedOpError as exc:
        raise UnsupportedModelError(
            f"no Hessian-vector product for this head: the first backward pass uses op "
            f"{exc.op_type!r} (node {exc.node_name!r}), which has no gradient rule itself; "
            "a method that needs the product (ShapleyCAM) cannot run on this layer"
        ) from exc
    b = GraphBuilder(second, prefix="sp2ps_hvp2")
    grads = backward(b, path, requires_grad(second, layer, path), {dot: b.scalar(1.0)})
    # A gradient that does not depend on the layer (a piecewise-linear head) has H = 0.
    product = grads.get(layer) or b.mul(activations, b.scalar(0.0))
    result = finish(b, product)
    return own.nodes + b.nodes, own.initializers + b.initializers, result


def _spatial_size(info: GraphInfo) -> tuple[int, int]:
    shape = info.input_shape
    return (shape[1], shape[2]) if input_layout(info.declared_input_dims) == "NHWC" else (shape[2], shape[3])
