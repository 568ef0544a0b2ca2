"""What each axis of a tensor stands for: batch, channels, image rows and columns, or tokens.

One forward pass over the graph, in graph order, gives every tensor computed from the image
a role per axis, starting from facts that hold by definition:

- the model input is (N, C, H, W), or (N, H, W, C) when its declared dims say so;
- Conv, pooling and the other channels-first ops output (N, C, H, W);
- a LayerNormalization over the last axis (or its decomposed form,
  ``(x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps)``, as older exporters and tf2onnx
  emit it) normalises over the channels, so that axis holds the channels.

Roles then travel through ops whose effect on the axes is known: Transposes permute them,
elementwise ops keep them, Reshapes merge or split adjacent axes (row-major, so merging
H and W in that order gives a token axis of H * W positions, and splitting it gives them
back), Slice/Split/Concat along the token axis move its grid's offset (a class token
prepended with Concat shifts it by one), and a MatMul with a weight on the last axis is a
linear layer over the channels. Anything else, such as attention mixing tokens or windows
folded into the batch, leaves the tensor without roles; residual Adds carry the roles of
their other operand. Nothing is inferred from sizes alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .analysis import GraphInfo, input_layout
from .model_io import attribute

BATCH, CHANNELS, ROWS, COLUMNS, UNKNOWN = "N", "C", "H", "W", "?"
# Offsets within a cell after rows or columns were split into (cells, offset in cell).
ROW_OFFSETS, COLUMN_OFFSETS = "h", "w"


@dataclass(frozen=True)
class Tokens:
    """A token axis: positions ``offset .. offset + rows * columns - 1`` are the patches of a
    ``rows x columns`` grid in row-major order; the others are extra tokens (class,
    distillation, register tokens)."""

    offset: int
    grid: tuple[int, int]

    @property
    def patches(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass(frozen=True)
class Merged:
    """Several axes merged into one by a Reshape (windows folded into the batch, a
    (N * T, C) view for a BatchNorm1d), kept so that the Reshape that splits them again
    gives their roles back."""

    parts: tuple
    sizes: tuple[int, ...]


Role = str | Tokens | Merged
Roles = tuple[Role, ...]

# Ops whose 4-D outputs are (N, C, H, W) by definition in ONNX.
CHANNELS_FIRST_OPS = frozenset(
    {
        "Conv", "ConvTranspose", "BatchNormalization", "MaxPool", "AveragePool",
        "GlobalAveragePool", "GlobalMaxPool", "InstanceNormalization", "LRN", "QLinearConv",
        "ConvInteger", "LpPool", "MaxUnpool", "Resize", "Upsample", "GlobalLpPool",
    }
)  # fmt: skip
# Ops whose output has the shape and the axes of their full-shaped inputs.
_ELEMENTWISE_OPS = frozenset(
    {
        "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Clip", "Sigmoid", "HardSigmoid",
        "HardSwish", "Tanh", "Softplus", "Gelu", "Erf", "Mul", "Add", "Sub", "Div", "Neg",
        "Pow", "Sqrt", "Exp", "Identity", "Dropout", "Cast", "QuantizeLinear",
        "DequantizeLinear", "Max", "Min", "Sum", "Abs", "Mish", "Where", "Softsign",
        "Reciprocal", "Log", "DynamicQuantizeLinear", "QLinearAdd", "QLinearMul",
        "QLinearSigmoid", "QLinearLeakyRelu", "Pad", "LayerNormalization",
        "SimplifiedLayerNormalization", "Softmax",
    }
)  # fmt: skip
_RESHAPING_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})


def axis_roles(info: GraphInfo) -> dict[str, Roles]:
    """Roles of the axes of every image-dependent tensor whose axes can be traced (cached)."""
    if info.axis_roles is None:
        info.axis_roles = _trace(info)
    return info.axis_roles


def _trace(info: GraphInfo) -> dict[str, Roles]:
    roles: dict[str, Roles] = {}
    dims = info.shapes.get(info.input_name, ())
    if len(dims) == 4:
        nhwc = input_layout(info.declared_input_dims) == "NHWC"
        roles[info.input_name] = (
            (BATCH, ROWS, COLUMNS, CHANNELS) if nhwc else (BATCH, CHANNELS, ROWS, COLUMNS)
        )
    for node in info.graph.node:
        if not node.output or not node.output[0] or node.output[0] not in info.input_dependent:
            continue
        try:
            produced = _node_roles(info, node, roles)
        except (KeyError, ValueError, IndexError, TypeError):
            produced = None
        if not produced:
            continue
        for name, value in produced.items():
            shape = info.shapes.get(name)
            if value is not None and shape is not None and len(shape) == len(value):
                if any(r != UNKNOWN for r in value):
                    roles[name] = value
    return roles


def _node_roles(info: GraphInfo, node, roles: dict[str, Roles]) -> dict[str, Roles] | None:
    op = node.op_type
    out = node.output[0]
    out_shape = info.shapes.get(out)
    if out_shape is None:
        return None
    if op in CHANNELS_FIRST_OPS and len(out_shape) == 4:
        return {out: (BATCH, CHANNELS, ROWS, COLUMNS)}
    if op == "BatchNormalization" and node.input[0] in roles and len(out_shape) >= 2:
        # BatchNorm1d on (N, C) or (N, C, L): axis 1 holds the channels.
        return {out: _mark_channels(roles[node.input[0]], 1, len(out_shape))}
    if op == "Transpose":
        source = roles.get(node.input[0])
        if source is None:
            return None
        perm = attribute(node, "perm", None) or list(range(len(source)))[::-1]
        return {out: tuple(source[p] for p in perm)}
    if op in _ELEMENTWISE_OPS:
        merged = _elementwise(info, node, roles, out_shape)
        if op in ("LayerNormalization", "SimplifiedLayerNormalization"):
            axis = int(attribute(node, "axis", -1)) % len(out_shape)
            if axis == len(out_shape) - 1:
                merged = _mark_channels(merged, axis, len(out_shape))
        else:
            axis = decomposed_norm_axis(info, node)
            if axis is not None:
                merged = _mark_channels(merged, axis, len(out_shape))
        return {out: merged} if merged is not None else None
    if op in _RESHAPING_OPS:
        source = roles.get(node.input[0])
        if source is None:
            return None
        return {out: _reshape(source, info.shapes[node.input[0]], out_shape)}
    if op == "Slice":
        return _slice(info, node, roles)
    if op == "Split":
        return _split(info, node, roles)
    if op == "Concat":
        return _concat(info, node, roles, out_shape)
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul"):
        return _linear(info, node, roles, out_shape)
    return None


def _elementwise(info, node, roles, out_shape) -> Roles | None:
    """Per axis, the role that every traced full-shaped input agrees on (a disagreement
    leaves the axis unknown); broadcast operands (biases, statistics) say nothing."""
    known = [
        roles[name]
        for name in node.input
        if name in roles and tuple(info.shapes.get(name, ())) == tuple(out_shape)
    ]
    if not known:
        return None
    merged = []
    for axis in range(len(out_shape)):
        seen = {r[axis] for r in known if r[axis] != UNKNOWN}
        merged.append(seen.pop() if len(seen) == 1 else UNKNOWN)
    return tuple(merged)


def _mark_channels(current: Roles | None, axis: int, rank: int) -> Roles:
    """The normalised ``axis`` holds the channels; a traced role other than channels there
    (rows, columns, tokens, batch) contradicts it, and the axis becomes unknown."""
    base = list(current) if current is not None else [UNKNOWN] * rank
    base[axis] = CHANNELS if base[axis] in (CHANNELS, UNKNOWN) else UNKNOWN
    return tuple(base)


def _producer(info: GraphInfo, name: str):
    index = info.producer.get(name)
    return None if index is None else info.node(index)


def _reduced_axes(info: GraphInfo, node) -> list[int] | None:
    if node is None or node.op_type != "ReduceMean" or attribute(node, "keepdims", 1) != 1:
        return None
    axes = attribute(node, "axes", None)
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = info.static_value(node.input[1])
        axes = None if value is None else [int(a) for a in np.asarray(value).reshape(-1)]
    if axes is None:
        return None
    rank = len(info.shapes.get(node.input[0], ()))
    return sorted(int(a) % rank for a in axes) if rank else None


def decomposed_norm_axis(info: GraphInfo, node) -> int | None:
    """The axis of a layer normalisation written out as ``Div`` (or ``Mul`` by a reciprocal)
    of ``x - ReduceMean(x)`` by a root of ``ReduceMean`` of its square over the same one
    axis; ``None`` for anything else."""
    if node.op_type not in ("Div", "Mul") or len(node.input) != 2:
        return None
    for centred_name, scale_name in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
        centred = _producer(info, centred_name)
        if centred is None or centred.op_type != "Sub":
            continue
        mean_axes = _reduced_axes(info, _producer(info, centred.input[1]))
        mean_node = _producer(info, centred.input[1])
        if mean_axes is None or len(mean_axes) != 1 or mean_node.input[0] != centred.input[0]:
            continue
        variance_axes = _variance_axes(info, scale_name, centred_name)
        if variance_axes == mean_axes:
            return mean_axes[0]
        if node.op_type == "Div":
            break  # the centred value must be the numerator of a division
    return None


def _variance_axes(info: GraphInfo, scale: str, centred: str) -> list[int] | None:
    """Axes of the ``ReduceMean(centred ** 2)`` that ``scale`` is a (reciprocal) root of,
    through Add (epsilon), Sqrt and Reciprocal."""
    current = _producer(info, scale)
    for _ in range(6):
        if current is None:
            return None
        if current.op_type == "ReduceMean":
            square = _producer(info, current.input[0])
            if square is None:
                return None
            squares_centred = (
                square.op_type == "Pow" and square.input[0] == centred
            ) or (square.op_type == "Mul" and list(square.input) == [centred, centred])
            return _reduced_axes(info, current) if squares_centred else None
        if current.op_type not in ("Add", "Sqrt", "Reciprocal"):
            return None
        dependent = [i for i in current.input if i in info.input_dependent]
        if len(dependent) != 1:
            return None
        current = _producer(info, dependent[0])
    return None


def _reshape(source: Roles, in_shape: Sequence[int], out_shape: Sequence[int]) -> Roles:
    """Roles after a row-major reshape: axes are matched in groups of equal size products
    (size-1 axes aside); a group that merges or splits axes gets the role of the result."""
    out: list[Role] = [UNKNOWN] * len(out_shape)
    start_in = start_out = 0
    # The first axis keeps its meaning when its size does: row-major order maps block i of
    # the input onto block i of the output.
    if in_shape and out_shape and in_shape[0] == out_shape[0] and source[0] == BATCH:
        out[0] = BATCH
        start_in = start_out = 1
    ins = [i for i in range(start_in, len(in_shape)) if in_shape[i] != 1]
    outs = [o for o in range(start_out, len(out_shape)) if out_shape[o] != 1]
    i = o = 0
    while i < len(ins) and o < len(outs):
        group_in, group_out = [ins[i]], [outs[o]]
        size_in, size_out = in_shape[ins[i]], out_shape[outs[o]]
        i, o = i + 1, o + 1
        while size_in != size_out:
            if size_in < size_out and i < len(ins):
                size_in *= in_shape[ins[i]]
                group_in.append(ins[i])
                i += 1
            elif size_out < size_in and o < len(outs):
                size_out *= out_shape[outs[o]]
                group_out.append(outs[o])
                o += 1
            else:
                return tuple(out)
        for axis, role in zip(group_out, _regroup(source, group_in, in_shape, group_out, out_shape), strict=True):
            out[axis] = role
    return tuple(out)


def _regroup(source, group_in, in_shape, group_out, out_shape) -> list[Role]:
    roles = [source[a] for a in group_in]
    if len(group_in) == 1 and len(group_out) == 1:
        return roles
    if len(group_out) == 1:  # merge
        if roles == [ROWS, COLUMNS]:
            return [Tokens(0, (in_shape[group_in[0]], in_shape[group_in[1]]))]
        if roles in ([ROWS, ROW_OFFSETS], [COLUMNS, COLUMN_OFFSETS]):
            return [roles[0]]  # cells and offsets within them: the full axis again
        if CHANNELS in roles and set(roles) <= {CHANNELS, UNKNOWN, ROW_OFFSETS, COLUMN_OFFSETS}:
            # Space-to-depth (patch merging) folds pixel offsets into the channels.
            return [CHANNELS]
        if all(r == UNKNOWN for r in roles):
            return [UNKNOWN]
        return [Merged(tuple(roles), tuple(in_shape[a] for a in group_in))]
    if len(group_in) == 1:  # split
        role = roles[0]
        sizes = tuple(out_shape[a] for a in group_out)
        if isinstance(role, Tokens) and role.offset == 0 and sizes == role.grid:
            return [ROWS, COLUMNS]
        if isinstance(role, Merged) and sizes == role.sizes:
            return list(role.parts)
        if role in (ROWS, COLUMNS) and len(sizes) == 2:
            # (H) -> (H / s, s): cells of s rows, and the offset within a cell.
            return [role, ROW_OFFSETS if role == ROWS else COLUMN_OFFSETS]
        return [UNKNOWN] * len(sizes)
    return [UNKNOWN] * len(group_out)


def _static_ints(info: GraphInfo, name: str) -> list[int] | None:
    value = info.static_value(name) if name else None
    return None if value is None else [int(v) for v in np.asarray(value).reshape(-1)]


def _sliced(role: Role, size: int, kept: range) -> Role:
    """The role of an axis of ``size`` of which positions ``kept`` remain."""
    if len(kept) == size:
        return role
    if role == CHANNELS:
        return CHANNELS
    if role in (ROWS, COLUMNS) and kept and kept.step > 1:
        # Strided subsampling over the whole axis (LeViT's token subsampling) keeps a
        # coarser grid over the same image; a crop does not.
        if kept.start < kept.step and kept[-1] >= size - kept.step:
            return role
    if isinstance(role, Tokens) and kept.step == 1:
        if kept.start <= role.offset and kept.stop >= role.offset + role.patches:
            return Tokens(role.offset - kept.start, role.grid)
    return UNKNOWN


def _slice(info: GraphInfo, node, roles) -> dict[str, Roles] | None:
    source = roles.get(node.input[0])
    if source is None:
        return None
    shape = info.shapes[node.input[0]]
    starts = _static_ints(info, node.input[1])
    ends = _static_ints(info, node.input[2])
    axes = _static_ints(info, node.input[3]) if len(node.input) > 3 and node.input[3] else None
    steps = _static_ints(info, node.input[4]) if len(node.input) > 4 and node.input[4] else None
    if starts is None or ends is None:
        return None
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    out = list(source)
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis %= len(shape)
        kept = range(shape[axis])[slice(start, end, step)]
        out[axis] = _sliced(source[axis], shape[axis], kept)
    return {node.output[0]: tuple(out)}


def _split(info: GraphInfo, node, roles) -> dict[str, Roles] | None:
    source = roles.get(node.input[0])
    if source is None:
        return None
    shape = info.shapes[node.input[0]]
    axis = int(attribute(node, "axis", 0)) % len(shape)
    produced: dict[str, Roles] = {}
    start = 0
    for name in node.output:
        size = info.shapes[name][axis]
        out = list(source)
        out[axis] = _sliced(source[axis], shape[axis], range(start, start + size))
        produced[name] = tuple(out)
        start += size
    return produced


def _concat(info: GraphInfo, node, roles, out_shape) -> dict[str, Roles] | None:
    axis = int(attribute(node, "axis", 0)) % len(out_shape)
    parts = [n for n in node.input if n]
    traced = [(k, roles[n]) for k, n in enumerate(parts) if n in roles]
    if not traced:
        return None
    out: list[Role] = []
    for a in range(len(out_shape)):
        if a == axis:
            continue
        seen = {r[a] for _, r in traced if r[a] != UNKNOWN}
        out.append(seen.pop() if len(seen) == 1 else UNKNOWN)
    along = [(k, r[axis]) for k, r in traced]
    tokens = [(k, r) for k, r in along if isinstance(r, Tokens)]
    if len(tokens) == 1 and len(parts) > 1:
        k, role = tokens[0]
        before = sum(info.shapes[parts[j]][axis] for j in range(k))
        joined: Role = Tokens(role.offset + before, role.grid)
    elif len(along) == len(parts) and all(r == CHANNELS for _, r in along):
        joined = CHANNELS
    else:
        joined = UNKNOWN
    out.insert(axis, joined)
    return {node.output[0]: tuple(out)}


def _linear(info: GraphInfo, node, roles, out_shape) -> dict[str, Roles] | None:
    """``x @ W`` with a fixed 2-D weight: a linear layer over x's last axis (channels).
    ``A @ B`` of two image-dependent tensors (attention): the rows of A and the columns of
    B, as matrix products define them (row i of ``softmax(q k^T) v`` belongs to query i)."""
    source = roles.get(node.input[0])
    weight = node.input[3] if node.op_type == "QLinearMatMul" else node.input[1]
    if weight in info.input_dependent:
        other = roles.get(weight)
        if source is None or other is None or not len(source) == len(other) == len(out_shape) >= 2:
            return None
        leading = []
        for a, b in zip(source[:-2], other[:-2], strict=True):
            leading.append(a if a == b or b == UNKNOWN else b if a == UNKNOWN else UNKNOWN)
        return {node.output[0]: (*leading, source[-2], other[-1])}
    if source is None:
        return None
    value = info.static_value(weight)
    if value is None or np.ndim(value) != 2:
        return None
    if len(out_shape) != len(source) or source[-1] not in (CHANNELS, UNKNOWN):
        return None
    return {node.output[0]: (*source[:-1], CHANNELS)}

