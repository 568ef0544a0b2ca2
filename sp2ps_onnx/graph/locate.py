"""Finding the class score, the target layer and the head between them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import LayerNotFoundError, UnsupportedModelError, UnsupportedOpError
from .analysis import GraphInfo, input_layout
from .axes import (
    BATCH,
    CHANNELS,
    CHANNELS_FIRST_OPS,
    COLUMNS,
    ROWS,
    UNKNOWN,
    Tokens,
    axis_roles,
    decomposed_norm_axis,
)
from .model_io import attribute
from .rules import NON_DIFFERENTIABLE, differentiable_inputs, rule_for

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


@dataclass(frozen=True)
class TokenLayout:
    """A token sequence, (N, T, C) or (N, C, T), whose tokens ``offset .. offset + H*W - 1``
    are the patches of an H x W grid in row-major order; the other tokens (class,
    distillation, register tokens) are dropped when it becomes a (N, C, H, W) map."""

    token_axis: int
    channel_axis: int
    offset: int
    grid: tuple[int, int]
    tokens: int  # length of the token axis, extra tokens included
    stated: bool = False  # the grid was stated by the user, not proven from the graph

    @property
    def name(self) -> str:
        return "NTC" if self.token_axis == 1 else "NCT"

    @property
    def patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def describe(self) -> str:
        """The reshape in words (``sp2ps inspect``)."""
        h, w = self.grid
        trailing = self.tokens - self.offset - self.patches
        dropped = [
            f"{count} {where} token{'s' * (count != 1)}"
            for count, where in ((self.offset, "leading"), (trailing, "trailing"))
            if count
        ]
        source = "stated with grid=" if self.stated else "proven from the graph"
        return (
            f"tokens {self.offset}..{self.offset + self.patches - 1} of {self.tokens} -> "
            f"{h}x{w} grid"
            + (f", {' and '.join(dropped)} dropped" if dropped else "")
            + f" ({source})"
        )


MapLayout = Layout | TokenLayout

RULE_NAMED = "named by the user (layer=..., CLI --layer)"
RULE_LAST_MAP = (
    "the last feature map with a proven grid that every path to the score passes through "
    "(the map the head pools)"
)
RULE_CLASS_TOKEN = (
    "class-token head: the head reads only the extra (class/distillation) tokens of the final "
    "map, whose patch tokens get no gradient, so the layer is the first norm of the last "
    "attention block (pytorch-grad-cam's blocks[-1].norm1)"
)


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


def map_layout(
    info: GraphInfo, tensor: str, grid: tuple[int, int] | None = None
) -> MapLayout | None:
    """How ``tensor`` becomes a channels-first (N, C, H, W) map, or ``None`` when unproven.

    4-D maps: :func:`layout_of`, else the traced axis roles (:mod:`.axes`), which also
    cover channels-last maps whose channel axis a LayerNormalization proves; the two other
    axes are then rows and columns in stored order unless the trace says otherwise.
    3-D token sequences: the grid and the extra tokens must be proven by the trace, or
    stated with ``grid=(H, W)``. Raises :class:`LayerNotFoundError` for a stated grid that
    contradicts the graph or does not fit the tensor.
    """
    shape = info.shapes.get(tensor, ())
    roles = axis_roles(info).get(tensor)
    if len(shape) == 4:
        layout = layout_of(info, tensor) or _layout_from_roles(roles)
        if grid is not None and layout is not None:
            found = tuple(shape[a] for a in layout.spatial_axes)
            if tuple(grid) != found:
                raise LayerNotFoundError(
                    f"grid {grid[0]}x{grid[1]} was stated for layer {tensor!r}, but it is a "
                    f"{found[0]}x{found[1]} map; drop --grid (it is for token sequences) or "
                    "state the map's own size"
                )
        return layout
    if len(shape) == 3:
        return _token_layout(info, tensor, roles, grid)
    return None


def _layout_from_roles(roles) -> Layout | None:
    if roles is None or roles[0] != BATCH or list(roles).count(CHANNELS) != 1:
        return None
    channel = roles.index(CHANNELS)
    rest = [a for a in (1, 2, 3) if a != channel]
    if ROWS in roles and COLUMNS in roles:
        return Layout(channel, (roles.index(ROWS), roles.index(COLUMNS)))
    if any(roles[a] != UNKNOWN for a in rest):
        return None  # only one of rows and columns traced, or something else there
    # Channels proven (by a LayerNorm over them) and the two others unknown: the image's
    # rows come before its columns in storage, as in every channels-last layout.
    return Layout(channel, (rest[0], rest[1]))


def _token_layout(info: GraphInfo, tensor: str, roles, grid) -> TokenLayout | None:
    shape = info.shapes[tensor]
    proven = None
    if roles is not None and roles[0] == BATCH:
        token_axes = [a for a in (1, 2) if isinstance(roles[a], Tokens)]
        if len(token_axes) == 1:
            axis = token_axes[0]
            role = roles[axis]
            proven = TokenLayout(axis, 3 - axis, role.offset, role.grid, shape[axis])
    if grid is None:
        return proven
    h, w = (int(g) for g in grid)
    if proven is not None:
        if (h, w) != proven.grid:
            raise LayerNotFoundError(
                f"grid {h}x{w} was stated for layer {tensor!r}, but the graph proves its "
                f"tokens form a {proven.grid[0]}x{proven.grid[1]} grid "
                f"({proven.describe()}); drop --grid or state {proven.grid[0]}x{proven.grid[1]}"
            )
        return proven
    # Stated grid: tokens on axis 1 (PyTorch's (N, T, C), the layout pytorch-grad-cam's
    # reshape transforms assume) unless a LayerNorm proves the channels are there.
    channel = 1 if roles is not None and roles[1] == CHANNELS else 2
    axis = 3 - channel
    tokens = shape[axis]
    if h < 1 or w < 1 or h * w > tokens:
        raise LayerNotFoundError(
            f"grid {h}x{w} ({h * w} tokens) does not fit layer {tensor!r} of shape "
            f"{tuple(shape[1:])}, which has {tokens} tokens on axis {axis}; state a grid "
            "whose H*W is at most the token count (the rest are taken as leading class tokens)"
        )
    return TokenLayout(axis, channel, tokens - h * w, (h, w), tokens, stated=True)


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
    return node.op_type in CHANNELS_FIRST_OPS


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


def _is_spatial_map(info: GraphInfo, tensor: str) -> MapLayout | None:
    """The layout of ``tensor`` if it is a float (or quantized) map with H, W > 1: a 4-D
    tensor (taken as NCHW when unproven, so that the build can refuse it by name) or a
    token sequence with a proven grid."""
    shape = info.shapes.get(tensor)
    dtype = info.dtypes.get(tensor)
    if shape is None or len(shape) not in (3, 4) or dtype is None:
        return None
    if not np.issubdtype(dtype, np.floating) and tensor not in info.quant_params:
        return None
    roles = axis_roles(info).get(tensor)
    if len(shape) == 3:
        tokens = _token_layout(info, tensor, roles, None)
        return tokens if tokens is not None and min(tokens.grid) > 1 else None
    layout = layout_of(info, tensor) or _layout_from_roles(roles)
    if layout is None and roles is not None and any(isinstance(r, Tokens) for r in roles):
        return None  # token arithmetic (attention scores, heads), not an image map
    layout = layout or NCHW
    h, w = (shape[a] for a in layout.spatial_axes)
    return layout if h > 1 and w > 1 else None


def default_layer(info: GraphInfo, score: str) -> str:
    """The default CAM layer's tensor (see :func:`choose_default_layer`)."""
    return choose_default_layer(info, score)[0]


def choose_default_layer(info: GraphInfo, score: str) -> tuple[str, str]:
    """The default CAM layer and the rule that chose it.

    The last feature map with H, W > 1 (a 4-D map or a token sequence with a proven grid)
    that every path from the input to the score passes through: the map the head collapses
    spatially (global pooling, spatial reduction, pooling to 1x1 or flattening); 1x1 maps
    after pooling (squeeze-excitation, Conv heads) are excluded by H, W > 1, and tensors
    inside one branch of a multi-branch block (Inception) by the dominator condition.
    Layout-only steps (Transpose, Cast, Q/DQ) are stepped back over, so the layer sits
    right after its activation.

    A token map that the head reads only through its extra (class) tokens gives no
    gradient to its patches; the layer is then the first norm of the last attention block,
    as in pytorch-grad-cam's recipe for ViT (:data:`RULE_CLASS_TOKEN`).
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
        if isinstance(layout, TokenLayout):
            if not _reads_only_extra_tokens(info, tensor, layout, reached):
                return tensor, RULE_LAST_MAP
            norm = _last_attention_norm(info, tensor, layout, reached)
            if norm is not None:
                return norm, RULE_CLASS_TOKEN
            continue
        if info.shapes[tensor][layout.channel_axis] == num_classes:
            tensor = _before_class_map_conv(info, tensor)
        return _step_back(info, tensor), RULE_LAST_MAP
    raise LayerNotFoundError(
        "the model has no feature map (a 4-D map, or a token sequence with a proven grid, "
        "with height and width > 1, computed from the image, that feeds the class score), so "
        "there is no layer for a CAM; if a tensor qualifies, pass it with layer=... (CLI: "
        "--layer), and state a token grid with grid=(H, W) (CLI: --grid HxW); `sp2ps "
        "inspect` shows the model's tensors"
    )


def stage_layers(info: GraphInfo, score: str) -> list[str]:
    """The last feature map of each spatial resolution (stage), from the finest to the
    coarsest: per-stage CAMs (``--layers stages``).

    Candidates are the maps every path from the input to the score passes through (as for
    :func:`choose_default_layer`), so that each one sees the whole image's evidence; within
    one resolution (H, W) the one computed last is taken, stepped back over layout-only ops.
    The coarsest stage is the default layer itself, so that per-stage scores end at the
    single-layer one.
    """
    default = choose_default_layer(info, score)[0]
    reached = _reaches_score(info, score)
    dominators = score_dominators(info, score, reached)
    last: dict[tuple[int, int], str] = {}
    for tensor in sorted((t for t in dominators if t in info.producer), key=info.producer.__getitem__):
        layout = _is_spatial_map(info, tensor)
        if layout is None:
            continue
        last[_map_size(info, tensor, layout)] = tensor
    default_size = _map_size(info, default, _is_spatial_map(info, default) or NCHW)
    last[default_size] = default
    stages = [_step_back(info, t) if t != default else t for t in last.values()]
    order = {t: info.producer.get(t, -1) for t in stages}
    ordered = sorted(set(stages), key=order.__getitem__)
    # Only maps up to the default layer: 1x1 maps or class maps after it are the head.
    return ordered[: ordered.index(default) + 1]


def _map_size(info: GraphInfo, tensor: str, layout: MapLayout) -> tuple[int, int]:
    if isinstance(layout, TokenLayout):
        return layout.grid
    shape = info.shapes[tensor]
    return (shape[layout.spatial_axes[0]], shape[layout.spatial_axes[1]])


def _reads_only_extra_tokens(
    info: GraphInfo, tensor: str, layout: TokenLayout, reached: set[str]
) -> bool:
    """Whether every consumer of ``tensor`` towards the score selects extra tokens only
    (a Gather or Slice on the token axis that keeps no patch)."""
    patches = range(layout.offset, layout.offset + layout.patches)
    consumers = [
        info.node(i)
        for i in info.consumers.get(tensor, [])
        if any(o in reached for o in info.node(i).output if o)
    ]
    if not consumers:
        return False
    for node in consumers:
        if node.input[0] != tensor:
            return False
        if node.op_type == "Gather":
            if int(attribute(node, "axis", 0)) % 3 != layout.token_axis:
                return False
            indices = info.static_value(node.input[1])
            if indices is None:
                return False
            kept = {int(i) % layout.tokens for i in np.asarray(indices).reshape(-1)}
        elif node.op_type == "Slice":
            kept = _sliced_positions(info, node, layout)
            if kept is None:
                return False
        else:
            return False
        if any(k in patches for k in kept):
            return False
    return True


def _sliced_positions(info: GraphInfo, node, layout: TokenLayout) -> set[int] | None:
    values = [info.static_value(n) if n else None for n in node.input[1:5]]
    if values[0] is None or values[1] is None:
        return None
    starts, ends = (np.asarray(v).reshape(-1) for v in values[:2])
    axes = np.arange(len(starts)) if len(values) < 3 or values[2] is None else values[2]
    steps = np.ones(len(starts), int) if len(values) < 4 or values[3] is None else values[3]
    axes, steps = np.asarray(axes).reshape(-1), np.asarray(steps).reshape(-1)
    kept: set[int] | None = None
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        if int(axis) % 3 == layout.token_axis:
            kept = set(range(layout.tokens)[slice(int(start), int(end), int(step))])
    return kept


def _last_attention_norm(
    info: GraphInfo, tensor: str, layout: TokenLayout, reached: set[str]
) -> str | None:
    """The output of the normalisation that feeds the last token-mixing op (attention:
    a MatMul of two image-dependent tensors) before ``tensor``, with the same token grid."""
    roles = axis_roles(info)
    end = info.producer[tensor]
    mixing = [
        i
        for i in range(end)
        if info.node(i).op_type == "MatMul"
        and all(n in info.input_dependent for n in info.node(i).input[:2])
        and info.node(i).output[0] in reached
    ]
    if not mixing:
        return None
    ancestors: set[str] = set()
    stack = [n for n in info.node(mixing[-1]).input if n in info.input_dependent]
    while stack:
        name = stack.pop()
        if name in ancestors:
            continue
        ancestors.add(name)
        if name in info.producer:
            stack.extend(n for n in info.node(info.producer[name]).input if n in info.input_dependent)
    best = None
    for name in ancestors:
        node = _producer(info, name)
        if node is None or not _is_normalisation(info, node):
            continue
        candidate = _token_layout(info, name, roles.get(name), None)
        if candidate is None or candidate.grid != layout.grid:
            continue
        if best is None or info.producer[name] > info.producer[best]:
            best = name
    return best


def _is_normalisation(info: GraphInfo, node) -> bool:
    if node.op_type in ("LayerNormalization", "SimplifiedLayerNormalization"):
        return True
    return decomposed_norm_axis(info, node) is not None


def _after_affine(info: GraphInfo, tensor: str) -> str:
    """A decomposed norm's output after its scale and shift (``* gamma + beta``), which the
    fused LayerNormalization includes."""
    for _ in range(2):
        consumers = info.consumers.get(tensor, [])
        if len(consumers) != 1:
            break
        node = info.node(consumers[0])
        others = [n for n in node.input if n != tensor]
        if node.op_type not in ("Mul", "Add") or len(others) != 1 or others[0] in info.input_dependent:
            break
        tensor = node.output[0]
    return tensor


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
    return backward_nodes(info, [target], score, model_name)


def backward_nodes(
    info: GraphInfo, sources: Sequence[str], score: str, model_name: str = "",
    cut: Sequence[str] = (),
) -> list[int]:  # fmt: skip
    """Indices, in graph order, of the nodes on differentiable paths from any of ``sources``
    (layers, or the model input) to ``score``: what a backward pass down to the earliest
    source runs through. Refuses an op without a gradient rule on the way by name. No
    gradient flows through the nodes that produce ``cut`` (held fixed)."""
    reached = _reaches_score(info, score)
    for source in sources:
        if source not in reached:
            raise LayerNotFoundError(
                f"the class score {score!r} does not depend on layer {source!r} through "
                "differentiable ops; choose a layer before the classifier head"
            )
    requires = set(sources)
    path: list[int] = []
    for idx, node in enumerate(info.graph.node):
        if node.op_type in NON_DIFFERENTIABLE or any(o in cut for o in node.output):
            continue
        flowing = [i for i in differentiable_inputs(node) if node.input[i] in requires]
        if not flowing or not any(o in reached for o in node.output if o):
            continue
        if rule_for(node) is None:
            raise UnsupportedOpError(
                node.op_type if not node.domain else f"{node.domain}.{node.op_type}",
                node.name or node.output[0],
                "met on the backward pass down to " + ", ".join(map(repr, sources[1:]))
                if len(sources) > 1 else "",
                model=model_name,
            )  # fmt: skip
        requires.update(o for o in node.output if o and _carries_gradient(info, o))
        path.append(idx)
    return path


def _carries_gradient(info: GraphInfo, tensor: str) -> bool:
    """Indices (MaxPool's second output, TopK's) carry none; quantized codes do."""
    dtype = info.dtypes.get(tensor)
    return dtype is None or dtype not in (np.dtype(np.int64), np.dtype(bool))


def requires_grad(info: GraphInfo, target: str | Sequence[str], path: list[int]) -> set[str]:
    """Tensors whose value depends differentiably on ``target`` (one tensor or several)
    within the head."""
    requires = {target} if isinstance(target, str) else set(target)
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
