"""The repository's one set of exporters: ONNX files of the study's models, of the bundled
models (``models/build.py``) and of the benchmarks' models, and the deployment artifacts.

* PyTorch: ``torch.onnx.export`` (legacy exporter, opset 17, dynamic batch);
* Keras: ``tf2onnx.convert.from_keras`` (NHWC input, ends in Softmax);
* ONNX Runtime static int8 quantization in QDQ format, calibrated on training images;
* TFLite (``tf.lite.TFLiteConverter``) in four forms -- float, dynamic-range, full-integer
  int8 with float I/O, and int8 with int8 I/O -- brought to ONNX with
  ``tf2onnx.convert.from_tflite``: the deployment artifacts of a TensorFlow Lite toolchain,
  shared by the study, the tests and ``benchmarks/bench_zoo.py``.

The PyTorch and Keras exports are checked against the framework's own output before use.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np

OPSET = 17


def _check_session(path: Path, x: np.ndarray, expected: np.ndarray, rtol: float, atol: float):
    import onnx
    import onnxruntime

    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    actual = session.run(None, {session.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol,
                               err_msg=f"{path.name} does not reproduce its framework's output")


def export_torch(model, path: Path, input_shape: tuple[int, ...] = (1, 1, 28, 28),
                 check: bool = True, example=None) -> Path:
    """``model`` as ONNX (input ``input``, output ``logits``, dynamic batch), traced on
    ``example`` (zeros of ``input_shape`` when None) and checked against torch on 8 random
    inputs of the same image shape unless ``check`` is False."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    if example is None:
        example = torch.zeros(*input_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(path), dynamo=False, opset_version=OPSET,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    if check:
        x = np.random.default_rng(0).random((8, *example.shape[1:]), dtype=np.float32)
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        _check_session(path, x, expected, rtol=1e-3, atol=1e-4)
    return path


def export_keras(model, path: Path, output_name: str | None = None,
                 batch_name: str | None = None, input_shape: tuple[int, ...] = (28, 28, 1),
                 check: bool = True) -> Path:
    """A Keras model with NHWC ``input_shape`` as ONNX (input ``input``), checked against
    Keras on 8 random inputs unless ``check`` is False.

    ``output_name`` renames the graph output (tf2onnx names it after the Keras layer);
    ``batch_name`` names the batch dimension of the input and output."""
    import onnx
    import tensorflow as tf
    import tf2onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    signature = (tf.TensorSpec((None, *input_shape), tf.float32, name="input"),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=signature, opset=OPSET)
    if output_name is not None:
        _rename_graph_output(proto, output_name)
    if batch_name is not None:
        for value in (*proto.graph.input, *proto.graph.output):
            value.type.tensor_type.shape.dim[0].dim_param = batch_name
    onnx.save(proto, str(path))
    if check:
        x = np.random.default_rng(0).random((8, *input_shape), dtype=np.float32)
        _check_session(path, x, model.predict(x, verbose=0), rtol=1e-3, atol=1e-5)
    return path


def _rename_graph_output(proto, new_name: str) -> None:
    (output,) = proto.graph.output
    old_name = output.name
    if old_name == new_name:
        return
    for node in proto.graph.node:
        node.output[:] = [new_name if name == old_name else name for name in node.output]
        node.input[:] = [new_name if name == old_name else name for name in node.input]
    output.name = new_name


def calibration_reader(input_name: str, batches: Iterable[np.ndarray]):
    """An ONNX Runtime ``CalibrationDataReader`` that feeds ``batches`` to ``input_name``,
    once (make a new reader for each quantization)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(batches)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {input_name: batch}

    return Reader()


ORT_FORMS = ("dynamic", "qdq", "qoperator")


def quantize_ort(source: Path, target: Path, form: str, x: np.ndarray | None = None) -> Path:
    """ONNX Runtime's quantizer with its default types: ``dynamic`` (int8 weights), or static
    ``qdq`` / ``qoperator`` with per-channel weights, calibrated (MinMax) on the inputs ``x``
    of the model's ``input``, one image at a time."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    if form not in ORT_FORMS:
        raise ValueError(f"unknown ONNX Runtime quantization {form!r}; choose one of {ORT_FORMS}")
    if form == "dynamic":
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
        return target
    if x is None:
        raise ValueError(f"static quantization {form!r} needs calibration inputs x")
    reader = calibration_reader("input", [x[i : i + 1] for i in range(len(x))])
    fmt = QuantFormat.QDQ if form == "qdq" else QuantFormat.QOperator
    quantize_static(str(source), str(target), reader, quant_format=fmt, per_channel=True)
    return target


def quantize_qdq(source: Path, path: Path, calibration: np.ndarray) -> Path:
    """ONNX Runtime static quantization, QDQ format, per-channel int8 weights, uint8
    activations (the defaults), calibrated by MinMax on ``calibration`` (model inputs)."""
    import onnxruntime
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    input_name = onnxruntime.InferenceSession(
        str(source), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    reader = calibration_reader(
        input_name, np.array_split(calibration, max(1, len(calibration) // 64)))
    path.parent.mkdir(parents=True, exist_ok=True)
    prepared = path.with_suffix(".prep.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(path), reader, quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)
    prepared.unlink(missing_ok=True)
    return path


TFLITE_FORMS = ("float", "dynamic", "int8", "int8io")


def keras_to_tflite(model, form: str, x: np.ndarray | None = None) -> bytes:
    """The TFLite flatbuffer of a Keras model in ``form``: ``float``; ``dynamic`` (dynamic-
    range int8 weights); ``int8`` (full integer, float I/O) or ``int8io`` (int8 I/O), both
    calibrated on the representative NHWC inputs ``x``, one image at a time."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    if form not in TFLITE_FORMS:
        raise ValueError(f"unknown TFLite form {form!r}; choose one of {TFLITE_FORMS}")
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if form != "float":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if form.startswith("int8"):
        if x is None:
            raise ValueError(f"TFLite form {form!r} needs representative inputs x")
        converter.representative_dataset = lambda: ([x[i : i + 1]] for i in range(len(x)))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if form == "int8io":
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    return converter.convert()


def keras_to_onnx_via_tflite(model, x: np.ndarray | None, form: str, target: Path) -> Path:
    """Convert ``model`` to TFLite in ``form`` (see :func:`keras_to_tflite`), keep the
    .tflite beside ``target`` and write its tf2onnx conversion there."""
    import onnx
    import tf2onnx

    target.parent.mkdir(parents=True, exist_ok=True)
    tflite = target.with_suffix(".tflite")
    tflite.write_bytes(keras_to_tflite(model, form, x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto, _ = tf2onnx.convert.from_tflite(str(tflite), opset=OPSET)
    onnx.save(proto, target)
    return target


def onnx_accuracy(path: Path, images: np.ndarray, labels: np.ndarray,
                  threads: int | None = None) -> float:
    """Top-1 accuracy of an ONNX Fashion-MNIST model on uint8 images, in plain ONNX Runtime
    with ``threads`` intra-op threads (its default when None). A check during training; the
    study's reported accuracies come from the scoring run."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(path), options,
                                           providers=["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    x = images.astype(np.float32) / 255.0
    x = x[:, None] if spec.shape[1] == 1 else x[..., None]
    correct = 0
    for start in range(0, len(x), 1000):
        scores = session.run(None, {spec.name: x[start:start + 1000]})[0]
        correct += int(np.sum(scores.argmax(axis=1) == labels[start:start + 1000]))
    return correct / len(x)
