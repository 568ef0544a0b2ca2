"""Derive Keras and TFLite files of the bundled Keras CNN from its ONNX exports.

    .venv/bin/python -m models.build_framework_files

Writes ``models/frameworks/fmnist_keras.keras`` (the original) and
``models/frameworks/fmnist_keras_mag70.tflite`` (its 70 % magnitude-pruned version), so that
``sp2ps score`` can be shown on framework files. tf2onnx folded each BatchNormalization into
its Conv, so the Keras twin is Conv2D (with bias) -> ReLU; its weights are read from the ONNX
initializers, and its outputs are checked against ONNX Runtime on the bundled test images.
Needs tensorflow-cpu and onnxruntime (the ``tf`` and ``test`` extras).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from experiments.artifacts import keras_to_tflite
from models.build import POOL_AFTER, WIDTHS

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

MODELS = Path(__file__).resolve().parent
OUT = MODELS / "frameworks"


def keras_twin(onnx_path: Path):
    import keras
    import onnx
    from keras import layers
    from onnx import numpy_helper

    weights = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(onnx_path)).graph.initializer}
    inputs = keras.Input((28, 28, 1), name="input")
    x = inputs
    convs = []
    for index, width in enumerate(WIDTHS):
        conv = layers.Conv2D(width, 3, padding="same", name=f"conv{index}")
        convs.append(conv)
        x = layers.ReLU(name=f"relu{index}")(conv(x))
        if index in POOL_AFTER:
            x = layers.MaxPooling2D(name=f"pool{index}")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    dense = layers.Dense(10, name="logits")
    outputs = layers.Softmax(name="probs")(dense(x))
    model = keras.Model(inputs, outputs, name=onnx_path.stem)
    for index, conv in enumerate(convs):
        kernel = next(v for k, v in weights.items() if f"conv{index}_1/convolution" in k)
        bias = next(v for k, v in weights.items() if f"bn{index}_1/batchnorm/sub" in k)
        conv.set_weights([kernel.transpose(2, 3, 1, 0), bias])  # OIHW -> HWIO
    dense.set_weights([next(v for k, v in weights.items() if "logits_1/Cast" in k),
                       next(v for k, v in weights.items() if "logits_1/BiasAdd" in k)])
    return model


def check(model_output: np.ndarray, onnx_path: Path, x: np.ndarray) -> None:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(model_output, expected, rtol=1e-4, atol=1e-5)


def main() -> None:
    import tensorflow as tf

    OUT.mkdir(exist_ok=True)
    x = (np.load(MODELS / "samples" / "fmnist_test.npz")["x"][:64, :, :, None] / 255.0)
    x = x.astype(np.float32)
    original = keras_twin(MODELS / "keras" / "fmnist_keras.onnx")
    check(original.predict(x, verbose=0), MODELS / "keras" / "fmnist_keras.onnx", x)
    original.save(OUT / "fmnist_keras.keras")
    print(f"wrote {OUT / 'fmnist_keras.keras'}")

    pruned = keras_twin(MODELS / "keras" / "fmnist_keras_mag70.onnx")
    path = OUT / "fmnist_keras_mag70.tflite"
    path.write_bytes(keras_to_tflite(pruned, "float"))
    interpreter = tf.lite.Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    outputs = []
    for image in x:  # the TFLite file has a fixed batch of 1
        interpreter.set_tensor(inp["index"], image[None])
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(out["index"])[0])
    check(np.stack(outputs), MODELS / "keras" / "fmnist_keras_mag70.onnx", x)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
