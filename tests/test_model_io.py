"""Loading: external data, Constant-node weights, untouched inputs, clear load errors."""

import hashlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sp2ps_onnx import CamModel, ModelLoadError


def _cnn(weights_as_constants: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 3, 3, 3)).astype(np.float32)
    fc = rng.normal(size=(4, 8)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1),
    ]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(fc, "fc")]
    if weights_as_constants:  # how paddle2onnx stores weights
        nodes = [helper.make_node("Constant", [], [t.name], value=t) for t in inits] + nodes
        inits = []
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _expected_gradient(model: onnx.ModelProto, target: int) -> np.ndarray:
    # GAP -> Gemm: d logit_t / d r = fc[t] / (h*w) at every position.
    fc = [numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "fc"][0]
    return np.broadcast_to(fc[target][:, None, None] / 36.0, (8, 6, 6))


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_external_data_model_loads_and_is_left_untouched(tmp_path):
    path = tmp_path / "cnn.onnx"
    onnx.save(_cnn(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="cnn.onnx.data", size_threshold=0)
    assert (tmp_path / "cnn.onnx.data").exists()
    before = _digest(tmp_path)
    cam = CamModel(path)
    x = np.random.default_rng(1).normal(size=(2, 3, 6, 6)).astype(np.float32)
    result = cam.run(x, targets=[1, 3])
    for n, t in enumerate([1, 3]):
        np.testing.assert_allclose(result.gradients[n], _expected_gradient(_cnn(), t), rtol=1e-6)
    assert _digest(tmp_path) == before


def test_weights_in_constant_nodes_work_and_proto_input_is_not_modified():
    model = _cnn(weights_as_constants=True)
    snapshot = model.SerializeToString()
    cam = CamModel(model)
    x = np.random.default_rng(2).normal(size=(2, 3, 6, 6)).astype(np.float32)
    result = cam.run(x, targets=[0, 2])
    assert result.activations.shape == (2, 8, 6, 6)
    reference = _cnn()
    for n, t in enumerate([0, 2]):
        np.testing.assert_allclose(result.gradients[n], _expected_gradient(reference, t), rtol=1e-6)
    assert model.SerializeToString() == snapshot


def test_rewritten_model_saves_and_passes_the_checker(tmp_path):
    cam = CamModel(_cnn())
    out = tmp_path / "cam.onnx"
    cam.save(out)
    onnx.checker.check_model(str(out))
    names = {o.name for o in onnx.load(str(out)).graph.output}
    assert {"logits", "score", "activations", "gradients"} <= names


@pytest.mark.parametrize("content", [b"", b"not an onnx file at all"])
def test_unreadable_file_is_one_clear_error(tmp_path, content):
    path = tmp_path / "broken.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match="broken.onnx"):
        CamModel(path)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ModelLoadError, match="not found.*missing.onnx"):
        CamModel(tmp_path / "missing.onnx")


def test_models_below_opset_11_are_upgraded_not_rejected():
    model = _cnn()
    model.opset_import[0].version = 9  # every op of this graph exists at opset 9
    gemm = model.graph.node[-1]
    gemm.input.append("bias")  # Gemm's C is required before opset 11
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(4, np.float32), "bias"))
    onnx.checker.check_model(model)
    cam = CamModel(model)
    assert cam.graph.info.model.opset_import[0].version >= 11
    x = np.random.default_rng(4).normal(size=(2, 3, 6, 6)).astype(np.float32)
    result = cam.run(x, targets=[3, 0])
    for n, t in enumerate([3, 0]):
        np.testing.assert_allclose(result.gradients[n], _expected_gradient(_cnn(), t), rtol=1e-6)
