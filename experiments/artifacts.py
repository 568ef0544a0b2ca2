"""ONNX files of the study's models, and the deployment artifacts.

* PyTorch: ``torch.onnx.export`` (legacy exporter, opset 17, dynamic batch);
* Keras: ``tf2onnx.convert.from_keras`` (NHWC input, ends in Softmax);
* ONNX Runtime static int8 quantization in QDQ format, calibrated on training images;
* full-integer int8 TFLite (``tf.lite.TFLiteConverter`` with only int8 builtins and a
  representative dataset), brought to ONNX with ``tf2onnx.convert.from_tflite``.

Every export is checked against the framework's own output before it is used.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

OPSET = 17


def _check_session(path: Path, x: np.ndarray, expected: np.ndarray, rtol: float, atol: float):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    actual = session.run(None, {session.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol,
                               err_msg=f"{path.name} does not reproduce its framework's output")


def export_torch(model, path: Path) -> Path:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.zeros(1, 1, 28, 28),), str(path), dynamo=False, opset_version=OPSET,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    x = np.random.default_rng(0).random((8, 1, 28, 28), dtype=np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    _check_session(path, x, expected, rtol=1e-3, atol=1e-4)
    return path


def export_keras(model, path: Path) -> Path:
    import onnx
    import tensorflow as tf
    import tf2onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    signature = (tf.TensorSpec((None, 28, 28, 1), tf.float32, name="input"),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=signature, opset=OPSET)
    onnx.save(proto, str(path))
    x = np.random.default_rng(0).random((8, 28, 28, 1), dtype=np.float32)
    _check_session(path, x, model.predict(x, verbose=0), rtol=1e-3, atol=1e-5)
    return path


def quantize_qdq(source: Path, path: Path, calibration: np.ndarray) -> Path:
    """ONNX Runtime static quantization, QDQ format, per-channel int8 weights, uint8
    activations (the defaults), calibrated by MinMax on ``calibration`` (model inputs)."""
    import onnxruntime
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    input_name = onnxruntime.InferenceSession(
        str(source), providers=["CPUExecutionProvider"]).get_inputs()[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(np.array_split(calibration, max(1, len(calibration) // 64)))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {input_name: batch}

    path.parent.mkdir(parents=True, exist_ok=True)
    prepared = path.with_suffix(".prep.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(path), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)
    prepared.unlink(missing_ok=True)
    return path


def tflite_full_int8(model, path: Path, calibration: np.ndarray) -> tuple[Path, Path]:
    """Full-integer int8 TFLite of a Keras model (float input/output interface, every op
    int8), then tf2onnx. Returns (the .tflite file, the .onnx file)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    import tf2onnx

    def representative():
        for image in calibration[:256]:
            yield [image[None].astype(np.float32)]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    tflite_path = path.with_suffix(".tflite")
    path.parent.mkdir(parents=True, exist_ok=True)
    tflite_path.write_bytes(converter.convert())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tf2onnx.convert.from_tflite(str(tflite_path), opset=OPSET, output_path=str(path))
    return tflite_path, path


def onnx_accuracy(path: Path, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of an ONNX Fashion-MNIST model on uint8 images, in plain ONNX Runtime
    (a check during training; the study's reported accuracies come from the scoring run)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    x = images.astype(np.float32) / 255.0
    x = x[:, None] if spec.shape[1] == 1 else x[..., None]
    correct = 0
    for start in range(0, len(x), 1000):
        scores = session.run(None, {spec.name: x[start:start + 1000]})[0]
        correct += int(np.sum(scores.argmax(axis=1) == labels[start:start + 1000]))
    return correct / len(x)
