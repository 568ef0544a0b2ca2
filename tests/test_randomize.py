"""Cascading weight randomisation (the random floor): checked on every kind of artifact the
engine accepts against properties that must hold, a torch model's own layer order, and the
predictions of the bundled Fashion-MNIST model on real test images.

The parameters a randomised copy must change are found here independently of the
implementation: by each stored tensor's dtype and the input slot (per the ONNX operator
specs) it feeds, not by walking from the weight layers as :mod:`sp2ps_onnx.graph.randomize`
does.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sp2ps_onnx.errors import InputDataError, UnsupportedModelError
from sp2ps_onnx.graph import randomize_weights, weight_layers
from sp2ps_onnx.graph.randomize import METADATA_KEY

MODELS = Path(__file__).resolve().parent.parent / "models"
FLOAT = MODELS / "fmnist_cnn.onnx"
SAMPLES = MODELS / "samples" / "fmnist_test.npz"
TFLITE = MODELS / "frameworks" / "fmnist_keras_mag70.tflite"
KERAS = MODELS / "frameworks" / "fmnist_keras.keras"

# Input slots that hold quantization scales and zero points (ONNX and com.microsoft specs).
_QUANT_META = {
    "QuantizeLinear": (1, 2), "DequantizeLinear": (1, 2),
    "QLinearConv": (1, 2, 4, 5, 6, 7), "QLinearMatMul": (1, 2, 4, 5, 6, 7),
    "QGemm": (1, 2, 4, 5, 7, 8), "ConvInteger": (2, 3), "MatMulInteger": (2, 3),
    "QLinearAdd": (1, 2, 4, 5, 6, 7), "QLinearGlobalAveragePool": (1, 2, 3, 4),
    "QLinearSoftmax": (1, 2, 3, 4),
}
# Integer slots that hold quantized weights and biases.
_INTEGER_PARAMS = {
    "DequantizeLinear": (0,), "QLinearConv": (3, 8), "QGemm": (3, 6),
    "ConvInteger": (1,), "MatMulInteger": (1,), "QLinearMatMul": (3,), "QLinearAdd": (0, 3),
}
# Slots that hold statistics of the activations, not learnt parameters.
_RUNNING_STATS = {"BatchNormalization": (3, 4)}


def stored_tensors(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(helper.get_attribute_value(
                node.attribute[0]))
    return values


def learnable(model: onnx.ModelProto) -> set[str]:
    """Stored tensors that are learnt parameters: float tensors of more than one value that
    feed no quantization slot and no running statistic, and integer tensors in the weight or
    bias slot of a quantized op."""
    values = stored_tensors(model)
    meta, integer_params = set(), set()
    for node in model.graph.node:
        for slots, into in ((_QUANT_META, meta), (_RUNNING_STATS, meta),
                            (_INTEGER_PARAMS, integer_params)):
            into.update(node.input[i] for i in slots.get(node.op_type, ()) if i < len(node.input))
    floats = {n for n, v in values.items()
              if np.issubdtype(v.dtype, np.floating) and v.size > 1 and n not in meta}
    integers = {n for n, v in values.items()
                if np.issubdtype(v.dtype, np.integer) and n in integer_params}
    return floats | integers


def changed(before: onnx.ModelProto, after: onnx.ModelProto) -> set[str]:
    old, new = stored_tensors(before), stored_tensors(after)
    assert old.keys() == new.keys()
    return {n for n in old if old[n].dtype != new[n].dtype or old[n].shape != new[n].shape
            or old[n].tobytes() != new[n].tobytes()}


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def fmnist(n: int | None = None, nhwc: bool = False) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(SAMPLES)
    x = (data["x"][:n] / 255.0).astype(np.float32)
    return (x[..., None] if nhwc else x[:, None]), data["y"][:n]


def outputs(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    run = session(model)
    name = run.get_inputs()[0].name
    batch = run.get_inputs()[0].shape[0]
    if isinstance(batch, int):  # a fixed batch: run sample by sample
        parts = [run.run(None, {name: x[i : i + batch]}) for i in range(0, len(x), batch)]
        return [np.concatenate(p) for p in zip(*parts, strict=True)]
    return run.run(None, {name: x})


# ---------------------------------------------------------------- artifacts


class _Calibration:
    def __init__(self, x: np.ndarray) -> None:  # ORT's CalibrationDataReader protocol
        self._batches = iter([{"input": x[i : i + 8]} for i in range(0, len(x), 8)])

    def get_next(self):
        return next(self._batches, None)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, tuple[Path, bool]]:
    """name -> (ONNX file, whether its input is NHWC)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    from experiments.artifacts import keras_to_onnx_via_tflite
    from sp2ps_onnx.convert import to_onnx

    folder = tmp_path_factory.mktemp("randomize")
    x, _ = fmnist(32)
    made = {"float": (FLOAT, False), "keras": (MODELS / "keras" / "fmnist_keras.onnx", True)}
    for name, form in (("qdq", QuantFormat.QDQ), ("qoperator", QuantFormat.QOperator)):
        quantize_static(FLOAT, folder / f"{name}.onnx", _Calibration(x), quant_format=form,
                        per_channel=name == "qdq", weight_type=QuantType.QInt8)
        made[name] = (folder / f"{name}.onnx", False)
    # the Keras twin's MatMul + Add head becomes QLinearMatMul + QLinearAdd (a quantized bias)
    keras_onnx = made["keras"][0]
    quantize_static(keras_onnx, folder / "keras_qoperator.onnx",
                    _Calibration(fmnist(32, nhwc=True)[0]), quant_format=QuantFormat.QOperator,
                    per_channel=True, weight_type=QuantType.QInt8)
    made["keras_qoperator"] = (folder / "keras_qoperator.onnx", True)
    quantize_dynamic(FLOAT, folder / "dynamic.onnx", weight_type=QuantType.QInt8)
    made["dynamic"] = (folder / "dynamic.onnx", False)
    made["tflite"] = (Path(to_onnx(TFLITE, folder / "tflite.onnx").onnx), True)
    import keras

    keras_model = keras.models.load_model(KERAS, compile=False)
    for form in ("dynamic", "int8"):
        target = folder / f"tflite_{form}.onnx"
        keras_to_onnx_via_tflite(keras_model, fmnist(32, nhwc=True)[0], form, target)
        made[f"tflite_{form}"] = (target, True)
    return made


@pytest.fixture(scope="module")
def paddle_cls() -> Path:
    rapidocr = pytest.importorskip("rapidocr_onnxruntime")  # a test dependency in pyproject
    return Path(rapidocr.__file__).parent / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"


ARTIFACTS = ("float", "keras", "qdq", "qoperator", "keras_qoperator", "dynamic", "tflite",
             "tflite_dynamic", "tflite_int8")


# ---------------------------------------------------------------- tests


def test_input_proto_and_file_are_left_unchanged(tmp_path: Path) -> None:
    proto = onnx.load(FLOAT)
    before = proto.SerializeToString()
    randomized = randomize_weights(proto, seed=3)
    assert proto.SerializeToString() == before
    assert randomized is not proto and randomized.SerializeToString() != before

    copy = tmp_path / "model.onnx"
    copy.write_bytes(FLOAT.read_bytes())
    digest = hashlib.sha256(copy.read_bytes()).hexdigest()
    from_file = randomize_weights(copy, seed=3)
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == digest
    assert from_file.SerializeToString() == randomized.SerializeToString()


@pytest.mark.parametrize("name", ARTIFACTS)
def test_every_artifact_gets_all_its_parameters_and_nothing_else_redrawn(artifacts, name) -> None:
    path, nhwc = artifacts[name]
    original = onnx.load(path)
    randomized = randomize_weights(original, seed=0)
    onnx.checker.check_model(randomized, full_check=True)
    assert changed(original, randomized) == learnable(original)
    assert len(weight_layers(original)) == 6  # five convolutions and the dense head

    x, _ = fmnist(16, nhwc=nhwc)
    expected, got = outputs(original, x), outputs(randomized, x)
    assert [(a.shape, a.dtype) for a in got] == [(a.shape, a.dtype) for a in expected]
    assert all(np.isfinite(a).all() for a in got if np.issubdtype(a.dtype, np.floating))
    assert not np.array_equal(got[0], expected[0])


def test_paddle_weights_in_constant_nodes_are_redrawn(paddle_cls: Path) -> None:
    original = onnx.load(paddle_cls)
    assert not original.graph.initializer  # every weight sits in a Constant node
    randomized = randomize_weights(original, seed=0)
    onnx.checker.check_model(randomized, full_check=True)
    redrawn = changed(original, randomized)
    assert redrawn == learnable(original)
    assert {"fc_0.w_0", "fc_0.b_0", "conv1_weights", "conv1_bn_scale", "conv1_bn_offset"} <= redrawn
    assert not {"conv1_bn_mean", "conv1_bn_variance"} & redrawn  # running statistics stay

    x = np.random.default_rng(0).random((2, 3, 48, 192), dtype=np.float32)
    expected, got = outputs(original, x)[0], outputs(randomized, x)[0]
    assert got.shape == expected.shape and np.isfinite(got).all()
    assert not np.allclose(got, expected)


def test_paddle_cascade_goes_through_each_block_from_its_output(paddle_cls: Path) -> None:
    """MobileNetV3 blocks run expand -> depthwise -> SE (se_1 -> se_2) -> linear, so the
    cascade, coming from the output, meets them in the reverse order (Paddle's names)."""
    order = [layer.parameters[0] for layer in weight_layers(paddle_cls)]
    assert order[0] == "fc_0.w_0" and order[1] == "conv_last_weights"
    assert order[-1] == "conv1_weights"
    for block in ("conv2", "conv5", "conv12"):
        parts = [f"{block}_{part}_weights" for part in
                 ("linear", "se_2", "se_1", "depthwise", "expand")]
        positions = [order.index(p) for p in parts]
        assert positions == sorted(positions)


@pytest.mark.parametrize("name", ["float", "qdq"])
def test_same_seed_gives_the_same_bytes_and_another_seed_other_weights(artifacts, name) -> None:
    original = onnx.load(artifacts[name][0])
    first = randomize_weights(original, seed=11).SerializeToString()
    assert randomize_weights(original, seed=11).SerializeToString() == first
    other = randomize_weights(original, seed=12)
    differing = changed(onnx.load_from_string(first), other)
    assert differing == learnable(original)


def _channel_moments(values: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    rows = (np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1) if axis is not None
            else values.reshape(1, -1)).astype(np.float64)
    return rows.mean(axis=1), rows.std(axis=1)


def test_float_layers_keep_each_output_channels_mean_and_std() -> None:
    original = onnx.load(FLOAT)
    old, new = stored_tensors(original), stored_tensors(randomize_weights(original, seed=5))
    for name in learnable(original):
        axis = 0 if old[name].ndim > 1 else None  # OIHW convolutions, Gemm(transB=1) rows
        for before, after in zip(_channel_moments(old[name], axis),
                                 _channel_moments(new[name], axis), strict=True):
            np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-7)
        if old[name].size >= 64:  # fresh values, not a rescaled copy of the trained ones
            assert abs(np.corrcoef(old[name].ravel(), new[name].ravel())[0, 1]) < 0.25


def test_quantized_codes_keep_dtype_range_and_channel_moments(artifacts) -> None:
    original = onnx.load(artifacts["qdq"][0])
    old, new = stored_tensors(original), stored_tensors(randomize_weights(original, seed=5))
    for name in learnable(original):
        assert new[name].dtype == old[name].dtype and new[name].shape == old[name].shape
        info = np.iinfo(old[name].dtype)
        assert info.min <= new[name].min() and new[name].max() <= info.max
        axis = 0 if old[name].ndim > 1 else None
        (mean_before, std_before), (mean_after, std_after) = (
            _channel_moments(old[name], axis), _channel_moments(new[name], axis))
        # rounding to integer codes moves a channel's moments by at most about half a code
        assert np.all(np.abs(mean_after - mean_before) <= 0.5), name
        assert np.all(np.abs(std_after - std_before) <= 0.5 + 0.02 * std_before), name


def test_weight_behind_a_transpose_keeps_the_moments_of_its_output_channels() -> None:
    """A TFLite-style HWIO kernel stored in a Constant node, transposed to OIHW for Conv:
    the output channels are the stored tensor's last axis."""
    rng = np.random.default_rng(0)
    # channels with very different means and spreads, so a wrong axis cannot pass
    kernel = (rng.standard_normal((3, 3, 2, 5)) * np.arange(1, 6) + 10 * np.arange(5))
    kernel = kernel.astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["hwio"], value=numpy_helper.from_array(kernel, "hwio")),
        helper.make_node("Transpose", ["hwio"], ["oihw"], perm=[3, 2, 0, 1]),
        helper.make_node("Conv", ["x", "oihw"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "transposed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 4, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    randomized = randomize_weights(model, seed=1)
    onnx.checker.check_model(randomized, full_check=True)
    after = stored_tensors(randomized)["hwio"]
    for before_moment, after_moment in zip(_channel_moments(kernel, 3), _channel_moments(after, 3),
                                           strict=True):
        np.testing.assert_allclose(after_moment, before_moment, rtol=1e-4)
    assert not np.array_equal(after, kernel)


class _TorchNet:
    """conv1 -> conv2 -> conv3 -> global average pool -> fc1 -> fc2, in this module order."""

    @staticmethod
    def build():
        torch = pytest.importorskip("torch")
        nn = torch.nn

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv1 = nn.Conv2d(1, 8, 3)
                self.conv2 = nn.Conv2d(8, 16, 3)
                self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
                self.fc1 = nn.Linear(16, 32)
                self.fc2 = nn.Linear(32, 5)

            def forward(self, x):
                x = torch.relu(self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x))))))
                return self.fc2(torch.relu(self.fc1(x.mean(dim=(2, 3)))))

        torch.manual_seed(0)
        return Net().eval()


def test_cascade_redraws_exactly_the_k_torch_modules_nearest_the_output(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    net = _TorchNet.build()
    path = tmp_path / "net.onnx"
    torch.onnx.export(net, torch.zeros(1, 1, 12, 12), path, dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"])
    original = onnx.load(path)
    stored = stored_tensors(original)
    # Each torch parameter's tensor in the export, found by value (not by name).
    modules = [name for name, _ in net.named_children()]
    owned = {
        module: {next(n for n, v in stored.items() if v.shape == p.shape
                      and np.array_equal(v, p.detach().numpy()))
                 for p in getattr(net, module).parameters()}
        for module in modules
    }
    assert all(len(names) == 2 for names in owned.values())

    steps = [randomize_weights(original, seed=7, layers=k) for k in range(len(modules) + 1)]
    for k, step in enumerate(steps):
        nearest = modules[len(modules) - k:]
        assert changed(original, step) == set().union(*(owned[m] for m in nearest))
    # a layer's fresh values are the same at every later step of the cascade
    final = stored_tensors(steps[-1])
    for step in steps[1:-1]:
        for name in changed(original, step):
            np.testing.assert_array_equal(stored_tensors(step)[name], final[name])
    assert [layer.distance for layer in weight_layers(original)] == [0, 1, 2, 3, 4]
    with pytest.raises(InputDataError, match=r"layers=6 .* at most 5"):
        randomize_weights(original, seed=7, layers=6)


def test_randomised_model_predicts_at_chance_on_fashion_mnist() -> None:
    """The floor has learnt nothing: on the 300 balanced test images (30 per class) its
    predictions agree with the original's, and with the labels, about as often as a guess
    (10 %), while the trained model is right on over 85 %."""
    x, labels = fmnist()
    original = onnx.load(FLOAT)
    trained = outputs(original, x)[0].argmax(axis=1)
    assert (trained == labels).mean() > 0.85
    agreements, accuracies = [], []
    for seed in range(5):
        floor = outputs(randomize_weights(original, seed=seed), x)[0].argmax(axis=1)
        agreements.append((floor == trained).mean())
        accuracies.append((floor == labels).mean())
    assert max(agreements) < 0.2 and max(accuracies) < 0.2
    assert abs(np.mean(agreements) - 0.1) < 0.05
    assert METADATA_KEY in {p.key for p in randomize_weights(original, seed=0).metadata_props}


def test_refusals_say_what_to_do() -> None:
    original = onnx.load(FLOAT)
    with pytest.raises(InputDataError, match="seed must be a non-negative integer"):
        randomize_weights(original, seed=-1)
    with pytest.raises(InputDataError, match="layers must be a non-negative integer"):
        randomize_weights(original, seed=0, layers=1.5)

    relu = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "plain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])]),
        opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UnsupportedModelError, match="no weight layers.*--no-floor"):
        randomize_weights(relu, seed=0)

    weight = numpy_helper.from_array(np.ones((2, 1, 3, 3), np.float32), "w")
    computed = helper.make_model(helper.make_graph(
        [helper.make_node("Mul", ["w", "w"], ["w2"]),
         helper.make_node("Conv", ["x", "w2"], ["y"], name="the_conv")], "computed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 3, 3])], [weight]),
        opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UnsupportedModelError,
                       match=r"'the_conv'.*computed by a Mul node.*constant folding"):
        randomize_weights(computed, seed=0)
