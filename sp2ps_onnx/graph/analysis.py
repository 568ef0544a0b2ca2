"""Static facts about a model's graph, plus one probing run for concrete shapes and dtypes.

Shape inference alone leaves holes in real exports (Paddle's dynamic Reshape, tf2onnx's
symbolic dims), so the rewrite reads shapes off one ONNX Runtime run at batch 2 instead:
at batch 2 a dim of size 1 is a true broadcast dim and never the batch.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx

from .._ort import ort
from ..errors import ModelLoadError, UnsupportedModelError
from .model_io import constant_values, dims_of, graph_inputs

PROBE_BATCH = 2
# Tensors up to this many elements that do not depend on the input are kept as constants
# (index and shape arithmetic that exporters leave unfolded).
_FOLD_LIMIT = 1 << 16
DEFAULT_SPATIAL = 224
# The probing run allocates the input (and every intermediate tensor) at these sizes, so
# absurd declared dims are refused before anything is allocated.
MAX_INPUT_ELEMENTS = 1 << 27  # per sample: e.g. 3 x 6688 x 6688
MAX_FIXED_BATCH = 1024


@dataclass
class GraphInfo:
    """Index of one graph: producers, consumers, constants and probed shapes/dtypes."""

    model: onnx.ModelProto
    input_name: str
    input_shape: tuple[int, ...]  # concrete probe shape, batch = probe batch
    declared_input_dims: list[int | str | None]
    producer: dict[str, int] = field(default_factory=dict)
    consumers: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, np.dtype] = field(default_factory=dict)
    input_dependent: set[str] = field(default_factory=set)
    # Input-dependent tensors whose VALUE depends on the input's values, not only its shape.
    value_dependent: set[str] = field(default_factory=set)
    # Small values that depend on the input's shape only (TF-"SAME" pads, Resize sizes):
    # fixed once the input size is fixed; used after a check that the batch does not change them.
    size_values: dict[str, np.ndarray] = field(default_factory=dict)
    # Integer activation tensor -> (scale, zero point) tensor names that dequantize it.
    quant_params: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    # (scale, zero point) with which an integer (int8/uint8) model input is quantized.
    input_quantization: tuple[float, int] | None = None
    batch_relaxed: bool = False
    fixed_batch: int | None = None  # set when the model only runs at this batch size
    _invariant: set[str] | None = field(default=None, repr=False)
    # What each axis of a tensor stands for; filled lazily by graph.axes.axis_roles.
    axis_roles: dict | None = field(default=None, repr=False)

    @property
    def graph(self) -> onnx.GraphProto:
        return self.model.graph

    def node(self, index: int) -> onnx.NodeProto:
        return self.model.graph.node[index]

    def static_value(self, name: str) -> np.ndarray | None:
        """The value of ``name`` if it does not depend on the model input's values.

        Values computed from the input's shape alone are folded: the engine runs at one fixed
        input size, and they are used only when a second probe at another batch size gives
        the same value.
        """
        if name in self.constants:
            return self.constants[name]
        if name in self.size_values and name not in self.value_dependent:
            return self.size_values[name] if self._batch_invariant(name) else None
        return None

    def _batch_invariant(self, name: str) -> bool:
        if self._invariant is None:
            self._invariant = _batch_invariant_names(self)
        return name in self._invariant


def _make_index(info: GraphInfo) -> None:
    for i, node in enumerate(info.graph.node):
        for out in node.output:
            if out:
                info.producer[out] = i
        for inp in node.input:
            if inp:
                info.consumers[inp].append(i)
    info.constants = constant_values(info.graph)
    dependent = {info.input_name}
    for node in info.graph.node:
        if any(inp in dependent for inp in node.input if inp):
            dependent.update(o for o in node.output if o)
    info.input_dependent = dependent
    # Shape and Size read only the shape: what follows them is fixed once the size is fixed.
    by_value = {info.input_name}
    for node in info.graph.node:
        if node.op_type in ("Shape", "Size"):
            continue
        if any(inp in by_value for inp in node.input if inp):
            by_value.update(o for o in node.output if o)
    info.value_dependent = by_value
    info.quant_params = quantization_params(info.graph)


def analyse(
    model: onnx.ModelProto,
    input_size: tuple[int, int] | None = None,
    path: str | None = None,
) -> GraphInfo:
    """Index ``model`` and probe it once; relaxes a fixed batch of 1 when that is safe."""
    where = path or "model"
    inputs = graph_inputs(model.graph)
    if len(inputs) != 1:
        names = ", ".join(vi.name for vi in inputs)
        raise UnsupportedModelError(
            f"{where} has {len(inputs)} inputs ({names}); sp2ps explains single-input image "
            "classifiers — export the model with the image as its only input"
        )
    vi = inputs[0]
    dims = dims_of(vi)
    if len(dims) != 4:
        raise UnsupportedModelError(
            f"{where}: input {vi.name!r} has rank {len(dims) or 'unknown'}, expected a 4-D image "
            "batch (N,C,H,W) or (N,H,W,C); re-export with a fixed-rank image input"
        )
    _check_image_dtype(vi, where)
    concrete = _concrete_input_shape(dims, input_size, where)
    info = GraphInfo(model=model, input_name=vi.name, input_shape=concrete, declared_input_dims=dims)
    _make_index(info)

    if isinstance(dims[0], int):
        relaxed = _relax_batch(model)
        fixed_batch = dims[0]
        try:
            shapes, dtypes, values = _probe(relaxed, vi.name, (PROBE_BATCH, *concrete[1:]))
            if not _batch_consistent(model, relaxed, vi.name, concrete, fixed_batch):
                raise RuntimeError("outputs differ from per-sample runs")
            info.model = relaxed
            info.batch_relaxed = True
        except Exception:
            # Hard-coded batch in a Reshape or similar: run per sample instead.
            shapes, dtypes, values = _probe(model, vi.name, (fixed_batch, *concrete[1:]))
            info.fixed_batch = fixed_batch
        _make_index(info)
    else:
        shapes, dtypes, values = _probe(model, vi.name, (PROBE_BATCH, *concrete[1:]))
    info.shapes = shapes
    info.dtypes = dtypes
    for name, value in values.items():
        if name not in info.input_dependent and name not in info.constants:
            info.constants[name] = value
        elif name not in info.value_dependent and name in info.input_dependent:
            info.size_values[name] = value
    info.input_shape = (info.fixed_batch or PROBE_BATCH, *concrete[1:])
    info.input_quantization = _input_quantization(info)
    return info


def _check_image_dtype(vi: onnx.ValueInfoProto, where: str) -> None:
    elem = vi.type.tensor_type.elem_type
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)) if elem else None
    except Exception:
        dtype = None
    if dtype is None or dtype.kind not in "fiu":
        kind = onnx.TensorProto.DataType.Name(elem).lower() if elem in onnx.TensorProto.DataType.values() else str(elem)
        raise UnsupportedModelError(
            f"{where}: input {vi.name!r} has element type {kind}, not an image batch of numbers; "
            "sp2ps explains image classifiers with a float or integer pixel input"
        )


def _input_quantization(info: GraphInfo) -> tuple[float, int] | None:
    """Scale and zero point of an integer model input (full-integer TFLite models take int8),
    read off the DequantizeLinear that first turns it into real values."""
    dtype = input_dtype(info.model, info.input_name)
    if not np.issubdtype(dtype, np.integer):
        return None
    current = info.input_name
    while True:
        consumers = [info.node(i) for i in info.consumers.get(current, [])]
        if len(consumers) != 1:
            return None
        node = consumers[0]
        if node.op_type == "DequantizeLinear":
            scale = info.constants.get(node.input[1])
            zero = info.constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else 0
            if scale is None or zero is None or np.size(scale) != 1 or np.size(zero) != 1:
                return None
            return float(np.asarray(scale).reshape(())), int(np.asarray(zero).reshape(()))
        if node.op_type not in ("Transpose", "Reshape", "Identity", "Squeeze", "Unsqueeze"):
            return None
        current = node.output[0]


def _concrete_input_shape(dims, input_size, where) -> tuple[int, ...]:
    layout_nhwc = _looks_nhwc(dims)
    spatial_axes = (1, 2) if layout_nhwc else (2, 3)
    channel_axis = 3 if layout_nhwc else 1
    out = [PROBE_BATCH, 0, 0, 0]
    if not isinstance(dims[channel_axis], int):
        raise UnsupportedModelError(
            f"{where}: the input's channel dimension is not fixed ({dims}); re-export with a "
            "fixed channel count"
        )
    out[channel_axis] = dims[channel_axis]
    for k, axis in enumerate(spatial_axes):
        if isinstance(dims[axis], int) and dims[axis] > 0:
            if input_size is not None and input_size[k] != dims[axis]:
                raise UnsupportedModelError(
                    f"{where}: the model's input is fixed at {dims[spatial_axes[0]]}x"
                    f"{dims[spatial_axes[1]]}, but size {input_size[0]}x{input_size[1]} was "
                    "requested; drop --size or export the model with dynamic H and W"
                )
            out[axis] = dims[axis]
        else:
            out[axis] = input_size[k] if input_size is not None else DEFAULT_SPATIAL
    if int(np.prod(out[1:], dtype=object)) > MAX_INPUT_ELEMENTS:
        raise UnsupportedModelError(
            f"{where}: one input sample of shape {tuple(out[1:])} would hold more than "
            f"{MAX_INPUT_ELEMENTS:,} values; that is not an image this tool can explain "
            "(check the model's declared input dims or --size)"
        )
    if isinstance(dims[0], int) and dims[0] > MAX_FIXED_BATCH:
        raise UnsupportedModelError(
            f"{where}: the input's batch dimension is fixed at {dims[0]}, more than "
            f"{MAX_FIXED_BATCH}; re-export the model with a dynamic or small batch"
        )
    return tuple(out)


def _looks_nhwc(dims) -> bool:
    last, second = dims[3], dims[1]
    return isinstance(last, int) and last in (1, 3, 4) and not (
        isinstance(second, int) and second in (1, 3, 4)
    )


def input_layout(dims) -> str:
    """``"NHWC"`` when the declared input dims put the (small, fixed) channel count last."""
    return "NHWC" if _looks_nhwc(dims) else "NCHW"


def _relax_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    relaxed = onnx.ModelProto()
    relaxed.CopyFrom(model)
    inits = {i.name for i in relaxed.graph.initializer}
    for vi in list(relaxed.graph.input) + list(relaxed.graph.output):
        if vi.name in inits or not vi.type.tensor_type.HasField("shape"):
            continue
        dim0 = vi.type.tensor_type.shape.dim[0] if vi.type.tensor_type.shape.dim else None
        if dim0 is not None:
            dim0.Clear()
            dim0.dim_param = "N"
    del relaxed.graph.value_info[:]
    return relaxed


def _random_input(shape, dtype, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, 255, size=shape).astype(dtype)
    return rng.uniform(0.0, 1.0, size=shape).astype(dtype)


def input_dtype(model: onnx.ModelProto, name: str) -> np.dtype:
    for vi in model.graph.input:
        if vi.name == name:
            return onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
    raise KeyError(name)


def cpu_session(model: onnx.ModelProto, quiet: bool = True):
    """An unoptimised CPU session for build-time probing of ``model``.

    ONNX Runtime's own error log lines are suppressed (``quiet``): a probe whose failure is
    expected (a model fixed at batch 1 tried at batch 2) must print nothing, and every other
    failure is raised again as one error of ours that carries ORT's message.
    """
    rt = ort()
    opts = rt.SessionOptions()
    opts.graph_optimization_level = rt.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4 if quiet else 3
    return rt.InferenceSession(
        model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )


def quiet_run(session, feeds: dict, outputs: list[str] | None = None) -> list[np.ndarray]:
    """``session.run`` with ONNX Runtime's per-run error logging off (failures still raise)."""
    options = ort().RunOptions()
    options.log_severity_level = 4
    return session.run(outputs, feeds, options)


def _probe(model: onnx.ModelProto, input_name: str, shape) -> tuple[dict, dict, dict]:
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    existing = {o.name for o in exposed.graph.output}
    names = [o.name for o in exposed.graph.output]
    for node in exposed.graph.node:
        for out in node.output:
            if out and out not in existing:
                exposed.graph.output.append(onnx.ValueInfoProto(name=out))
                existing.add(out)
                names.append(out)
    try:
        sess = cpu_session(exposed)
        x = _random_input(shape, input_dtype(model, input_name))
        values = quiet_run(sess, {input_name: x})
    except Exception as exc:
        raise ModelLoadError(
            f"ONNX Runtime cannot run the model at input shape {tuple(shape)} ({exc}); check "
            "that the model runs in onnxruntime and that --size matches what it expects"
        ) from exc
    shapes = {n: tuple(v.shape) for n, v in zip(names, values, strict=True)}
    dtypes = {n: v.dtype for n, v in zip(names, values, strict=True)}
    shapes[input_name] = tuple(shape)
    dtypes[input_name] = input_dtype(model, input_name)
    small = {n: v for n, v in zip(names, values, strict=True) if v.size <= _FOLD_LIMIT}
    return shapes, dtypes, small


def _batch_consistent(original, relaxed, input_name, concrete, fixed_batch) -> bool:
    """A relaxed model must give per-sample results identical to the original's."""
    if fixed_batch != 1:
        return False
    dtype = input_dtype(original, input_name)
    x = _random_input((PROBE_BATCH, *concrete[1:]), dtype, seed=1)
    batched = quiet_run(cpu_session(relaxed), {input_name: x})
    single = cpu_session(original)
    for i in range(PROBE_BATCH):
        one = quiet_run(single, {input_name: x[i : i + 1]})
        for b, s in zip(batched, one, strict=True):
            if b.shape[0] != PROBE_BATCH or not np.allclose(b[i : i + 1], s, rtol=1e-4, atol=1e-5):
                return False
    return True


def _batch_invariant_names(info: GraphInfo) -> set[str]:
    """Shape-derived values that are the same at another batch size (probed once, lazily)."""
    names = sorted(info.size_values)
    if not names:
        return set()
    batch = info.fixed_batch or PROBE_BATCH + 1
    exposed = onnx.ModelProto()
    exposed.CopyFrom(info.model)
    del exposed.graph.output[:]
    exposed.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    shape = (batch, *info.input_shape[1:])
    try:
        values = quiet_run(
            cpu_session(exposed),
            {info.input_name: _random_input(shape, input_dtype(info.model, info.input_name), 2)},
        )
    except Exception:
        return set()
    return {
        n for n, v in zip(names, values, strict=True)
        if v.shape == info.size_values[n].shape and np.array_equal(v, info.size_values[n])
    }


# Where each quantized op keeps the scale and zero point of its (first) output.
_OUTPUT_QPARAMS = {
    "QuantizeLinear": (1, 2),
    "QLinearConv": (6, 7),
    "QLinearMatMul": (6, 7),
    "QGemm": (7, 8),
    "QLinearAdd": (6, 7),
    "QLinearMul": (6, 7),
    "QLinearGlobalAveragePool": (3, 4),
    "QLinearAveragePool": (3, 4),
    "QLinearSigmoid": (3, 4),
    "QLinearLeakyRelu": (3, 4),
    "QLinearSoftmax": (3, 4),
    "QLinearConcat": (0, 1),
}
# Ops that move integer codes without changing them: the output shares the input's params.
_CODE_PRESERVING = frozenset(
    {
        "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity", "MaxPool",
        "Slice", "Gather", "Pad", "Resize", "Split", "Expand", "GlobalMaxPool", "DepthToSpace",
        "SpaceToDepth", "Tile",
    }
)  # fmt: skip


def quantization_params(graph: onnx.GraphProto) -> dict[str, tuple[str, str | None]]:
    """Integer activation tensors and the (scale, zero point) names that dequantize them.

    Covers QuantizeLinear, DynamicQuantizeLinear, the QOperator ops (QLinear*, QGemm) and
    layout ops that carry integer codes through unchanged. The gradient of such a tensor is
    taken with respect to its dequantized value, ``(q - zero_point) * scale``.
    """
    params: dict[str, tuple[str, str | None]] = {}
    for node in graph.node:
        op = node.op_type
        if op == "DynamicQuantizeLinear":
            params[node.output[0]] = (node.output[1], node.output[2])
        elif op in _OUTPUT_QPARAMS:
            s, z = _OUTPUT_QPARAMS[op]
            if len(node.input) > s and node.input[s]:
                zp = node.input[z] if len(node.input) > z and node.input[z] else None
                params[node.output[0]] = (node.input[s], zp)
        elif op in _CODE_PRESERVING and node.input and node.input[0] in params:
            for out in node.output:
                if out:
                    params[out] = params[node.input[0]]
    return params
