"""Cascading weight randomisation: the random floor that Sp2PS scores are read against.

Adebayo et al. ("Sanity checks for saliency maps", NeurIPS 2018) re-initialise a trained
network's weights layer by layer, starting at the class score and moving towards the input.
An explanation that survives this does not depend on what the model learnt. Sp2PS uses the
fully randomised copy as a floor: a pruned model that scores near it has kept none of the
original's attention.

The copy is made by rewriting the ONNX tensors that hold the weights: initializers and
``Constant`` nodes, read through the ops that exporters and quantizers put in front of them
(``DequantizeLinear``, ``Transpose``, ``Reshape``, ``Cast``, ...). Every artifact the engine
accepts can therefore be randomised: float exports, QDQ and QOperator quantization,
ONNX Runtime dynamic quantization, TFLite graphs converted by tf2onnx, and Paddle graphs.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import InputDataError, UnsupportedModelError
from .model_io import attribute, load_model, naming_the_model

METADATA_KEY = "sp2ps_onnx.randomized_weights"
"""``metadata_props`` key that records how a randomised copy was made."""

# Layers whose weight sits at a fixed input: op -> (weight position, bias position).
_FIXED_WEIGHT = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "ConvInteger": (1, None),
    "QLinearConv": (3, 8),
}
# Layers that multiply two operands, either of which may be the stored weight:
# op -> (left position, right position, bias position).
_MATRIX_PRODUCT = {
    "MatMul": (0, 1, None),
    "MatMulInteger": (0, 1, None),
    "QLinearMatMul": (0, 3, None),
    "Gemm": (0, 1, 2),
    "QGemm": (0, 3, 6),
}
LAYER_OPS = frozenset(_FIXED_WEIGHT) | frozenset(_MATRIX_PRODUCT)
"""Op types that make a weight layer when one of their weight operands is stored."""

# Ops between a stored tensor and its user that only change its layout, dtype or encoding
# (a float weight or bias quantized in the graph: QuantizeLinear or DynamicQuantizeLinear,
# then DequantizeLinear, as tf2onnx writes a TFLite dynamic-range bias).
_LAYOUT_KEEPING = frozenset({"Identity", "Cast", "Transpose", "QuantizeLinear",
                             "DequantizeLinear", "DynamicQuantizeLinear"})
_RANK_CHANGING = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})
# Ops between a layer and its bias that do not change which channel a value belongs to.
_CHANNEL_KEEPING = frozenset({"Cast", "QuantizeLinear", "DequantizeLinear"})
# Normalisations right after a layer: their learnt scale (1) and shift (2) belong to it.
_NORMALISATIONS = frozenset({"BatchNormalization", "InstanceNormalization", "LayerNormalization"})
# Fewer weights than this per output channel: one channel's own mean and spread would pin
# its few values, so the whole tensor's statistics are used instead.
MIN_CHANNEL_SIZE = 4
_FIT_ROUNDS = 50
_SUB_BYTE_RANGES = {"int4": (-8, 7), "uint4": (0, 15), "int2": (-2, 1), "uint2": (0, 3)}


@dataclass(frozen=True)
class WeightLayer:
    """One weight layer of a model, as the cascade sees it.

    ``node`` is the node's name (``"<op>#<index>"`` when it has none), ``distance`` the
    number of weight layers on the longest path from this layer to a graph output (0 for
    the last layer; ``None`` when no output depends on it), and ``parameters`` the stored
    tensors (initializer or ``Constant`` output names) that randomising it re-initialises:
    its weight first, then its bias and the scale and shift of a normalisation right after.
    """

    node: str
    op_type: str
    distance: int | None
    parameters: tuple[str, ...]


@dataclass(frozen=True)
class _Parameter:
    stored: str
    channel_axis: int | None  # axis of the stored tensor that indexes output channels


@dataclass(frozen=True)
class _Layer:
    public: WeightLayer
    parameters: tuple[_Parameter, ...]


def weight_layers(
    model: str | os.PathLike | onnx.ModelProto, allow_domains: Iterable[str] = ()
) -> list[WeightLayer]:
    """The model's weight layers in cascade order: the layer nearest the output first.

    A weight layer is a ``Conv``, ``ConvTranspose``, ``ConvInteger`` or ``QLinearConv``
    node, or a ``Gemm``, ``MatMul``, ``MatMulInteger``, ``QLinearMatMul`` or ``QGemm`` node
    with exactly one stored operand (a product of two activations has no weights). Layers
    are ordered by ``distance``; layers at the same distance (parallel branches) by their
    position in the graph, later first. Layers that no output depends on come last.
    """
    proto, path = load_model(model, allow_domains)
    with naming_the_model(path):
        return [layer.public for layer in _GraphIndex(proto.graph).layers()]


def randomize_weights(
    model: str | os.PathLike | onnx.ModelProto,
    *,
    seed: int,
    layers: int | None = None,
    allow_domains: Iterable[str] = (),
) -> onnx.ModelProto:
    """A copy of ``model`` whose weight layers are re-initialised from the output backwards.

    This is the cascading randomisation of Adebayo et al. (NeurIPS 2018). ``layers=None``
    re-initialises every weight layer (the random floor); ``layers=k`` only the ``k`` layers
    nearest the output, in the order of :func:`weight_layers` (one step of the cascade;
    ``k=0`` changes nothing). The input proto and file are never modified.

    What is re-initialised: the learnt parameters of each weight layer, i.e. its weight, its
    bias (an input of the node, or a constant ``Add`` right after it, as tf2onnx, Paddle and
    ONNX Runtime's dynamic quantization write it) and the scale and shift of a
    ``BatchNormalization``, ``InstanceNormalization`` or ``LayerNormalization`` that
    normalises its output.

    What is kept: quantization scales and zero points (so integer weights stay integers of
    the same dtype on the same grid), BatchNorm running means and variances (statistics of
    the activations, not learnt by gradient descent; exporters that fold BatchNorm into the
    convolution put them inside the weight, where the per-channel scale below keeps their
    effect), shape and index constants, and float constants that belong to no weight layer
    (e.g. a mean/std normalisation of the input baked into the graph).

    How: each tensor gets fresh values drawn i.i.d. from a normal distribution, then shifted
    and scaled so that each output channel has exactly the mean and standard deviation that
    channel had (a channel of fewer than :data:`MIN_CHANNEL_SIZE` values, a bias, or a
    weight whose channel axis cannot be traced through a ``Reshape``: the whole tensor's).
    Keeping each channel's scale keeps activations in the range the rest of the graph
    expects, so the floor measures random features rather than exploding or vanishing
    activations. Quantized weights are drawn on their integer codes and rounded; draws
    beyond the dtype's range are clipped and the moments restored until they fit, so a
    dequantized channel keeps its mean and spread up to rounding. A tensor whose values are
    all equal keeps them.

    Deterministic: the same model, ``seed`` and ``layers`` give a byte-identical model. The
    ``i``-th layer of the cascade draws from its own generator, seeded by ``(seed, i)``, so
    a layer gets the same values at every step of the cascade that includes it. The copy
    records ``seed`` and ``layers`` in its ``metadata_props`` under :data:`METADATA_KEY`.

    Raises :class:`~sp2ps_onnx.errors.InputDataError` for a negative or non-integer
    ``seed`` or ``layers`` out of range, and :class:`~sp2ps_onnx.errors.UnsupportedModelError`
    for a model without weight layers or with a weight that is computed, not stored.
    """
    _check_count("seed", seed)
    if layers is not None:
        _check_count("layers", layers)
    proto, path = load_model(model, allow_domains)
    with naming_the_model(path):
        cascade = _GraphIndex(proto.graph).layers()
        if not cascade:
            raise UnsupportedModelError(
                "the model has no weight layers (Conv, Gemm, MatMul with a stored operand, or "
                "their quantized forms) to randomise; a random floor cannot be built for it, "
                "so turn the floor off (CLI: --no-floor)"
            )
        count = len(cascade) if layers is None else layers
        if count > len(cascade):
            raise InputDataError(
                f"layers={layers} asks for more layers than the model's {len(cascade)} weight "
                f"layers; give at most {len(cascade)}, or None for all of them"
            )
        store = _TensorStore(proto.graph)
        done: set[str] = set()
        for step, layer in enumerate(cascade[:count]):
            generator = np.random.default_rng([seed, step])
            for parameter in layer.parameters:
                if parameter.stored in done:  # shared with a layer nearer the output
                    continue
                done.add(parameter.stored)
                store.write(parameter.stored, _redraw(store.read(parameter.stored),
                                                      parameter.channel_axis, generator))
    described = "all" if layers is None else str(layers)
    _set_metadata(proto, METADATA_KEY,
                  f"cascading randomisation; seed={seed}; layers={described} of {len(cascade)}")
    return proto


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise InputDataError(f"{name} must be a non-negative integer, not {value!r}")


def _set_metadata(proto: onnx.ModelProto, key: str, value: str) -> None:
    for entry in proto.metadata_props:
        if entry.key == key:
            entry.value = value
            return
    proto.metadata_props.add(key=key, value=value)


class _TensorStore:
    """Reads and rewrites the tensors stored in initializers and ``Constant`` nodes."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self._initializers = {init.name: init for init in graph.initializer}
        self._constants = {
            node.output[0]: node
            for node in graph.node
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx")
            and len(node.attribute) == 1 and node.attribute[0].name != "sparse_value"
        }

    def __contains__(self, name: str) -> bool:
        return name in self._initializers or name in self._constants

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._initializers:
            return tuple(self._initializers[name].dims)
        attr = self._constants[name].attribute[0]
        return tuple(attr.t.dims) if attr.name == "value" else self.read(name).shape

    def read(self, name: str) -> np.ndarray:
        if name in self._initializers:
            return numpy_helper.to_array(self._initializers[name])
        attr = self._constants[name].attribute[0]
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        return np.asarray(onnx.helper.get_attribute_value(attr))

    def write(self, name: str, values: np.ndarray) -> None:
        if name in self._initializers:
            self._initializers[name].CopyFrom(numpy_helper.from_array(values, name))
            return
        attr = self._constants[name].attribute[0]
        tensor_name = attr.t.name if attr.name == "value" else ""
        attr.CopyFrom(onnx.helper.make_attribute("value", numpy_helper.from_array(values,
                                                                                  tensor_name)))


class _GraphIndex:
    """Producers, consumers and topological order of one graph, and its weight layers."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.nodes = list(graph.node)
        self.store = _TensorStore(graph)
        self.outputs = {o.name for o in graph.output}
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        for index, node in enumerate(self.nodes):
            for name in node.output:
                if name:
                    self.producer[name] = index
            for name in _used_names(node):
                self.consumers.setdefault(name, []).append(index)
        self._check_subgraphs()

    def _check_subgraphs(self) -> None:
        for node in self.nodes:
            for inner in _subgraph_nodes(node):
                if inner.op_type in LAYER_OPS:
                    raise UnsupportedModelError(
                        f"{inner.op_type} node {inner.name!r} sits inside the subgraph of "
                        f"{node.op_type} node {node.name!r}; weights inside control flow are "
                        "not randomised, so turn the random floor off (CLI: --no-floor)"
                    )

    def layers(self) -> list[_Layer]:
        """Weight layers in cascade order (see :func:`weight_layers`)."""
        order = self._topological_order()
        found: dict[int, tuple[_Parameter, ...]] = {}
        for index in order:
            parameters = self._layer_parameters(index)
            if parameters:
                found[index] = parameters
        distance = self._distances(order, set(found))
        position = {index: rank for rank, index in enumerate(order)}
        ranked = sorted(found, key=lambda i: (distance[i] is None, distance[i] or 0, -position[i]))
        return [
            _Layer(
                public=WeightLayer(
                    node=self.nodes[i].name or f"{self.nodes[i].op_type}#{i}",
                    op_type=self.nodes[i].op_type,
                    distance=distance[i],
                    parameters=tuple(p.stored for p in found[i]),
                ),
                parameters=found[i],
            )
            for i in ranked
        ]

    def _topological_order(self) -> list[int]:
        # ONNX requires sorted nodes, but the cascade must not depend on a writer's care.
        waiting = [0] * len(self.nodes)
        for index, node in enumerate(self.nodes):
            waiting[index] = len({n for n in _used_names(node) if n in self.producer})
        ready = deque(i for i, count in enumerate(waiting) if count == 0)
        order: list[int] = []
        while ready:
            index = ready.popleft()
            order.append(index)
            for name in self.nodes[index].output:
                for user in sorted(set(self.consumers.get(name, ()))):
                    waiting[user] -= 1
                    if waiting[user] == 0:
                        ready.append(user)
        if len(order) != len(self.nodes):
            raise UnsupportedModelError(
                "the model's graph has a cycle, so its layers have no order from the output; "
                "export it again (onnx.checker.check_model names the problem)"
            )
        return order

    def _distances(self, order: list[int], layers: set[int]) -> dict[int, int | None]:
        """Weight layers on the longest path from each node's output to a graph output."""
        below: dict[int, int | None] = {}
        for index in reversed(order):
            reached = [0 for name in self.nodes[index].output if name in self.outputs]
            reached += [
                below[user] + (user in layers)
                for name in self.nodes[index].output
                for user in self.consumers.get(name, ())
                if below.get(user) is not None
            ]
            below[index] = max(reached) if reached else None
        return {index: below[index] for index in layers}

    def _layer_parameters(self, index: int) -> tuple[_Parameter, ...]:
        node = self.nodes[index]
        if node.domain not in ("", "ai.onnx", "com.microsoft"):
            return ()
        if node.op_type in _FIXED_WEIGHT:
            position, bias_position = _FIXED_WEIGHT[node.op_type]
            axis = 1 if node.op_type == "ConvTranspose" else 0
            weight = self._source(node, position, axis)
            if weight is None:
                raise self._computed_weight(node, position)
        elif node.op_type in _MATRIX_PRODUCT:
            left, right, bias_position = _MATRIX_PRODUCT[node.op_type]
            transposed = {"A": False, "B": False}
            if node.op_type in ("Gemm", "QGemm"):
                transposed = {k: bool(attribute(node, f"trans{k}", 0)) for k in transposed}
            # Output features index the columns of a right weight and the rows of a left one.
            right_source = self._source(node, right, 0 if transposed["B"] else -1)
            left_source = self._source(node, left, 1 if transposed["A"] else -2)
            if (right_source is None) == (left_source is None):
                return ()  # a product of two activations, or constant arithmetic
            weight = right_source or left_source
        else:
            return ()
        channels = self._channel_count(node, weight)
        parameters = [weight]
        has_bias = bias_position is not None and len(node.input) > bias_position and bool(
            node.input[bias_position])
        if has_bias:
            bias = self._source(node, bias_position, None)
            if bias is not None:
                parameters.append(bias)
        parameters.extend(self._attached_parameters(node, channels, has_bias))
        return tuple(parameters)

    def _computed_weight(self, node: onnx.NodeProto, position: int) -> UnsupportedModelError:
        name = node.input[position] if len(node.input) > position else ""
        source = self.producer.get(name)
        how = (f"is computed by a {self.nodes[source].op_type} node" if source is not None
               else "is a graph input")
        return UnsupportedModelError(
            f"cannot randomise {node.op_type} node {node.name!r}: its weight {name!r} {how}, "
            "not stored in the model; export it with constant folding (e.g. torch.onnx "
            "do_constant_folding=True, or onnxsim), or turn the random floor off (CLI: "
            "--no-floor)"
        )

    def _source(self, node: onnx.NodeProto, position: int, axis: int | None) -> _Parameter | None:
        """The stored tensor behind ``node.input[position]`` and its output-channel axis, or
        None when the input is not (a layout change of) a stored tensor."""
        if len(node.input) <= position or not node.input[position]:
            return None
        name = node.input[position]
        transposes: list[list[int] | None] = []
        rank_changed = False
        while name not in self.store:
            if name not in self.producer:
                return None
            producer = self.nodes[self.producer[name]]
            if producer.op_type in _RANK_CHANGING:
                rank_changed = True
            elif producer.op_type == "Transpose":
                perm = attribute(producer, "perm", None)
                transposes.append(list(perm) if perm is not None else None)
            elif producer.op_type not in _LAYOUT_KEEPING:
                return None
            name = producer.input[0]
        if axis is None or rank_changed:
            return _Parameter(name, None)
        rank = len(self.store.shape(name))
        if rank == 0:
            return _Parameter(name, None)
        axis %= rank
        for perm in transposes:  # output axis i of a Transpose is its input axis perm[i]
            axis = perm[axis] if perm is not None else rank - 1 - axis
        return _Parameter(name, axis)

    def _channel_count(self, node: onnx.NodeProto, weight: _Parameter) -> int | None:
        if weight.channel_axis is None:
            return None
        count = int(self.store.shape(weight.stored)[weight.channel_axis])
        if node.op_type == "ConvTranspose":
            count *= int(attribute(node, "group", 1))
        return count

    def _attached_parameters(
        self, node: onnx.NodeProto, channels: int | None, has_bias: bool
    ) -> Iterator[_Parameter]:
        """A bias added right after the layer and the scale and shift of a normalisation
        right after it (or after that bias)."""
        tensor = node.output[0]
        integer_output = node.op_type in ("ConvInteger", "MatMulInteger")
        while tensor not in self.outputs and len(set(self.consumers.get(tensor, ()))) == 1:
            user = self.nodes[self.consumers[tensor][0]]
            others = [i for i, name in enumerate(user.input) if name and name != tensor]
            if user.op_type in _CHANNEL_KEEPING and user.input[0] == tensor:
                tensor = user.output[0]
            elif user.op_type == "Mul" and integer_output and all(
                self._source(user, i, None) is None for i in others
            ):  # the dynamic rescale (x_scale * w_scale) of ConvInteger/MatMulInteger
                tensor = user.output[0]
            elif user.op_type in ("Add", "QLinearAdd") and not has_bias:
                # QLinearAdd(A, A_scale, A_zp, B, B_scale, B_zp, ...): the operands are 0 and 3
                first, second = (0, 3) if user.op_type == "QLinearAdd" else (0, 1)
                operand = second if user.input[first] == tensor else first
                bias = self._source(user, operand, None)
                if bias is None or not self._is_channel_vector(bias.stored, channels):
                    return
                yield bias
                has_bias = True
                tensor = user.output[0]
            elif user.op_type in _NORMALISATIONS and user.input[0] == tensor:
                for position in (1, 2):
                    parameter = self._source(user, position, None)
                    if parameter is not None:
                        yield parameter
                return
            else:
                return

    def _is_channel_vector(self, stored: str, channels: int | None) -> bool:
        shape = self.store.shape(stored)
        size = int(np.prod(shape))
        if channels is not None:
            return channels > 1 and size == channels
        return size > 1 and sum(d > 1 for d in shape) == 1


def _redraw(values: np.ndarray, channel_axis: int | None, generator: np.random.Generator
            ) -> np.ndarray:
    """Fresh i.i.d. normal values with the mean and standard deviation of ``values``, per
    output channel where ``channel_axis`` is given and channels hold enough values."""
    if values.size == 0:
        return values
    per_channel = (channel_axis is not None and values.ndim > 0
                   and values.size // values.shape[channel_axis] >= MIN_CHANNEL_SIZE)
    moved = np.moveaxis(values.astype(np.float64), channel_axis, 0) if per_channel else (
        values.astype(np.float64))
    groups = moved.reshape(moved.shape[0], -1) if per_channel else moved.reshape(1, -1)
    mean = groups.mean(axis=1, keepdims=True)
    spread = groups.std(axis=1, keepdims=True)
    # exact moments: a small channel's sample moments would stray far from the original's
    fresh = mean + spread * _standardised(generator.standard_normal(groups.shape))
    integer_range = _integer_range(values.dtype)
    if integer_range is not None:
        # Quantizers map a channel's extreme weight to the end of the code range, so normal
        # draws with its spread overshoot; clipping them alone would shrink the spread and
        # shift the mean. Clip and restore the moments until the draws fit (the original
        # codes show that they can).
        for _ in range(_FIT_ROUNDS):
            clipped = np.clip(fresh, *integer_range)
            if np.array_equal(clipped, fresh):
                break
            fresh = mean + spread * _standardised(clipped)
        fresh = np.clip(np.rint(fresh), *integer_range)
    fresh = fresh.reshape(moved.shape)
    if per_channel:
        fresh = np.moveaxis(fresh, 0, channel_axis)
    return fresh.astype(values.dtype)


def _standardised(rows: np.ndarray) -> np.ndarray:
    """Each row shifted and scaled to mean 0 and standard deviation 1 (0 where constant)."""
    centred = rows - rows.mean(axis=1, keepdims=True)
    spread = centred.std(axis=1, keepdims=True)
    return np.divide(centred, spread, out=np.zeros_like(centred), where=spread > 0)


def _integer_range(dtype: np.dtype) -> tuple[int, int] | None:
    if dtype.name in _SUB_BYTE_RANGES:
        return _SUB_BYTE_RANGES[dtype.name]
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return int(info.min), int(info.max)
    return None


def _subgraph_nodes(node: onnx.NodeProto) -> Iterator[onnx.NodeProto]:
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for graph in graphs:
            for inner in graph.node:
                yield inner
                yield from _subgraph_nodes(inner)


def _used_names(node: onnx.NodeProto) -> set[str]:
    """Tensors ``node`` reads, including those its subgraphs read from the outer scope."""
    names = {name for name in node.input if name}
    for inner in _subgraph_nodes(node):
        names.update(name for name in inner.input if name)
    return names
