"""The session runs a leaner graph than the one ``sp2ps rewrite`` writes: a gradient that a
global pooling head spreads evenly over the map comes out unspread and is broadcast by the
runtime. Both must give the same numbers as the full graph, in ONNX Runtime itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from sp2ps_onnx import CamModel
from sp2ps_onnx.graph.rewrite import GRADIENTS

MODELS = Path(__file__).resolve().parent.parent / "models"
FMNIST = MODELS / "fmnist_cnn.onnx"


def run_full(model: CamModel, x: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.rewritten.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = session.run(None, {model.input_name: x, "target": np.full(len(x), -1, np.int64)})
    return dict(zip(names, values, strict=True))


def test_global_pooling_head_gradient_is_spread_by_the_runtime_not_the_graph() -> None:
    model = CamModel(str(FMNIST), providers=["CPUExecutionProvider"])
    assert model.graph.gradient_spread is not None
    session_outputs = {o.name for o in model._session.get_outputs()}
    assert model.graph.output_names[GRADIENTS] in session_outputs
    assert not any(n.op_type == "Expand" and n.output[0] == model.graph.gradient_spread.output[0]
                   for n in model.graph.model.graph.node)

    x = np.random.default_rng(0).random((5, 1, 28, 28), dtype=np.float32)
    result = model.run(x)
    full = run_full(model, x)
    assert result.gradients.shape == result.activations.shape == full["gradients"].shape
    np.testing.assert_array_equal(result.gradients, full["gradients"])
    np.testing.assert_array_equal(result.activations, full["activations"])
    assert not result.gradients.flags.writeable  # a broadcast view, never written through
    # What the full graph computes: the class weight over the map size at every position.
    head = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.model.graph.initializer}
    weight = head["head.weight"][result.targets] / (7 * 7)
    np.testing.assert_allclose(result.gradients[:, :, 3, 5], weight, rtol=1e-6)
    onnx.checker.check_model(model.rewritten, full_check=True)


def test_the_written_model_keeps_full_gradients(tmp_path: Path) -> None:
    model = CamModel(str(FMNIST), providers=["CPUExecutionProvider"])
    out = tmp_path / "cam.onnx"
    model.save(out)
    saved = onnx.load(str(out))
    spread = model.graph.gradient_spread.output[0]
    producer = {o: n for n in saved.graph.node for o in n.output}
    gradients = producer[model.graph.output_names[GRADIENTS]]
    assert gradients.input[0] == spread and producer[spread].op_type == "Expand"


@pytest.mark.parametrize("layer", ["/Relu_3_output_0", "/convs.4/Conv_output_0"])
def test_other_heads_keep_their_gradient_graph(layer: str) -> None:
    # The layer's gradient passes a MaxPool, a Conv or a ReLU's mask: no even spread.
    model = CamModel(str(FMNIST), layer=layer, providers=["CPUExecutionProvider"])
    assert model.graph.gradient_spread is None
    assert model.rewritten is model.graph.model
    x = np.random.default_rng(1).random((3, 1, 28, 28), dtype=np.float32)
    result = model.run(x)
    np.testing.assert_array_equal(result.gradients, run_full(model, x)["gradients"])
    assert result.gradients.flags.writeable


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam"])
def test_maps_from_broadcast_gradients_equal_maps_from_full_ones(method: str) -> None:
    from sp2ps_onnx.cam import gradient_weighted_cam

    model = CamModel(str(FMNIST), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(2).random((6, 1, 28, 28), dtype=np.float32)
    result = model.run(x)
    full = run_full(model, x)
    from_view = gradient_weighted_cam(method, result.activations, result.gradients)
    from_full = gradient_weighted_cam(method, full["activations"], full["gradients"].copy())
    np.testing.assert_allclose(from_view, from_full, rtol=1e-5, atol=1e-6)
