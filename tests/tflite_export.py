"""Keras model -> TFLite (float, dynamic-range, int8, int8 with int8 I/O) -> ONNX via tf2onnx:
the deployment artifacts of a TensorFlow Lite toolchain, shared by the tests and
benchmarks/bench_zoo.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

TFLITE_FORMS = ("float", "dynamic", "int8", "int8io")


def keras_to_onnx_via_tflite(model, x: np.ndarray, form: str, target: Path) -> Path:
    """Convert ``model`` to TFLite in ``form`` (``x``: representative NHWC inputs for the
    int8 forms), keep the .tflite beside ``target`` and write its tf2onnx conversion there."""
    import tensorflow as tf
    import tf2onnx

    if form not in TFLITE_FORMS:
        raise ValueError(f"unknown TFLite form {form!r}; choose one of {TFLITE_FORMS}")
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if form != "float":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if form.startswith("int8"):
        converter.representative_dataset = lambda: ([x[i : i + 1]] for i in range(len(x)))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if form == "int8io":
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    tflite = target.with_suffix(".tflite")
    tflite.write_bytes(converter.convert())
    proto, _ = tf2onnx.convert.from_tflite(str(tflite), opset=17)
    onnx.save(proto, target)
    return target
