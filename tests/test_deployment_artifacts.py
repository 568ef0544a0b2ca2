"""Deployment artifacts as toolchains emit them (issue 8), one test group per problem.

1. Dynamic quantization (ONNX Runtime ``quantize_dynamic``, TFLite dynamic range) and
   QOperator graphs run; gradients equal the straight-through reference and CAMs correlate
   with the float model's on real photos.
2. A score behind Softmax → Q/DQ (full-integer TFLite) is cut to the pre-softmax logits.
3. A channels-last LayerNorm sandwich (timm ConvNeXt with ``head_norm_first``) comes back
   channels-first with torch's own values and gradient; an unprovable layout is refused.
4. The default layer dominates the score: never a tensor inside one branch of a block.
5. Parameters and sparsity of quantized models count the integer weights.
6. Expected failures of our own ONNX Runtime probes leave no ORT log line on stderr.

Every model is built here with random weights (fixed seeds) and small inputs. The per-rule
straight-through checks against float twins are in ``test_vjp_rules.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from experiments.artifacts import ORT_FORMS, TFLITE_FORMS, keras_to_onnx_via_tflite, quantize_ort
from references.photos import per_image_pearson, sample_photos
from sp2ps_onnx import CamModel
from sp2ps_onnx.errors import LayerNotFoundError
from sp2ps_onnx.graph import inspect_model, parameter_count, weight_statistics
from tests.exports import cache_dir, export_torchvision

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

PEARSON_MIN = 0.9
SIZE = 64


# ---------------------------------------------------------------------------------------------
# 1 and 5: ONNX Runtime quantization of a torchvision ResNet-18 (QDQ, QOperator, dynamic)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet_variants() -> dict[str, Path]:
    path, _, _ = export_torchvision("resnet18", False, SIZE)
    x = sample_photos(SIZE, nchw=True)
    out = {"float": path}
    for form in ORT_FORMS:
        target = cache_dir() / f"resnet18-{SIZE}-{form}.onnx"
        if not target.exists():
            quantize_ort(path, target, form, x)
        out[form] = target
    return out


def _fc_weight_as_quantized(model: onnx.ModelProto) -> np.ndarray:
    """The classifier weight (K, C) as the quantized model computes with it, dequantized
    directly from the integer codes, scales and zero points (no engine code involved)."""
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    nodes = list(model.graph.node)
    producers = {o: n for n in nodes for o in n.output}
    for node in nodes:
        if node.op_type == "Gemm":  # QDQ: Gemm(DQ(x), DQ(W), ...), transB=1
            dq = producers[node.input[1]]
            codes, scale = values[dq.input[0]].astype(np.float64), values[dq.input[1]]
            zero = values[dq.input[2]].astype(np.float64) if len(dq.input) > 2 else 0.0
            return ((codes - np.reshape(zero, (-1, 1))) * np.reshape(scale, (-1, 1)))
        if node.op_type == "QGemm":  # QOperator, transB=1, per output channel
            codes, scale, zero = (values[node.input[i]].astype(np.float64) for i in (3, 4, 5))
            return (codes - zero.reshape(-1, 1)) * scale.reshape(-1, 1)
        if node.op_type == "MatMulInteger":  # dynamic: (C, K) codes; Mul by x_scale * w_scale
            codes = values[node.input[1]].astype(np.float64)
            zero = values[node.input[3]].astype(np.float64) if len(node.input) > 3 else 0.0
            cast = next(n for n in nodes if n.input and n.input[0] == node.output[0])
            mul = next(n for n in nodes if cast.output[0] in n.input)
            scale_mul = producers[next(i for i in mul.input if i != cast.output[0])]
            w_scale = next(values[i] for i in scale_mul.input if i in values)
            return ((codes - zero) * w_scale).T
    raise AssertionError("no classifier weight found")


@pytest.mark.parametrize("form", ORT_FORMS)
def test_onnxruntime_quantized_model_matches_straight_through_and_float_cams(
    resnet_variants, form: str
) -> None:
    x = sample_photos(SIZE, nchw=True)
    float_cams, targets = CamModel(resnet_variants["float"]).cams(x)
    model = onnx.load(resnet_variants[form])
    quantized = CamModel(model)
    result = quantized.run(x, targets=targets)

    # The head is GlobalAveragePool → Flatten → fc: the straight-through gradient at the
    # layer is the dequantized fc row of the target class spread evenly over h·w.
    _, _, h, w = result.activations.shape
    weight = _fc_weight_as_quantized(model)
    expected = np.broadcast_to(weight[targets][:, :, None, None] / (h * w), result.gradients.shape)
    np.testing.assert_allclose(result.gradients, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())

    maps, _ = quantized.cams(x, targets=targets)
    correlation = per_image_pearson(float_cams, maps)
    assert correlation.min() >= PEARSON_MIN, f"{form}: CAM Pearson vs float {correlation}"


def test_quantized_models_count_integer_weights(resnet_variants) -> None:
    float_model = onnx.load(resnet_variants["float"])
    float_weights, float_zeros = weight_statistics(float_model)
    assert float_zeros == 0
    for form in ORT_FORMS:
        model = onnx.load(resnet_variants[form])
        assert parameter_count(model) == parameter_count(float_model), form
        weights, zeros = weight_statistics(model)
        assert weights == float_weights, form
        assert 0 < zeros < weights, form  # codes equal to the zero point: small weights
    # Same static quantization, two graph forms: the same weights are zero.
    assert weight_statistics(onnx.load(resnet_variants["qdq"])) == weight_statistics(
        onnx.load(resnet_variants["qoperator"])
    )


def test_pruned_model_keeps_its_sparsity_after_quantization(tmp_path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    pruned = Path(__file__).parent.parent / "models" / "pruned" / "fmnist_cnn_mag80.onnx"
    quantized = tmp_path / "mag80-dynamic.onnx"
    quantize_dynamic(str(pruned), str(quantized), weight_type=QuantType.QInt8)
    float_weights, float_zeros = weight_statistics(onnx.load(pruned))
    weights, zeros = weight_statistics(onnx.load(quantized))
    assert weights == float_weights
    assert zeros >= float_zeros  # a pruned weight quantizes to its zero point
    assert parameter_count(onnx.load(quantized)) == parameter_count(onnx.load(pruned))


# ---------------------------------------------------------------------------------------------
# 1, 2: TFLite float / dynamic range / full integer (float and int8 I/O) through tf2onnx
# ---------------------------------------------------------------------------------------------

def _keras_cnn(size: int):
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    layers = tf.keras.layers
    inputs = tf.keras.Input((size, size, 3))
    x = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(inputs)
    x = layers.Conv2D(32, 3, strides=2, padding="same")(x)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU(6.0)(x)
    x = layers.DepthwiseConv2D(3, padding="same", activation="relu")(x)
    x = layers.Conv2D(48, 1, activation="relu", name="features")(x)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(10, activation="softmax")(layers.Dense(32, activation="relu")(x))
    return tf.keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def tflite_variants() -> dict[str, Path]:
    model = _keras_cnn(SIZE)
    x = sample_photos(SIZE, nchw=False)
    out = {}
    for form in TFLITE_FORMS:
        target = cache_dir() / f"keras-cnn-{SIZE}-tflite-{form}.onnx"
        if not target.exists():
            keras_to_onnx_via_tflite(model, x, form, target)
        out[form] = target
    return out


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("form", TFLITE_FORMS[1:])
def test_tflite_quantized_models_cut_the_softmax_and_follow_the_float_cams(
    tflite_variants, form: str
) -> None:
    import onnxruntime as ort

    x = sample_photos(SIZE, nchw=False)
    float_cams, targets = CamModel(tflite_variants["float"]).cams(x)
    quantized = CamModel(tflite_variants[form])
    details = inspect_model(tflite_variants[form])
    assert details["softmax_cut"], f"{form}: the final Softmax was not cut"
    assert "Softmax" in details["score_cut_ops"]

    # The score is the logit: the model's own output is (the quantized) softmax of it.
    session = ort.InferenceSession(str(tflite_variants[form]), providers=["CPUExecutionProvider"])
    feed = x
    if form == "int8io":
        scale, zero = quantized.input_quantization
        assert details["input_quantization"] == (scale, zero)
        feed = np.clip(np.rint(x / scale) + zero, -128, 127).astype(np.int8)
    output = session.run(None, {session.get_inputs()[0].name: feed})[0].astype(np.float64)
    if form == "int8io":  # int8 probabilities: zero point -128, scale 1/256 (TFLite's fixed)
        output = (output + 128) / 256
    score = quantized.run(x, targets=targets).score
    assert not np.allclose(score.sum(axis=1), 1.0, atol=1e-3), "score looks like probabilities"
    np.testing.assert_allclose(_softmax(score.astype(np.float64)), output, atol=2 / 256)

    maps, _ = quantized.cams(x, targets=targets)
    correlation = per_image_pearson(float_cams, maps)
    assert correlation.min() >= PEARSON_MIN, f"{form}: CAM Pearson vs float {correlation}"


def test_decomposed_softmax_and_trailing_reshape_are_cut() -> None:
    # logits → Sub(ReduceMax) → Exp → Div(ReduceSum) → Reshape → Cast: the score is the logit.
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "w"], ["logits"]),
        helper.make_node("ReduceMax", ["logits"], ["m"], axes=[1], keepdims=1),
        helper.make_node("Sub", ["logits", "m"], ["z"]),
        helper.make_node("Exp", ["z"], ["e"]),
        helper.make_node("ReduceSum", ["e", "axis"], ["s"], keepdims=1),
        helper.make_node("Div", ["e", "s"], ["probs"]),
        helper.make_node("Reshape", ["probs", "shape"], ["r"]),
        helper.make_node("Cast", ["r"], ["out"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes,
        "decomposed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 5])],
        [
            numpy_helper.from_array(rng.standard_normal((3, 5)).astype(np.float32), "w"),
            numpy_helper.from_array(np.array([1], np.int64), "axis"),
            numpy_helper.from_array(np.array([-1, 5], np.int64), "shape"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    cam = CamModel(model, layer="x")
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    result = cam.run(x, targets=[1, 4])
    logits = x.mean(axis=(2, 3)) @ numpy_helper.to_array(graph.initializer[0])
    np.testing.assert_allclose(result.score, logits, rtol=1e-5, atol=1e-6)
    assert cam.graph.score_tensor == "logits"


# ---------------------------------------------------------------------------------------------
# 3: channels-last LayerNorm sandwich (timm ConvNeXt, head_norm_first)
# ---------------------------------------------------------------------------------------------


def test_layernorm_sandwich_layer_is_channels_first_with_torch_gradient(tmp_path) -> None:
    import torch
    from timm.models.convnext import ConvNeXt

    torch.manual_seed(0)
    model = ConvNeXt(
        depths=(1, 1, 1, 1), dims=(16, 24, 32, 48), head_norm_first=True, num_classes=10
    ).eval()
    x = torch.from_numpy(sample_photos(SIZE, nchw=True))
    path = tmp_path / "convnext-hnf.onnx"
    torch.onnx.export(
        model, x, str(path), input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "N"}}, opset_version=17, dynamo=False,
    )
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert ops[-6:-3] == ["Transpose", "LayerNormalization", "Transpose"], ops[-6:]

    cam = CamModel(path)
    assert cam.graph.layer_layout.channel_axis == 3  # the LayerNorm output is NHWC
    result = cam.run(x.numpy())

    captured = {}
    model.norm_pre.register_forward_hook(lambda m, i, o: captured.setdefault("map", o))
    logits = model(x)
    feature = captured["map"]
    feature.retain_grad()
    logits[torch.arange(len(x)), torch.from_numpy(result.targets)].sum().backward()
    np.testing.assert_allclose(result.activations, feature.detach().numpy(), rtol=1e-4, atol=1e-4)
    gradient = feature.grad.numpy()
    np.testing.assert_allclose(result.gradients, gradient, atol=1e-5 * np.abs(gradient).max())


def test_unprovable_layout_is_refused_with_the_tensor_name() -> None:
    # Conv → Reshape to another 4-D arrangement → ReduceMean over (1, 2) → Gemm: nothing
    # fixes which axis of the reshaped map holds the channels.
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Conv", ["x", "k"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["c", "shape"], ["scrambled"]),
        helper.make_node("ReduceMean", ["scrambled"], ["m"], axes=[1, 2], keepdims=0),
        helper.make_node("Gemm", ["m", "w"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "scrambled",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        [
            numpy_helper.from_array(rng.standard_normal((6, 3, 3, 3)).astype(np.float32), "k"),
            numpy_helper.from_array(np.array([0, 8, 8, 6], np.int64), "shape"),
            numpy_helper.from_array(rng.standard_normal((6, 4)).astype(np.float32), "w"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(LayerNotFoundError) as caught:
        CamModel(model)
    message = str(caught.value)
    assert "'scrambled'" in message and "layer=" in message and "channels" in message
    assert CamModel(model, layer="c").graph.layer_layout.channel_axis == 1  # a Conv output works


# ---------------------------------------------------------------------------------------------
# 4: the default layer dominates the score (an Inception-style last block)
# ---------------------------------------------------------------------------------------------


def test_default_layer_is_the_block_input_every_branch_reads(tmp_path) -> None:
    import tensorflow as tf
    import tf2onnx

    tf.keras.utils.set_random_seed(1)
    layers = tf.keras.layers
    inputs = tf.keras.Input((32, 32, 3))
    x = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(inputs)
    x = layers.Conv2D(24, 3, strides=2, padding="same", activation="relu")(x)
    a = layers.Conv2D(8, 1, activation="relu")(x)
    b = layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    mixed = layers.Concatenate(name="mixed")([a, b])  # 8x8: the layer every path reads
    # The last block reduces 8x8 to 1x1 in every branch (as InceptionV3's mixed8 at 96 px);
    # one branch first runs a 1x1 conv at 8x8: the last map with H, W > 1 on a path to the
    # score, but inside one branch.
    conv_1 = layers.Conv2D(16, 8, activation="relu")
    conv_inner = layers.Conv2D(12, 1, activation="relu", name="branch_tensor")
    conv_2 = layers.Conv2D(16, 8, activation="relu")
    pool = layers.MaxPooling2D(8)
    concat, gap, dense = layers.Concatenate(), layers.GlobalAveragePooling2D(), layers.Dense(5)

    def head(features):
        block = concat([conv_1(features), conv_2(conv_inner(features)), pool(features)])
        return dense(gap(block))

    model = tf.keras.Model(inputs, head(mixed))
    proto, _ = tf2onnx.convert.from_keras(model, opset=17)

    cam = CamModel(proto)
    x = sample_photos(32, nchw=False)
    result = cam.run(x)
    assert result.activations.shape[1:] == (16, 8, 8)  # mixed (16 ch), not branch_tensor (12)
    # The chosen tensor is the block input "mixed": TF's gradient there is the reference.
    features = tf.Variable(tf.keras.Model(inputs, mixed)(tf.constant(x)))
    with tf.GradientTape() as tape:
        picked = tf.gather(head(features), result.targets, axis=1, batch_dims=1)
    gradient = tape.gradient(picked, features).numpy().transpose(0, 3, 1, 2)
    activations = features.numpy().transpose(0, 3, 1, 2)
    np.testing.assert_allclose(result.activations, activations, atol=1e-4)
    np.testing.assert_allclose(result.gradients, gradient, atol=1e-5 * np.abs(gradient).max())


# ---------------------------------------------------------------------------------------------
# 6: no ONNX Runtime log line for our own expected probe failures
# ---------------------------------------------------------------------------------------------


def test_fixed_batch_probe_failure_is_silent(capfd) -> None:
    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node("Conv", ["x", "k"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Reshape", ["p", "shape"], ["f"]),  # hard-coded batch 1
        helper.make_node("Gemm", ["f", "w"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])],
        [
            numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "k"),
            numpy_helper.from_array(np.array([1, 4], np.int64), "shape"),
            numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    capfd.readouterr()
    cam = CamModel(model)
    assert cam.graph.info.fixed_batch == 1  # the batch-2 probe failed, as expected
    cam.run(rng.standard_normal((3, 3, 8, 8)).astype(np.float32))
    captured = capfd.readouterr()
    assert "onnxruntime" not in captured.err and "[E:" not in captured.err, captured.err
