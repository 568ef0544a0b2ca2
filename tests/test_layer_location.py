"""Default target-layer choice, explicit layers, layouts and error messages."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sp2ps_onnx import CamModel, LayerNotFoundError, UnsupportedOpError

RNG = np.random.default_rng(0)


def _init(name, *shape):
    return numpy_helper.from_array(RNG.normal(size=shape).astype(np.float32), name)


def _model(nodes, inits, input_shape, opset=17):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _se_block_with_conv_head():
    """Conv->Relu, a squeeze-excitation gate, then GAP -> 1x1 Conv on the 1x1 map -> MatMul."""
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("GlobalAveragePool", ["r1"], ["se_pool"]),
        helper.make_node("Conv", ["se_pool", "w_se"], ["se_conv"]),
        helper.make_node("Sigmoid", ["se_conv"], ["se_gate"]),
        helper.make_node("Mul", ["r1", "se_gate"], ["gated"], name="se_mul"),
        helper.make_node("Conv", ["gated", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["features"], name="last_relu"),
        helper.make_node("GlobalAveragePool", ["features"], ["pooled"]),
        helper.make_node("Conv", ["pooled", "w_head"], ["head"]),
        helper.make_node("Flatten", ["head"], ["flat"]),
        helper.make_node("MatMul", ["flat", "fc"], ["logits"]),
    ]
    inits = [
        _init("w1", 4, 3, 3, 3),
        _init("w_se", 4, 4, 1, 1),
        _init("w2", 6, 4, 3, 3),
        _init("w_head", 8, 6, 1, 1),
        _init("fc", 8, 5),
    ]
    return _model(nodes, inits, ["N", 3, 8, 8])


def test_default_layer_skips_se_blocks_and_convs_on_pooled_maps():
    cam = CamModel(_se_block_with_conv_head())
    assert cam.layer == "features"


def test_layer_by_tensor_or_node_name():
    model = _se_block_with_conv_head()
    assert CamModel(model, layer="gated").layer == "gated"
    assert CamModel(model, layer="relu1").layer == "r1"


def test_unknown_layer_names_the_layer_and_what_to_do():
    with pytest.raises(LayerNotFoundError, match="no_such_layer.*sp2ps inspect"):
        CamModel(_se_block_with_conv_head(), layer="no_such_layer")


def test_unsupported_op_names_op_node_and_suggests_a_later_layer():
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Cos", ["c1"], ["odd"], name="weird_activation"),
        helper.make_node("Relu", ["odd"], ["features"]),
        helper.make_node("GlobalAveragePool", ["features"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1),
    ]
    model = _model(nodes, [_init("w1", 4, 3, 3, 3), _init("fc", 5, 4)], ["N", 3, 8, 8])
    with pytest.raises(UnsupportedOpError, match=r"'Cos'.*'weird_activation'.*layer="):
        CamModel(model, layer="c1")
    assert CamModel(model).layer == "features"  # the default layer sits after the Cos


def _nhwc_model(scale_after_transpose=True):
    """tf2onnx style: NHWC input, Transposes around an NCHW Conv, NHWC head."""
    last = "scaled_nhwc" if scale_after_transpose else "r1_nhwc"
    nodes = [
        helper.make_node("Transpose", ["x"], ["x_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["x_nchw", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Transpose", ["r1"], ["r1_nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Mul", ["r1_nhwc", "scale"], ["scaled_nhwc"]),
        helper.make_node("ReduceMean", [last], ["pooled"], axes=[1, 2], keepdims=0),
        helper.make_node("MatMul", ["pooled", "fc"], ["mm"]),
        helper.make_node("Add", ["mm", "bias"], ["pre"]),
        helper.make_node("Softmax", ["pre"], ["logits"]),
    ]
    inits = [_init("w1", 4, 3, 3, 3), _init("scale", 4), _init("fc", 4, 5), _init("bias", 5)]
    return _model(nodes, inits, ["N", 8, 8, 3], opset=13)


def _finite_difference(model, x, layer, target, eps=1e-3):
    """d pre[0, target] / d layer, by central differences on the head after ``layer``."""
    inferred = onnx.shape_inference.infer_shapes(model)
    head = onnx.utils.Extractor(inferred).extract_model([layer], ["pre"])
    sess = ort.InferenceSession(head.SerializeToString(), providers=["CPUExecutionProvider"])
    full = onnx.ModelProto()
    full.CopyFrom(model)
    full.graph.output.append(onnx.ValueInfoProto(name=layer))
    base = ort.InferenceSession(full.SerializeToString(), providers=["CPUExecutionProvider"])
    acts = base.run([layer], {"x": x})[0].astype(np.float64)
    grad = np.zeros_like(acts)
    for idx in np.ndindex(*acts.shape):
        for sign in (1, -1):
            bumped = acts.copy()
            bumped[idx] += sign * eps
            out = sess.run(None, {layer: bumped.astype(np.float32)})[0][0, target]
            grad[idx] += sign * out / (2 * eps)
    return acts, grad


def test_nhwc_layer_is_returned_channels_first_with_the_right_gradient():
    model = _nhwc_model()
    x = RNG.normal(size=(1, 8, 8, 3)).astype(np.float32)
    cam = CamModel(model, layer="scaled_nhwc")
    assert cam.layout == "NHWC"
    result = cam.run(x, targets=[2])
    acts, grad = _finite_difference(model, x, "scaled_nhwc", 2)
    np.testing.assert_allclose(result.activations, acts.transpose(0, 3, 1, 2), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.gradients, grad.transpose(0, 3, 1, 2), atol=2e-3)
    # The score is cut before the Softmax.
    assert result.score.shape == (1, 5)
    assert not np.allclose(result.score.sum(axis=1), 1.0)


def test_default_layer_steps_back_over_layout_transposes():
    assert CamModel(_nhwc_model()).layer == "scaled_nhwc"
    cam = CamModel(_nhwc_model(scale_after_transpose=False))
    assert cam.layer == "r1"  # after the activation, before the NHWC Transpose
    assert cam.graph.layer_layout.name == "NCHW"
