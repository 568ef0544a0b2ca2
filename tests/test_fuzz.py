"""Hypothesis fuzzing: damaged ONNX bytes, mutated graphs and damaged image bytes.

The contract: the tool either works or raises its own error type (a Sp2PSError), within a
time limit; it never crashes, hangs, or writes outside ``--out``. Examples are
derandomized, so CI runs the same cases every time, and kept few so that the whole module
takes well under a minute and a half.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import onnx
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto

from sp2ps_onnx import CamModel, Sp2PSError
from sp2ps_onnx.cli import cli
from sp2ps_onnx.data import open_data, read_image
from tests.tiny_models import cnn

SIZE = 12
# CI runs a fixed, modest set; a longer random hunt: SP2PS_FUZZ_EXAMPLES=5000
# SP2PS_FUZZ_RANDOM=1 pytest tests/test_fuzz.py
EXAMPLES = int(os.environ.get("SP2PS_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # timed explicitly below: a loaded CI machine must not make it flaky
    derandomize=not os.environ.get("SP2PS_FUZZ_RANDOM"),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
SECONDS_PER_EXAMPLE = 30

MODEL_BYTES = cnn(SIZE).SerializeToString()
X = np.random.default_rng(0).uniform(size=(2, 1, SIZE, SIZE)).astype(np.float32)


def works_or_own_error(action) -> object | None:
    """Run ``action``; only a Sp2PSError may escape it, and it must finish in time."""
    started = time.perf_counter()
    try:
        return action()
    except Sp2PSError as exc:
        assert str(exc).strip(), "an error without a message"
        return None
    finally:
        assert time.perf_counter() - started < SECONDS_PER_EXAMPLE


def explain(model) -> None:
    """Open ``model`` and compute CAMs; the maps of a model that works are valid."""
    cam = CamModel(model)
    maps, targets = cam.cams(X[:, :, :, :] if cam.layout == "NCHW" else X.transpose(0, 2, 3, 1))
    assert maps.shape[0] == 2 and np.all((maps >= 0) & (maps <= 1) | np.isnan(maps))
    assert np.all((targets >= 0) & (targets < cam.num_classes))


# --------------------------------------------------------------------------------------
# ONNX protobuf bytes


byte_edits = st.lists(
    st.tuples(st.integers(0, len(MODEL_BYTES) - 1), st.integers(0, 255)), min_size=1, max_size=8
)


@FUZZ
@given(edits=byte_edits, cut=st.one_of(st.none(), st.integers(0, len(MODEL_BYTES))))
def test_damaged_model_bytes(edits, cut) -> None:
    blob = bytearray(MODEL_BYTES)
    for position, value in edits:
        blob[position] = value
    blob = bytes(blob[:cut] if cut is not None else blob)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        path.write_bytes(blob)
        works_or_own_error(lambda: explain(path))
        assert path.read_bytes() == blob  # the input file is left as it was
        assert [p.name for p in Path(folder).iterdir()] == ["model.onnx"]


# --------------------------------------------------------------------------------------
# Graph mutations


OP_TYPES = ["Relu", "Conv", "Gemm", "Cos", "Reshape", "Softmax", "Transpose", "Identity",
            "MaxPool", "Add", "Concat", "NoSuchOp", "", "Loop"]
DOMAINS = ["", "ai.onnx", "com.microsoft", "ai.onnx.ml", "com.vendor"]
ELEM_TYPES = [TensorProto.FLOAT, TensorProto.INT64, TensorProto.STRING, TensorProto.BOOL,
              TensorProto.FLOAT16, TensorProto.UNDEFINED]

mutation = st.one_of(
    st.tuples(st.just("op_type"), st.integers(0, 20), st.sampled_from(OP_TYPES)),
    st.tuples(st.just("domain"), st.integers(0, 20), st.sampled_from(DOMAINS)),
    st.tuples(st.just("drop_input"), st.integers(0, 20), st.integers(0, 3)),
    st.tuples(st.just("rename_input"), st.integers(0, 20), st.sampled_from(["x", "w1", "zz", ""])),
    st.tuples(st.just("drop_node"), st.integers(0, 20), st.just(None)),
    st.tuples(st.just("attribute"), st.integers(0, 20), st.integers(-3, 70000)),
    st.tuples(st.just("init_dims"), st.integers(0, 6),
              st.lists(st.integers(-2, 1 << 40), min_size=0, max_size=5)),
    st.tuples(st.just("input_dim"), st.integers(0, 3),
              st.one_of(st.integers(-1, 1 << 20), st.just("N"))),
    st.tuples(st.just("elem_type"), st.integers(0, 1), st.sampled_from(ELEM_TYPES)),
    st.tuples(st.just("output_rank"), st.integers(0, 4), st.just(None)),
    st.tuples(st.just("opset"), st.integers(1, 30), st.just(None)),
)


def mutate(model: onnx.ModelProto, kind: str, index: int, value) -> None:
    graph = model.graph
    node = graph.node[index % len(graph.node)] if graph.node else None
    if kind == "op_type" and node is not None:
        node.op_type = value
    elif kind == "domain" and node is not None:
        node.domain = value
    elif kind == "drop_input" and node is not None and node.input:
        del node.input[value % len(node.input)]
    elif kind == "rename_input" and node is not None and node.input:
        node.input[0] = value
    elif kind == "drop_node" and node is not None:
        graph.node.remove(node)
    elif kind == "attribute" and node is not None and node.attribute:
        attr = node.attribute[index % len(node.attribute)]
        if attr.ints:
            attr.ints[0] = value
        else:
            attr.i = value
    elif kind == "init_dims":
        tensor = graph.initializer[index % len(graph.initializer)]
        del tensor.dims[:]
        tensor.dims.extend(value)
    elif kind == "input_dim":
        dim = graph.input[0].type.tensor_type.shape.dim[index]
        dim.Clear()
        if isinstance(value, str):
            dim.dim_param = value
        else:
            dim.dim_value = value
    elif kind == "elem_type":
        (graph.input if index == 0 else graph.output)[0].type.tensor_type.elem_type = value
    elif kind == "output_rank":
        shape = graph.output[0].type.tensor_type.shape
        while len(shape.dim) > index:
            shape.dim.pop()
    elif kind == "opset":
        model.opset_import[0].version = index


@FUZZ
@given(mutations=st.lists(mutation, min_size=1, max_size=3))
def test_mutated_graphs(mutations) -> None:
    model = cnn(SIZE)
    for kind, index, value in mutations:
        mutate(model, kind, index, value)
    snapshot = model.SerializeToString()
    works_or_own_error(lambda: explain(model))
    assert model.SerializeToString() == snapshot  # the caller's proto is left as it was


# --------------------------------------------------------------------------------------
# Image bytes


def _encoded(extension: str) -> bytes:
    rng = np.random.default_rng(1)
    buffer = io.BytesIO()
    iio.imwrite(buffer, rng.integers(0, 256, (9, 7, 3), dtype=np.uint8), extension=extension)
    return buffer.getvalue()


IMAGES = {ext: _encoded(ext) for ext in (".png", ".jpg", ".bmp", ".tiff", ".webp")}


@FUZZ
@given(
    extension=st.sampled_from(sorted(IMAGES)),
    edits=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=6),
    cut=st.one_of(st.none(), st.integers(0, 4000)),
)
def test_damaged_image_bytes(extension, edits, cut) -> None:
    blob = bytearray(IMAGES[extension])
    for position, value in edits:
        blob[position % len(blob)] = value
    blob = bytes(blob[:cut] if cut is not None else blob)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"image{extension}"
        path.write_bytes(blob)
        image = works_or_own_error(lambda: read_image(path))
        if image is not None:
            assert image.dtype == np.uint8 and image.ndim in (2, 3) and image.size > 0
        # In a dataset the same file is either a sample or a recorded fault, never an error.
        source = open_data(folder)
        ids = [i for batch in source.batches(4) for i in batch.ids]
        assert len(ids) + len(source.faults) == 1
        assert (image is None) == bool(source.faults)


# --------------------------------------------------------------------------------------
# The command line writes nowhere but --out


def _tree(root: Path, skip: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and skip not in p.parents
    }


@settings(FUZZ, max_examples=max(1, EXAMPLES // 8))
@given(edits=byte_edits)
def test_score_with_damaged_models_writes_only_to_out(edits) -> None:
    blob = bytearray(MODEL_BYTES)
    for position, value in edits:
        blob[position] = value
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "original.onnx").write_bytes(MODEL_BYTES)
        (root / "pruned.onnx").write_bytes(bytes(blob))
        rng = np.random.default_rng(2)
        np.savez(root / "data.npz", x=rng.integers(0, 256, (3, SIZE, SIZE), dtype=np.uint8))
        out = root / "report"
        before = _tree(root, out)
        started = time.perf_counter()
        result = CliRunner().invoke(cli, [
            "score", str(root / "original.onnx"), str(root / "pruned.onnx"), "--data",
            str(root / "data.npz"), "--out", str(out), "--preset", "unit", "--bootstrap", "0",
            "-q",
        ])
        assert time.perf_counter() - started < SECONDS_PER_EXAMPLE
        assert result.exit_code in (0, 2), result.output
        if result.exit_code == 2:
            assert result.stderr.startswith("sp2ps: error: ") and result.stderr.count("\n") == 1
            assert not out.exists()
        else:
            assert (out / "results.json").is_file()
        assert _tree(root, out) == before
        assert sorted(p.name for p in root.iterdir()) == sorted(
            ["original.onnx", "pruned.onnx", "data.npz"] + (["report"] if out.exists() else [])
        )
