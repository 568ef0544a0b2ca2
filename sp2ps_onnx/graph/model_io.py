"""Reading ONNX models without touching the user's files, and small proto helpers.

A model file may come from anywhere, so :func:`load_model` treats it as untrusted input:
external-data files must lie inside the model's folder, ops from domains that ONNX
Runtime does not implement itself are refused unless allowed, and every tensor's declared
size is checked before any of its data is read or converted.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import onnx
from onnx import external_data_helper, numpy_helper

from ..convert import needs_conversion
from ..errors import ModelLoadError, Sp2PSError, UnsupportedModelError, UntrustedModelError

# Below opset 11 several ops (Clip, Pad, Slice, Resize) take attributes that later
# became inputs; upgrading once keeps every gradient rule on one calling convention.
MIN_OPSET = 11

TRUSTED_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
"""Op domains that ONNX Runtime implements itself (the ONNX standard, ONNX-ML and ORT's
contrib ops, which quantization tools emit). Any other domain needs code from a custom-op
library, so a model using it is refused unless the domain is explicitly allowed."""

MAX_TENSOR_BYTES = 8 << 30
"""Largest size one weight tensor may declare (8 GiB); ONNX files are limited to 2 GB
and external-data weights of real CNNs stay far below this."""

MAX_TENSOR_RANK = 32

MAX_PROTO_BYTES = (2 << 30) - 1
"""Protobuf messages cannot exceed 2 GiB, so a bigger file is refused before it is read."""


def load_model(
    model: str | os.PathLike | onnx.ModelProto,
    allow_domains: Iterable[str] = (),
) -> tuple[onnx.ModelProto, str | None]:
    """Return a private copy of ``model`` (with external data loaded) and its path, if any.

    The copy is what gets rewritten: the caller's proto and file are never modified.
    ``allow_domains`` names custom-op domains to accept besides :data:`TRUSTED_DOMAINS`.

    Raises :class:`~sp2ps_onnx.errors.UntrustedModelError` for external data outside the
    model's folder, custom-op domains and tensors with impossible sizes, and
    :class:`~sp2ps_onnx.errors.ModelLoadError` for files that are not readable ONNX.
    """
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        path = None
        check_tensor_sizes(copy, "model")
        if any(external_data_helper.uses_external_data(t) for t in all_tensors(copy)):
            raise ModelLoadError(
                "the model proto refers to external data files but no folder to read them "
                "from; pass the path of the .onnx file instead of the loaded proto"
            )
    else:
        path = os.fspath(model)
        copy = read_model(path)
        load_external_data(copy, path)
    where = path or "model"
    check_domains(copy, allow_domains, where)
    if len(copy.graph.node) == 0:
        raise ModelLoadError(f"{where} has an empty graph; export the model again")
    opset = default_opset(copy, where)
    if opset < MIN_OPSET:
        try:
            copy = onnx.version_converter.convert_version(copy, MIN_OPSET)
        except Exception as exc:
            raise UnsupportedModelError(
                f"{where} uses opset {opset}; converting it to opset {MIN_OPSET} "
                f"failed ({exc}); re-export the model with opset >= {MIN_OPSET}"
            ) from exc
    return copy, path


def read_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse an ONNX file *without* its external data, and check its tensors' declared sizes.

    Nothing outside ``path`` is read; :func:`load_external_data` does that, safely.
    """
    path = os.fspath(path)
    if not Path(path).is_file():
        what = "is a directory" if Path(path).is_dir() else "not found"
        raise ModelLoadError(f"model file {what}: {path}; give the path of an .onnx file")
    if needs_conversion(path):
        raise ModelLoadError(
            f"{path} is a {Path(path).suffix} framework file, not ONNX; convert it first "
            "with sp2ps_onnx.convert.to_onnx(path, 'model.onnx') (the sp2ps commands "
            "convert it themselves)"
        )
    size = Path(path).stat().st_size
    if size > MAX_PROTO_BYTES:
        raise ModelLoadError(
            f"{path} is {size:,} bytes, larger than any ONNX protobuf can be (2 GiB; larger "
            "models keep their weights in external data files); it is not an ONNX model"
        )
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ... depending on damage
        raise ModelLoadError(
            f"cannot read {path} as an ONNX model ({type(exc).__name__}: "
            f"{' '.join(str(exc).split()) or 'no details'}); check that the file is a "
            "complete .onnx file (not truncated, not another format)"
        ) from exc
    if not proto.HasField("graph"):
        raise ModelLoadError(
            f"{path} holds no ONNX graph (is it an ONNX file at all?); give an exported .onnx model"
        )
    check_tensor_sizes(proto, path)
    return proto


def load_external_data(proto: onnx.ModelProto, path: str) -> None:
    """Read the external data of ``proto`` (loaded from ``path``) into the proto.

    Every location must be a relative path that resolves, symlinks followed, to a regular
    file inside the model's folder, and the declared offset and length must lie within it.
    This is the policy of ONNX's fixes for its external-data path-traversal advisories
    (CVE-2024-27318, CVE-2024-5187), enforced here regardless of the installed onnx version.
    """
    base = Path(path).resolve().parent
    for tensor in all_tensors(proto):
        if not external_data_helper.uses_external_data(tensor):
            continue
        file, offset, length = _external_location(tensor, base, path)
        with open(file, "rb") as handle:
            handle.seek(offset)
            data = handle.read(length)
        tensor.raw_data = data
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]


def _external_location(tensor: onnx.TensorProto, base: Path, model_path: str) -> tuple[Path, int, int]:
    info = external_data_helper.ExternalDataInfo(tensor)
    location = str(info.location or "")
    where = f"tensor {tensor.name!r} of {model_path}"
    fix = "keep external data files in the model's folder and refer to them by file name"
    if not location:
        raise UntrustedModelError(f"{where} declares external data without a location; {fix}")
    if (
        os.path.isabs(location)
        or PureWindowsPath(location).drive
        or PureWindowsPath(location).is_absolute()
    ):
        raise UntrustedModelError(
            f"{where} reads external data from the absolute path {location!r}; refused, "
            f"because a model file must not read files of its choosing; {fix}"
        )
    parts = set(PurePosixPath(location.replace("\\", "/")).parts)
    if ".." in parts:
        raise UntrustedModelError(
            f"{where} reads external data from {location!r}, which climbs out of the model's "
            f"folder with '..'; refused; {fix}"
        )
    file = (base / location).resolve()
    if not file.is_relative_to(base):
        raise UntrustedModelError(
            f"{where} reads external data from {location!r}, which resolves (through a "
            f"symbolic link) to {file}, outside the model's folder {base}; refused; {fix}"
        )
    if not file.is_file():
        raise ModelLoadError(
            f"{where} needs the external data file {location!r}, which is missing from "
            f"{base}; copy it next to the model"
        )
    size = file.stat().st_size
    offset = int(info.offset or 0)
    expected = _declared_bytes(tensor)
    length = int(info.length) if info.length else (expected if expected is not None else size - offset)
    if offset < 0 or length < 0 or offset + length > size:
        raise ModelLoadError(
            f"{where} declares {length} bytes at offset {offset} of {location!r}, but that "
            f"file has {size} bytes; the external data does not belong to this model or is "
            "truncated"
        )
    if expected is not None and length != expected:
        raise ModelLoadError(
            f"{where} has shape {list(tensor.dims)} ({expected} bytes) but its external data "
            f"holds {length} bytes; the model file is damaged"
        )
    return file, offset, length


def _itemsize(data_type: int) -> int | None:
    """Bytes per element in raw_data, or None for strings and undefined types."""
    if data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(data_type)
    except Exception:
        return None
    if data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return None  # packed two per byte; sized separately
    return int(np.dtype(dtype).itemsize)


def _declared_bytes(tensor: onnx.TensorProto) -> int | None:
    itemsize = _itemsize(tensor.data_type)
    if itemsize is None:
        return None
    return int(np.prod([int(d) for d in tensor.dims], dtype=object)) * itemsize


def check_tensor_sizes(proto: onnx.ModelProto, where: str) -> None:
    """Refuse tensors whose declared shape is impossible or too large, before reading them.

    A tensor's dims must be non-negative, its rank at most :data:`MAX_TENSOR_RANK`, its
    size at most :data:`MAX_TENSOR_BYTES`, and inline data must hold exactly the declared
    number of elements (otherwise converting it would fail or allocate blindly).
    """
    for tensor in all_tensors(proto):
        name = f"tensor {tensor.name!r} of {where}"
        dims = [int(d) for d in tensor.dims]
        if len(dims) > MAX_TENSOR_RANK or any(d < 0 for d in dims):
            raise UntrustedModelError(
                f"{name} declares the impossible shape {dims}; the model file is damaged"
            )
        elements = int(np.prod(dims, dtype=object)) if dims else 1
        itemsize = _itemsize(tensor.data_type) or 1
        if elements * itemsize > MAX_TENSOR_BYTES:
            raise UntrustedModelError(
                f"{name} declares shape {dims} ({elements * itemsize:,} bytes), more than the "
                f"{MAX_TENSOR_BYTES >> 30} GiB limit for one tensor; refused before allocating it"
            )
        if external_data_helper.uses_external_data(tensor):
            continue
        held = _held_elements(tensor)
        if held is not None and held != elements:
            raise UntrustedModelError(
                f"{name} declares shape {dims} ({elements} elements) but holds data for "
                f"{held}; the model file is damaged"
            )


def _held_elements(tensor: onnx.TensorProto) -> int | None:
    itemsize = _itemsize(tensor.data_type)
    if tensor.HasField("raw_data"):
        if itemsize is None:
            return None
        return len(tensor.raw_data) // itemsize if len(tensor.raw_data) % itemsize == 0 else -1
    if tensor.data_type == onnx.TensorProto.UNDEFINED or itemsize is None and (
        tensor.data_type != onnx.TensorProto.STRING
    ):
        return None
    try:
        field = onnx.helper.tensor_dtype_to_field(tensor.data_type)
    except Exception:
        return None
    count = len(getattr(tensor, field))
    if tensor.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128):
        return count // 2
    return count


def all_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto in the model: initializers, sparse initializers and tensor
    attributes, in the main graph, in subgraphs and in model-local functions."""
    yield from _graph_tensors(proto.graph)
    for function in proto.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("sparse_tensor"):
            yield attr.sparse_tensor.values
            yield attr.sparse_tensor.indices
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for graph in attr.graphs:
            yield from _graph_tensors(graph)


def _all_nodes(proto: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    def walk(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.NodeProto]:
        for node in nodes:
            yield node
            for attr in node.attribute:
                if attr.HasField("g"):
                    yield from walk(attr.g.node)
                for graph in attr.graphs:
                    yield from walk(graph.node)

    yield from walk(proto.graph.node)
    for function in proto.functions:
        yield from walk(function.node)


def check_domains(proto: onnx.ModelProto, allow_domains: Iterable[str], where: str) -> None:
    """Refuse nodes whose op domain ONNX Runtime does not implement, unless allowed.

    Ops defined by the model's own functions (``model.functions``) are ONNX subgraphs,
    not foreign code, and are accepted.
    """
    allowed = TRUSTED_DOMAINS | {str(d) for d in allow_domains}
    local = {(f.domain, f.name) for f in proto.functions}
    for node in _all_nodes(proto):
        if node.domain in allowed or (node.domain, node.op_type) in local:
            continue
        raise UntrustedModelError(
            f"node {node.name or (node.output[0] if node.output else '?')!r} of {where} uses op "
            f"{node.op_type!r} from the custom-op domain {node.domain!r}, which ONNX Runtime "
            f"does not implement itself; custom ops run code from outside the model, so they "
            f"are refused. If you trust this model and have its op library, allow the domain "
            f"with --allow-domain {node.domain} (Python: allow_domains=[{node.domain!r}])"
        )


@contextlib.contextmanager
def blame_invalid_model(proto: onnx.ModelProto, where: str | None) -> Iterator[None]:
    """Turn an unexpected failure while analysing ``proto`` into a :class:`ModelLoadError`
    when the model itself is invalid ONNX (as onnx.checker proves); a failure on a valid
    model is a bug here and propagates unchanged."""
    try:
        yield
    except Sp2PSError:
        raise
    except Exception as exc:
        problem = validation_problem(proto)
        if problem is None:
            raise
        raise ModelLoadError(
            f"{where or 'the model'} is not a valid ONNX model ({problem}); export it again "
            "or repair it (onnx.checker.check_model shows the same problem)"
        ) from exc


@contextlib.contextmanager
def naming_the_model(path: str | None) -> Iterator[None]:
    """Prefix the model's path to an error that does not name it yet, so that a user who
    opened several models knows which one it is about."""
    try:
        yield
    except Sp2PSError as exc:
        if path and path not in str(exc):
            exc.args = (f"{path}: {exc}",)
        raise


def validation_problem(proto: onnx.ModelProto) -> str | None:
    """onnx.checker's complaint about ``proto`` (with shape inference), or None."""
    if proto.ByteSize() > 2_000_000_000:
        return None  # the checker cannot serialise >2 GB protos
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        return " ".join(str(exc).split())[:400] or type(exc).__name__
    return None


def save_model(proto: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write ``proto`` to ``path`` atomically: a temporary sibling file, then a rename.

    An interrupted save leaves either the old file or none, never a truncated model.
    """
    target = Path(path)
    parent = target.resolve().parent
    if not parent.is_dir():
        raise ModelLoadError(f"the folder of {target} does not exist; create it first")
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
    os.close(handle)
    try:
        onnx.save(proto, temporary)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def default_opset(model: onnx.ModelProto, where: str = "the model") -> int:
    """The version of the default ("" or "ai.onnx") domain the model imports."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise ModelLoadError(
        f"{where} imports no default-domain opset; it is not a standard ONNX model"
    )


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
