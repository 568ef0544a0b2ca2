"""Emits new nodes into a graph, speaking the graph's own opset.

Gradient rules never care whether ReduceSum takes its axes as an attribute (opset < 13) or
as an input (opset >= 13): they call these helpers, which pick the form the opset needs.
All gradient tensors are float32, whatever the model's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .analysis import GraphInfo

FLOAT = TensorProto.FLOAT
PREFIX = "sp2ps"


class GraphBuilder:
    """Appends nodes and initializers with unique names to ``info.model``'s graph."""

    def __init__(self, info: GraphInfo, prefix: str = PREFIX) -> None:
        self.info = info
        self.opset = _default_opset(info.model)
        self.prefix = prefix
        # Guided Backprop: the Relu rule also drops negative incoming gradients. Set per
        # rewrite (one model's backward pass), never globally.
        self.guided_relu = False
        self.guided_relus = 0  # how many ReLUs (plain or fused) the guided rule met
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._taken = _all_names(info.model.graph)
        self._counter = 0
        self._float_cache: dict[str, str] = {}
        self._shape_cache: dict[str, str] = {}

    # -- naming -------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        while True:
            self._counter += 1
            name = f"{self.prefix}/{hint}_{self._counter}"
            if name not in self._taken:
                self._taken.add(name)
                return name

    # -- raw emission -------------------------------------------------------------------
    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, **attrs) -> str | list[str]:
        outputs = [self.fresh(op_type.lower()) for _ in range(n_out)]
        node = helper.make_node(
            op_type, list(inputs), outputs, name=self.fresh(f"node_{op_type}"), **attrs
        )
        self.nodes.append(node)
        return outputs[0] if n_out == 1 else outputs

    def const(self, value, dtype=np.float32, hint: str = "const") -> str:
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def ints(self, values: Sequence[int]) -> str:
        return self.const(np.asarray(list(values), dtype=np.int64), np.int64, "ints")

    def scalar(self, value: float) -> str:
        return self.const(np.float32(value), np.float32, "scalar")

    # -- forward values -----------------------------------------------------------------
    def as_float(self, name: str) -> str:
        """``name`` as float32, computed once and reused.

        fp16/bf16 values are cast; quantized integer activations (QOperator and dynamic
        quantization) are dequantized with their own scale and zero point, so that rules see
        the real values the integer codes stand for; other integers are cast.
        """
        dtype = self.info.dtypes.get(name)
        if dtype is None and name in self.info.constants:
            dtype = self.info.constants[name].dtype
        if dtype == np.float32:
            return name
        if name not in self._float_cache:
            params = self.info.quant_params.get(name)
            if params is not None and dtype is not None and np.issubdtype(dtype, np.integer):
                self._float_cache[name] = self.dequantize(name, *params)
            else:
                self._float_cache[name] = self.op("Cast", [name], to=FLOAT)
        return self._float_cache[name]

    def dequantize(self, codes: str, scale: str, zero_point: str | None, axis: int = 1) -> str:
        """``(codes - zero_point) * scale`` in float32, per-tensor or per ``axis``.

        Constant codes (weights) are dequantized here, once, into a float32 initializer.
        """
        static = [self.info.static_value(n) if n else None for n in (codes, scale, zero_point)]
        if static[0] is not None and static[1] is not None and (zero_point is None or static[2] is not None):
            return self.const(dequantized_array(*static, axis=axis), hint="dequantized")
        shape = None
        if len(self.static_shape(scale)) == 1 and self.static_shape(scale)[0] > 1:
            shape = [1] * self.rank(codes)
            shape[axis % len(shape)] = -1

        def along_axis(name: str) -> str:
            value = self.op("Cast", [name], to=FLOAT)
            return value if shape is None else self.op("Reshape", [value, self.ints(shape)])

        values = self.op("Cast", [codes], to=FLOAT)
        if zero_point:
            values = self.op("Sub", [values, along_axis(zero_point)])
        scale_f = along_axis(scale)
        return self.op("Mul", [values, scale_f])

    def shape_of(self, name: str) -> str:
        if name not in self._shape_cache:
            self._shape_cache[name] = self.op("Shape", [name])
        return self._shape_cache[name]

    def static_shape(self, name: str) -> tuple[int, ...]:
        """Probed shape of a computed tensor, or the shape of a weight/constant."""
        if name in self.info.shapes:
            return self.info.shapes[name]
        return tuple(self.info.constants[name].shape)

    def rank(self, name: str) -> int:
        return len(self.static_shape(name))

    # -- opset-aware helpers ------------------------------------------------------------
    def reduce(self, op_type: str, x: str, axes: Sequence[int], keepdims: bool = True) -> str:
        axes = [int(a) for a in axes]
        axes_as_input = self.opset >= (13 if op_type == "ReduceSum" else 18)
        if axes_as_input:
            return self.op(op_type, [x, self.ints(axes)], keepdims=int(keepdims))
        return self.op(op_type, [x], axes=axes, keepdims=int(keepdims))

    def unsqueeze(self, x: str, axes: Sequence[int]) -> str:
        if self.opset >= 13:
            return self.op("Unsqueeze", [x, self.ints(axes)])
        return self.op("Unsqueeze", [x], axes=list(axes))

    def reshape_like(self, x: str, like: str) -> str:
        return self.op("Reshape", [x, self.shape_of(like)])

    def add(self, a: str, b: str) -> str:
        return self.op("Add", [a, b])

    def mul(self, a: str, b: str) -> str:
        return self.op("Mul", [a, b])

    def sum_all(self, terms: Sequence[str]) -> str:
        return terms[0] if len(terms) == 1 else self.op("Sum", list(terms))

    def unbroadcast(self, grad: str, grad_shape: Sequence[int], target: str) -> str:
        """Sum ``grad`` (shaped like a broadcast result) down to the shape of ``target``."""
        target_shape = self.static_shape(target)
        grad_shape = tuple(grad_shape)
        if tuple(target_shape) == grad_shape:
            return grad
        lead = len(grad_shape) - len(target_shape)
        axes = list(range(lead))
        for i, dim in enumerate(target_shape):
            if dim == 1 and grad_shape[lead + i] != 1:
                axes.append(lead + i)
        summed = self.reduce("ReduceSum", grad, axes, keepdims=True) if axes else grad
        return self.reshape_like(summed, target)

    def zeros_like_shape(self, shape_tensor: str) -> str:
        zero = numpy_helper.from_array(np.zeros(1, dtype=np.float32))
        return self.op("ConstantOfShape", [shape_tensor], value=zero)


def dequantized_array(codes, scale, zero_point=None, axis: int = 1) -> np.ndarray:
    """``(codes - zero_point) * scale`` as float32; 1-D scale/zero point apply along ``axis``."""
    codes = np.asarray(codes)
    scale = np.asarray(scale, dtype=np.float64)
    zero = np.asarray(0 if zero_point is None else zero_point, dtype=np.float64)
    if scale.ndim == 1 and scale.size > 1 or zero.ndim == 1 and zero.size > 1:
        shape = [1] * codes.ndim
        shape[axis % codes.ndim] = -1
        scale = scale.reshape(shape) if scale.size > 1 else scale.reshape(())
        zero = zero.reshape(shape) if zero.size > 1 else zero.reshape(())
    return ((codes.astype(np.float64) - zero) * scale).astype(np.float32)


def _default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {vi.name for vi in graph.input} | {vi.name for vi in graph.output}
    names |= {init.name for init in graph.initializer}
    for node in graph.node:
        names.update(node.output)
        names.add(node.name)
    return names
