"""Fixed-batch models (as converted from TFLite) still explain N > 1 samples, correctly."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sp2ps_onnx import CamModel


def _fixed_batch_cnn(hard_coded_reshape: bool, batch: int = 1) -> onnx.ModelProto:
    """Conv -> Relu -> GAP -> Reshape -> Gemm with the input fixed at batch 1.

    With ``hard_coded_reshape`` the flatten is Reshape(.., [1, 4]), which breaks at any
    other batch, so the batch cannot be relaxed and the model must run per sample.
    """
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    fc = numpy_helper.from_array(rng.normal(size=(5, 4)).astype(np.float32), "fc")
    shape = numpy_helper.from_array(np.array([batch, 4] if hard_coded_reshape else [-1, 4]), "shape")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Reshape", ["p", "shape"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 5])],
        initializer=[w, fc, shape],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _reference(model: onnx.ModelProto, x: np.ndarray, targets: np.ndarray):
    """Per-sample activations and gradients: Relu output, and W[t] / (h*w) through GAP."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    exposed.graph.output.append(onnx.ValueInfoProto(name="r"))
    sess = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    fc = numpy_helper.to_array(model.graph.initializer[1])
    acts, grads = [], []
    batch = model.graph.input[0].type.tensor_type.shape.dim[0].dim_value
    for xi, t in zip(x, targets, strict=True):
        logits, r = sess.run(None, {"x": np.repeat(xi[None], batch, axis=0)})
        acts.append(r[0])
        grads.append(np.broadcast_to(fc[t][:, None, None] / 64.0, r[0].shape))
    return np.stack(acts), np.stack(grads)


@pytest.mark.parametrize("hard_coded", [False, True], ids=["relaxable", "per-sample"])
def test_fixed_batch_model_accepts_larger_batches(hard_coded):
    model = _fixed_batch_cnn(hard_coded)
    cam = CamModel(model)
    assert cam.graph.info.batch_relaxed is (not hard_coded)
    assert (cam.graph.info.fixed_batch == 1) is hard_coded
    x = np.random.default_rng(1).normal(size=(3, 3, 8, 8)).astype(np.float32)
    targets = np.array([0, 4, 2])
    result = cam.run(x, targets)
    acts, grads = _reference(model, x, targets)
    assert result.activations.shape == (3, 4, 8, 8)
    np.testing.assert_allclose(result.activations, acts, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.gradients, grads, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(result.targets, targets)


def test_model_fixed_at_a_larger_batch_pads_the_last_chunk():
    model = _fixed_batch_cnn(True, batch=3)
    cam = CamModel(model)
    assert cam.graph.info.fixed_batch == 3
    x = np.random.default_rng(5).normal(size=(5, 3, 8, 8)).astype(np.float32)
    targets = np.array([1, 0, 4, 2, 3])
    result = cam.run(x, targets)
    acts, grads = _reference(model, x, targets)
    assert result.score.shape == (5, 5)
    np.testing.assert_allclose(result.activations, acts, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.gradients, grads, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(cam.scores(x), result.score, rtol=1e-6)


def test_argmax_targets_follow_each_samples_own_score():
    cam = CamModel(_fixed_batch_cnn(False))
    x = np.random.default_rng(2).normal(size=(6, 3, 8, 8)).astype(np.float32)
    result = cam.run(x)
    np.testing.assert_array_equal(result.targets, result.score.argmax(axis=1))
    explicit = cam.run(x, result.targets)
    np.testing.assert_allclose(explicit.gradients, result.gradients)


def test_cams_return_the_scores_of_the_same_run():
    cam = CamModel(_fixed_batch_cnn(False))
    x = np.random.default_rng(3).normal(size=(5, 3, 8, 8)).astype(np.float32)
    maps, targets, scores = cam.cams(x, return_scores=True)
    np.testing.assert_allclose(scores, cam.scores(x), rtol=1e-6)  # the forward-only session
    np.testing.assert_array_equal(targets, scores.argmax(axis=1))
    assert maps.shape == (5, 8, 8)
