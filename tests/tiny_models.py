"""Small ONNX classifiers built with onnx.helper, for the reliability and fuzz tests.

They need no exporter and build in milliseconds. ``cnn`` gives the same weights for the
same (channels, classes, seed), so an NCHW model and its NHWC twin compute the same
function of the same image.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _weights(channels: int, classes: int, seed: int) -> list[onnx.TensorProto]:
    rng = np.random.default_rng(seed)
    return [
        numpy_helper.from_array(rng.normal(size=(6, channels, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(size=(6,)).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(size=(8, 6, 3, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.normal(size=(classes, 8)).astype(np.float32), "fc"),
        numpy_helper.from_array(rng.normal(size=(classes,)).astype(np.float32), "fc_b"),
    ]


def cnn(
    size: int = 16,
    channels: int = 1,
    classes: int = 4,
    nhwc: bool = False,
    seed: int = 0,
    head_op: str | None = None,
) -> onnx.ModelProto:
    """Conv-Relu-MaxPool-Conv-Relu, global average pool, Gemm: logits (N, classes).

    ``head_op`` inserts a unary op between the pooled features and the Gemm.
    """
    nodes = []
    image = "x"
    if nhwc:
        nodes.append(helper.make_node("Transpose", ["x"], ["x_nchw"], perm=[0, 3, 1, 2]))
        image = "x_nchw"
    nodes += [
        helper.make_node("Conv", [image, "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["features"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["features"], ["pooled"], name="gap"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
    ]
    flat = "flat"
    if head_op:
        nodes.append(helper.make_node(head_op, ["flat"], ["odd"], name="odd_node"))
        flat = "odd"
    nodes.append(helper.make_node("Gemm", [flat, "fc", "fc_b"], ["logits"], transB=1, name="fc"))
    shape = ["N", size, size, channels] if nhwc else ["N", channels, size, size]
    graph = helper.make_graph(
        nodes,
        "tiny_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        initializer=_weights(channels, classes, seed),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def mlp(size: int = 16, classes: int = 4) -> onnx.ModelProto:
    """An image classifier without any convolution: Flatten -> Gemm."""
    rng = np.random.default_rng(1)
    fc = numpy_helper.from_array(rng.normal(size=(classes, size * size)).astype(np.float32), "fc")
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["x"], ["flat"]),
            helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        initializer=[fc],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def segmenter(size: int = 16, classes: int = 3) -> onnx.ModelProto:
    """Not a classifier: a 1x1 Conv whose output is a (N, classes, H, W) map."""
    rng = np.random.default_rng(2)
    w = numpy_helper.from_array(rng.normal(size=(classes, 1, 1, 1)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["masks"])],
        "segmenter",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, size, size])],
        [helper.make_tensor_value_info("masks", TensorProto.FLOAT, ["N", classes, size, size])],
        initializer=[w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def vector_model(features: int = 10, classes: int = 4) -> onnx.ModelProto:
    """A classifier of feature vectors (N, features): no image input at all."""
    rng = np.random.default_rng(3)
    fc = numpy_helper.from_array(rng.normal(size=(classes, features)).astype(np.float32), "fc")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "fc"], ["logits"], transB=1)],
        "vector",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        initializer=[fc],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
