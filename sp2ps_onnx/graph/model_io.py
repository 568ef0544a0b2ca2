"""Reading ONNX models without touching the user's files, and small proto helpers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import ModelLoadError, UnsupportedModelError

# Below opset 11 several ops (Clip, Pad, Slice, Resize) take attributes that later
# became inputs; upgrading once keeps every gradient rule on one calling convention.
MIN_OPSET = 11


def load_model(model: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """Return a private copy of ``model`` (with external data loaded) and its path, if any.

    The copy is what gets rewritten: the caller's proto and file are never modified.
    """
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        path = None
    else:
        path = os.fspath(model)
        if not Path(path).is_file():
            raise ModelLoadError(f"model file not found: {path}; check the path")
        try:
            copy = onnx.load(path, load_external_data=True)
        except Exception as exc:  # onnx raises DecodeError, OSError, ... depending on damage
            raise ModelLoadError(
                f"cannot read {path} as an ONNX model ({type(exc).__name__}: {exc}); "
                "check that the file is a complete .onnx file and that any external data "
                "files sit beside it"
            ) from exc
    if len(copy.graph.node) == 0:
        raise ModelLoadError(f"{path or 'model'} has an empty graph; export the model again")
    opset = default_opset(copy)
    if opset < MIN_OPSET:
        try:
            copy = onnx.version_converter.convert_version(copy, MIN_OPSET)
        except Exception as exc:
            raise UnsupportedModelError(
                f"{path or 'model'} uses opset {opset}; converting it to opset {MIN_OPSET} "
                f"failed ({exc}); re-export the model with opset >= {MIN_OPSET}"
            ) from exc
    return copy, path


def default_opset(model: onnx.ModelProto) -> int:
    """The version of the default ("" or "ai.onnx") domain the model imports."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise ModelLoadError("the model imports no default-domain opset; it is not a standard ONNX model")


def constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Values of initializers and Constant-node outputs (Paddle stores weights in the latter)."""
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            attr = node.attribute[0]
            if attr.name == "value":
                values[node.output[0]] = numpy_helper.to_array(attr.t)
            elif attr.name in ("value_float", "value_int"):
                values[node.output[0]] = np.array(onnx.helper.get_attribute_value(attr))
            elif attr.name in ("value_floats", "value_ints"):
                values[node.output[0]] = np.array(onnx.helper.get_attribute_value(attr))
    return values


def graph_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """Real inputs: graph inputs that are not initializers (old exporters list both)."""
    inits = {init.name for init in graph.initializer}
    return [vi for vi in graph.input if vi.name not in inits]


def dims_of(value_info: onnx.ValueInfoProto) -> list[int | str | None]:
    """Declared dims: int for fixed, str for symbolic, None for unknown."""
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return []
    out: list[int | str | None] = []
    for d in tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        elif d.HasField("dim_value"):
            out.append("?")  # Paddle writes -1 for a dynamic dim
        else:
            out.append(None)
    return out


def attribute(node: onnx.NodeProto, name: str, default=None):
    """The value of attribute ``name`` of ``node``, or ``default``."""
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default
