"""Finding the class score, the target layer and the head between them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import LayerNotFoundError, UnsupportedModelError, UnsupportedOpError
from .analysis import GraphInfo, input_layout
from .rules import NON_DIFFERENTIABLE, differentiable_inputs, rule_for

# Ops whose 4-D outputs are channels-first by definition in ONNX.
_CHANNELS_FIRST_OPS = frozenset(
    {
        "Conv", "ConvTranspose", "BatchNormalization", "MaxPool", "AveragePool",
        "GlobalAveragePool", "GlobalMaxPool", "InstanceNormalization", "LRN", "QLinearConv",
        "ConvInteger", "LpPool", "MaxUnpool", "Resize", "Upsample", "GlobalLpPool",
    }
)  # fmt: skip
# ONNX Runtime's contrib pooling ops are channels-first unless channels_last=1.
_CHANNELS_FIRST_UNLESS_ATTR = frozenset({"QLinearGlobalAveragePool", "QLinearAveragePool"})
# Ops that keep their main input's layout (elementwise, casts, quantisation).
_LAYOUT_KEEPING_OPS = frozenset(
    {
        "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Clip", "Sigmoid", "HardSigmoid",
        "HardSwish", "Tanh", "Softplus", "Gelu", "Erf", "Mul", "Add", "Sub", "Div", "Neg",
        "Pow", "Sqrt", "Exp", "Identity", "Dropout", "Cast", "QuantizeLinear",
        "DequantizeLinear", "Max", "Min", "Sum", "Abs", "Mish", "Where", "Softsign",
        "LayerNormalization", "SimplifiedLayerNormalization", "Reciprocal", "Log",
        "DynamicQuantizeLinear", "QLinearAdd", "QLinearMul", "QLinearSigmoid",
        "QLinearLeakyRelu", "Pad",
    }
)  # fmt: skip
# Steps back from a candidate layer through ops that only re-express the same map. Not over
# Q/DQ: quantization clamps (a fused ReLU lives in the zero point), so the dequantized
# tensor is the map the head sees.
_STEP_BACK_OPS = frozenset({"Transpose", "Identity", "Cast", "Dropout"})
_SCORE_CUT_OPS = frozenset({"Softmax", "LogSoftmax", "QLinearSoftmax"})
# Between a final softmax and the output: re-expressions of the same probabilities.
_SCORE_PASS_OPS = frozenset(
    {"Identity", "Cast", "QuantizeLinear", "DequantizeLinear", "Reshape", "Flatten", "Squeeze",
     "Unsqueeze", "Dropout"}
)


@dataclass(frozen=True)
class Layout:
    """Where the channel and spatial axes of a 4-D tensor are."""

    channel_axis: int
    spatial_axes: tuple[int, int]

    @property
    def to_channels_first(self) -> list[int] | None:
        perm = [0, self.channel_axis, *self.spatial_axes]
        return None if perm == [0, 1, 2, 3] else perm

    @property
    def name(self) -> str:
        return "NCHW" if self.channel_axis == 1 else "NHWC" if self.channel_axis == 3 else "other"


NCHW = Layout(1, (2, 3))
NHWC = Layout(3, (1, 2))


def find_score(info: GraphInfo, score: str = "logits") -> tuple[str, str | None]:
    """The score tensor and, when a softmax was cut off, the name of that node.

    ``score="logits"`` walks back from the first output through Identity/Cast and stops
    before a Softmax or LogSoftmax; ``"probabilities"`` keeps the output as it is.
    """
    if score not in ("logits", "probabilities"):
        raise ValueError(f"score must be 'logits' or 'probabilities', not {score!r}")
    outputs = [o.name for o in info.graph.output]
    candidates = [o for o in outputs if len(info.shapes.get(o, ())) >= 2]
    if not candidates:
        raise UnsupportedModelError(
            "the model has no output of shape (N, K); sp2ps explains classifiers whose first "
            "output holds class scores"
        )
    name = candidates[0]
    if name not in info.input_dependent:
        raise UnsupportedModelError(
            f"the model's output {name!r} does not depend on its input {info.input_name!r}; "
            "it is not an image classifier (or its graph is damaged); export the model again"
        )
    class_dims = [d for d in info.shapes[name][1:] if d != 1]
    if len(class_dims) > 1:
        raise UnsupportedModelError(
            f"the model's output {name!r} has shape {info.shapes[name]} (at batch "
            f"{info.shapes[name][0]}), not class scores (N, K); sp2ps explains classifiers, "
            "not segmentation or detection models whose first output is a map"
        )
    if score == "probabilities":
        return name, None
    current = name
    while current in info.producer:
        node = info.node(info.producer[current])
        if node.op_type in _SCORE_CUT_OPS:
            return node.input[0], node.name or node.output[0]
        logits = _decomposed_softmax_input(info, node)
        if logits is not None:
            return logits, node.name or node.output[0]
        if node.op_type not in _SCORE_PASS_OPS:
            break
        current = node.input[0]
    return name, None


def _decomposed_softmax_input(info: GraphInfo, node) -> str | None:
    """The logits of a softmax written as ``Div(Exp(z), ReduceSum(Exp(z)))`` (as some
    converters emit it), with ``z = x - ReduceMax(x)`` stepped over; else ``None``."""
    if node.op_type != "Div":
        return None
    numerator = _producer(info, node.input[0])
    denominator = _producer(info, node.input[1])
    if numerator is None or denominator is None or numerator.op_type != "Exp":
        return None
    if denominator.op_type != "ReduceSum" or denominator.input[0] != numerator.output[0]:
        return None
    logits = numerator.input[0]
    shifted = _producer(info, logits)
    if shifted is not None and shifted.op_type == "Sub":
        maximum = _producer(info, shifted.input[1])
        if maximum is not None and maximum.op_type == "ReduceMax" and maximum.input[0] == shifted.input[0]:
            logits = shifted.input[0]
    return logits


def _producer(info: GraphInfo, tensor: str):
    index = info.producer.get(tensor)
    return None if index is None else info.node(index)


def layout_of(info: GraphInfo, tensor: str) -> Layout | None:
    """Channel/spatial axes of a 4-D tensor, or ``None`` when they cannot be proven.

    The proof is traced back to a channels-first op or the input, and forward to the input
    of a channels-first op (the head's pooling after a channels-last LayerNorm sandwich),
    composing Transposes and passing layout-keeping ops. Where the two disagree, or both
    fail, the layout is unproven.
    """
    backward = _layout_backward(info, tensor)
    forward = _layout_forward(info, tensor)
    if backward is not None and forward is not None and backward != forward:
        return None
    return backward or forward


def _layout_backward(info: GraphInfo, tensor: str) -> Layout | None:
    """A depth-first search back through Transposes and layout-keeping ops; at a binary op
    every input that depends on the image is tried."""
    stack: list[tuple[str, tuple[tuple[int, ...], ...]]] = [(tensor, ())]
    visited: set[str] = set()
    while stack:
        current, transposes = stack.pop()
        if current in visited:
            continue
        visited.add(current)
        if current == info.input_name:
            base = NHWC if input_layout(info.declared_input_dims) == "NHWC" else NCHW
            return _apply_transposes(base, transposes)
        if current not in info.producer:
            continue
        node = info.node(info.producer[current])
        if _is_channels_first_op(node):
            return _apply_transposes(NCHW, transposes)
        if node.op_type == "Transpose":
            stack.append((node.input[0], (_perm(node), *transposes)))
        elif node.op_type in _LAYOUT_KEEPING_OPS:
            for name in reversed(node.input):
                if name and len(info.shapes.get(name, ())) == 4 and name in info.input_dependent:
                    stack.append((name, transposes))
    return None


def _layout_forward(info: GraphInfo, tensor: str) -> Layout | None:
    """The layout a channels-first consumer (reached through Transposes and layout-keeping
    ops) proves for ``tensor``."""
    stack: list[tuple[str, tuple[tuple[int, ...], ...]]] = [(tensor, ())]
    visited: set[str] = set()
    while stack:
        current, transposes = stack.pop()
        if current in visited:
            continue
        visited.add(current)
        for index in info.consumers.get(current, []):
            node = info.node(index)
            if _is_channels_first_op(node) and node.input[0] == current:
                # NCHW at the consumer; undo the transposes met on the way there.
                inverse = tuple(tuple(np.argsort(p)) for p in reversed(transposes))
                return _apply_transposes(NCHW, inverse)
            if node.op_type == "Transpose":
                stack.append((node.output[0], (*transposes, _perm(node))))
            elif node.op_type in _LAYOUT_KEEPING_OPS and len(info.shapes.get(node.output[0], ())) == 4:
                stack.append((node.output[0], transposes))
    return None


def _perm(node) -> tuple[int, ...]:
    for attr in node.attribute:
        if attr.name == "perm":
            return tuple(attr.ints)
    return (3, 2, 1, 0)


def _is_channels_first_op(node) -> bool:
    if node.op_type in _CHANNELS_FIRST_UNLESS_ATTR:
        return not any(a.name == "channels_last" and a.i for a in node.attribute)
    return node.op_type in _CHANNELS_FIRST_OPS


def _apply_transposes(base: Layout, transposes: tuple[tuple[int, ...], ...]) -> Layout:
    """``transposes`` run from the base tensor towards the traced tensor."""
    axes = [0, 0, 0, 0]
    axes[base.channel_axis] = 1
    axes[base.spatial_axes[0]] = 2
    axes[base.spatial_axes[1]] = 3
    for perm in transposes:
        axes = [axes[p] for p in perm]
    return Layout(axes.index(1), (axes.index(2), axes.index(3)))


def _reaches_score(info: GraphInfo, score: str) -> set[str]:
    """Tensors with a differentiable path to ``score``."""
    reached = {score}
    for node in reversed(info.graph.node):
        if node.op_type in NON_DIFFERENTIABLE:
            continue
        if any(o in reached for o in node.output if o):
            for i in differentiable_inputs(node):
                reached.add(node.input[i])
    return reached


def _is_spatial_map(info: GraphInfo, tensor: str) -> Layout | None:
    shape = info.shapes.get(tensor)
    dtype = info.dtypes.get(tensor)
    if shape is None or len(shape) != 4 or dtype is None:
        return None
    if not np.issubdtype(dtype, np.floating) and tensor not in info.quant_params:
        return None
    layout = layout_of(info, tensor) or NCHW
    h, w = (shape[a] for a in layout.spatial_axes)
    return layout if h > 1 and w > 1 else None


def default_layer(info: GraphInfo, score: str) -> str:
    """The last 4-D feature map with H, W > 1 that every path from the input to the score
    passes through.

    It is the map the head collapses spatially (global pooling, spatial reduction, pooling
    to 1x1 or flattening); 1x1 maps after pooling (squeeze-excitation, Conv heads) are
    excluded by H, W > 1, and tensors inside one branch of a multi-branch block (Inception)
    by the dominator condition. Layout-only steps (Transpose, Cast, Q/DQ) are stepped back
    over, so the layer sits right after its activation.
    """
    reached = _reaches_score(info, score)
    order = {name: idx for name, idx in info.producer.items()}
    candidates = sorted(
        (t for t in reached if t in order or t == info.input_name),
        key=lambda t: order.get(t, -1),
        reverse=True,
    )
    dominators = score_dominators(info, score, reached)
    num_classes = int(np.prod(info.shapes[score][1:]))
    for tensor in candidates:
        if tensor == info.input_name:
            continue  # the image itself is no feature map: a CAM of it explains nothing
        if tensor not in dominators:
            continue
        layout = _is_spatial_map(info, tensor)
        if layout is None:
            continue
        if info.shapes[tensor][layout.channel_axis] == num_classes:
            tensor = _before_class_map_conv(info, tensor)
        return _step_back(info, tensor)
    raise LayerNotFoundError(
        "the model has no convolutional feature map (a 4-D map with height and width > 1, "
        "computed from the image, that feeds the class score), so there is no layer for a "
        "CAM; if a tensor qualifies, pass it with layer=... (CLI: --layer); `sp2ps inspect` "
        "shows the model's tensors"
    )


def score_dominators(info: GraphInfo, score: str, reached: set[str] | None = None) -> set[str]:
    """Tensors that every differentiable path from the input to ``score`` passes through.

    The dominators of ``score`` in the tensor graph rooted at the input, restricted to the
    tensors that both depend on the input and reach the score: the chain of immediate
    dominators (Cooper, Harvey and Kennedy's intersection over a topological order).
    """
    reached = reached if reached is not None else _reaches_score(info, score)
    live = reached & info.input_dependent
    if info.input_name not in live or score not in live:
        return set()
    order = {info.input_name: 0}
    preds: dict[str, set[str]] = {}
    for node in info.graph.node:
        if node.op_type in NON_DIFFERENTIABLE:
            continue
        sources = [node.input[i] for i in differentiable_inputs(node) if node.input[i] in live]
        if not sources:
            continue
        for out in node.output:
            if out in live:
                preds.setdefault(out, set()).update(sources)
                order.setdefault(out, len(order))
    idom: dict[str, str] = {info.input_name: info.input_name}

    def intersect(a: str, b: str) -> str:
        while a != b:
            while order[a] > order[b]:
                a = idom[a]
            while order[b] > order[a]:
                b = idom[b]
        return a

    for tensor in sorted(preds, key=order.__getitem__):
        done = [p for p in preds[tensor] if p in idom]
        if not done:
            continue
        current = done[0]
        for other in done[1:]:
            current = intersect(current, other)
        idom[tensor] = current
    if score not in idom:
        return set()
    chain = {score}
    tensor = score
    while tensor != info.input_name:
        tensor = idom[tensor]
        chain.add(tensor)
    return chain


def _step_back(info: GraphInfo, tensor: str) -> str:
    while tensor in info.producer:
        node = info.node(info.producer[tensor])
        if node.op_type in _STEP_BACK_OPS and _is_spatial_map(info, node.input[0]):
            tensor = node.input[0]
        elif _is_identity_pool(info, node) and _is_spatial_map(info, node.input[0]):
            tensor = node.input[0]
        else:
            break
    return tensor


def _before_class_map_conv(info: GraphInfo, tensor: str) -> str:
    """Fully-convolutional heads (SqueezeNet, NiN) turn features into one map per class with
    a 1x1 Conv before pooling; those class maps are the head, the features are the layer."""
    current = tensor
    while current in info.producer:
        node = info.node(info.producer[current])
        if node.op_type == "Conv":
            kernel = info.shapes.get(node.input[1]) or info.constants[node.input[1]].shape
            source = node.input[0]
            if all(k == 1 for k in kernel[2:]) and _is_spatial_map(info, source):
                return source
            return tensor
        if node.op_type not in _LAYOUT_KEEPING_OPS or len(node.input) != 1:
            return tensor
        current = node.input[0]
    return tensor
def _is_identity_pool(info: GraphInfo, node) -> bool:
    """Pooling that keeps the map as it is (e.g. VGG's adaptive pool at its own size)."""
    if node.op_type not in ("AveragePool", "MaxPool"):
        return False
    return info.shapes.get(node.input[0]) == info.shapes.get(node.output[0])


def resolve_layer(info: GraphInfo, layer: str) -> str:
    """A user-named layer: a tensor name, or a node name meaning that node's first output."""
    if layer in info.shapes or layer == info.input_name:
        return layer
    for node in info.graph.node:
        if node.name == layer:
            return node.output[0]
    spatial = [t for t in info.shapes if _is_spatial_map(info, t)]
    hint = ", ".join(spatial[-5:])
    raise LayerNotFoundError(
        f"layer {layer!r} is neither a tensor nor a node in the model; use a tensor or node "
        f"name from `sp2ps inspect` (the last feature maps are: {hint})"
    )


def head_nodes(info: GraphInfo, target: str, score: str, model_name: str = "") -> list[int]:
    """Indices, in graph order, of the nodes on differentiable paths from target to score."""
    reached = _reaches_score(info, score)
    if target not in reached:
        raise LayerNotFoundError(
            f"the class score {score!r} does not depend on layer {target!r} through "
            "differentiable ops; choose a layer before the classifier head"
        )
    requires = {target}
    path: list[int] = []
    for idx, node in enumerate(info.graph.node):
        if node.op_type in NON_DIFFERENTIABLE:
            continue
        flowing = [i for i in differentiable_inputs(node) if node.input[i] in requires]
        if not flowing or not any(o in reached for o in node.output if o):
            continue
        if rule_for(node) is None:
            raise UnsupportedOpError(
                node.op_type if not node.domain else f"{node.domain}.{node.op_type}",
                node.name or node.output[0],
                model=model_name,
            )
        requires.update(o for o in node.output if o)
        path.append(idx)
    return path


def requires_grad(info: GraphInfo, target: str, path: list[int]) -> set[str]:
    """Tensors whose value depends differentiably on ``target`` within the head."""
    requires = {target}
    for idx in path:
        node = info.node(idx)
        if any(node.input[i] in requires for i in differentiable_inputs(node)):
            requires.update(o for o in node.output if o)
    return requires


def head_ops(info: GraphInfo, target: str, score: str) -> list[tuple[str, str, bool]]:
    """(node name, op type, has a gradient rule) for every node between target and score."""
    reached = _reaches_score(info, score)
    requires = {target}
    out = []
    for node in info.graph.node:
        if node.op_type in NON_DIFFERENTIABLE:
            continue
        if not any(node.input[i] in requires for i in differentiable_inputs(node)):
            continue
        if not any(o in reached for o in node.output if o):
            continue
        requires.update(o for o in node.output if o)
        out.append((node.name or node.output[0], node.op_type, rule_for(node) is not None))
    return out
