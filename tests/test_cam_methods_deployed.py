"""FullGrad, Guided Backprop and Guided Grad-CAM on deployed models (issue 20): a Keras CNN
converted to TFLite (float and full-integer) and then to ONNX by tf2onnx, and ONNX Runtime's
QDQ quantization of torchvision resnet18.

Truths:

* TFLite float: TensorFlow's own gradients (``tf.GradientTape``) on the Keras model the
  TFLite file was converted from, computed here layer by layer: the input gradient, the
  gradient at every Conv2D / DepthwiseConv2D / BatchNormalization output times its bias
  (BatchNormalization's effective bias ``beta - gamma mean / sqrt(var + eps)``, which the TFLite
  converter folds into the Conv before it), and Guided Backprop with a guided ReLU written
  as a ``tf.custom_gradient``; FullGrad's maps then come from pytorch-grad-cam's own
  post-processing (``scale_accross_batch_and_channels``, ``scale_cam_image``). Same 1e-3 as
  against pytorch-grad-cam. The full-gradient decomposition (FullGrad's completeness
  property: for a piecewise-linear ReLU network without Dense biases, the logit equals
  ``<x, dz/dx> + sum_l <b_l, dz/da_l>``) is checked on the engine's own terms.
* Quantized models (TFLite int8 through tf2onnx, ONNX Runtime QDQ): the same method on the
  float model they were made from. Quantization moves every activation by up to half a step,
  so the maps cannot be equal. Guided Backprop and Guided Grad-CAM: the quantized map of each
  image must be much closer to the float map of the same image than the float maps of two
  different images are to each other (``QUANTIZED_DISTANCE_RATIO``), and the guided gradients
  keep their direction (cosine; another image's gradients are the control). FullGrad, whose
  per-channel min-max scaling blows quantization noise in a nearly flat channel up to full
  scale (its maps of different images are alike as well): every Conv's term ``b dz/da`` keeps
  its direction, the terms still decompose the quantized logit (FullGrad's completeness, to
  within the activations' rounding), and each quantized map is most like its own image's
  float map. Measured: see the constants and ``pytest -s``. The float side equals
  pytorch-grad-cam (resnet18, tests/test_cam_backward_methods.py) and TensorFlow (above).

The CLI path (``sp2ps cam model.tflite --method ...``, which converts the .tflite itself) is
compared with the TensorFlow truth as well.
"""

from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from pytorch_grad_cam.utils.image import scale_accross_batch_and_channels, scale_cam_image

from experiments.artifacts import keras_to_onnx_via_tflite, quantize_qdq
from references.photos import sample_photos
from sp2ps_onnx import CamModel, cam
from sp2ps_onnx.cli import cli
from tests.exports import export_torchvision

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SIZE = 64
TOLERANCE = 1e-3
#: Quantized vs float, measured on the two quantized models here (min or max over images):
#: guided gradient cosine >= 0.917; Guided Backprop / Guided Grad-CAM maps: the distance to
#: the same image's float map is <= 0.42 of the distance between two images' float maps.
QUANTIZED_GRADIENT_COSINE = 0.85
QUANTIZED_DISTANCE_RATIO = 0.6
#: FullGrad's terms b * dz/da per Conv, cosine quantized vs float: measured >= 0.70.
QUANTIZED_TERM_COSINE = 0.6
#: Largest difference / ratio per (model, method), printed by ``pytest -s``.
MEASURED: dict[tuple[str, str], float] = {}


@pytest.fixture(scope="module", autouse=True)
def _print_measured():
    yield
    for (model, method), value in sorted(MEASURED.items()):
        print(f"\n{model} {method}: {value:.3g}", end="")


def record(model: str, method: str, value: float, worst=max) -> float:
    key = (model, method)
    MEASURED[key] = worst(MEASURED.get(key, value), value)
    return value


# --- the Keras CNN and its TFLite conversions --------------------------------------------


def keras_layers() -> list:
    """A linear chain of Keras layers, activations as layers of their own so that the
    TensorFlow truth can tap every pre-activation output and swap every ReLU. The Dense
    layers have no bias: FullGrad (as pytorch-grad-cam) takes Conv and BatchNorm biases only,
    and without Dense biases its terms are the whole decomposition of the logit."""
    import tensorflow as tf

    layers = tf.keras.layers
    return [
        layers.Conv2D(16, 3, padding="same"),
        layers.ReLU(),
        layers.Conv2D(24, 3, strides=2, padding="same", use_bias=False),
        layers.BatchNormalization(),
        layers.ReLU(),
        layers.MaxPooling2D(2),
        layers.DepthwiseConv2D(3, padding="same"),
        layers.ReLU(),
        layers.Conv2D(32, 1, use_bias=False),
        layers.BatchNormalization(),
        layers.ReLU(),  # the default CAM layer's output
        layers.GlobalAveragePooling2D(),
        layers.Dense(16, use_bias=False),
        layers.ReLU(),
        layers.Dense(10, use_bias=False),
        layers.Softmax(),  # cut by the engine: the score is the logit
    ]


def build_keras_cnn(size: int):
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    chain = keras_layers()
    inputs = tf.keras.Input((size, size, 3))
    hidden = inputs
    for layer in chain:
        hidden = layer(hidden)
    model = tf.keras.Model(inputs, hidden)
    # Keras starts biases at 0 and BatchNorm at the identity: random values make every
    # FullGrad term count and the folding of BatchNorm into the Conv change real numbers.
    rng = np.random.default_rng(1)
    for layer in chain:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            channels = layer.gamma.shape[0]
            layer.set_weights([0.5 + rng.random(channels), 0.1 * rng.standard_normal(channels),
                               0.1 * rng.standard_normal(channels), 0.5 + rng.random(channels)])  # fmt: skip
        elif getattr(layer, "use_bias", False) and layer.bias is not None:
            layer.bias.assign(0.1 * rng.standard_normal(layer.bias.shape).astype(np.float32))
    return model, chain


@pytest.fixture(scope="module")
def keras_case(tmp_path_factory):
    """The Keras chain, its float and int8 TFLite conversions (ONNX paths), the photos
    (NHWC) and one class per image (the second best: not the easy top class)."""
    model, chain = build_keras_cnn(SIZE)
    x = sample_photos(SIZE, nchw=False)
    folder = tmp_path_factory.mktemp("tflite")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TFLite converter's notes on int8 statistics
        paths = {form: keras_to_onnx_via_tflite(model, x, form, folder / f"cnn-{form}.onnx")
                 for form in ("float", "int8")}  # fmt: skip
    logits = tf_forward(chain, x)[0].numpy()
    targets = logits.argsort(axis=1)[:, -2]
    return chain, paths, x, targets


# --- TensorFlow's truth ------------------------------------------------------------------


def _guided_relu(tensor):
    import tensorflow as tf

    @tf.custom_gradient
    def guided(inputs):
        def backward(upstream):
            return (
                upstream
                * tf.cast(inputs > 0, upstream.dtype)
                * tf.cast(upstream > 0, upstream.dtype)
            )

        return tf.nn.relu(inputs), backward

    return guided(tensor)


def tf_forward(chain, x, guided: bool = False):
    """Logits (the chain without its Softmax), the (bias, output) of every biased
    Conv/BatchNorm, and the default CAM layer's output."""
    import tensorflow as tf

    layers = tf.keras.layers
    hidden, taps, cam_layer = tf.convert_to_tensor(x), [], None
    previous = hidden
    for layer in chain[:-1]:
        if guided and isinstance(layer, layers.ReLU):
            hidden = _guided_relu(hidden)
        else:
            hidden = layer(hidden, training=False)
        if isinstance(layer, layers.BatchNormalization):
            gamma, beta, mean, var = (w.numpy() for w in layer.weights)
            taps.append((beta - gamma * mean / np.sqrt(var + layer.epsilon), hidden))
        elif isinstance(layer, (layers.Conv2D, layers.DepthwiseConv2D)) and layer.use_bias:
            taps.append((layer.bias.numpy(), hidden))
        if isinstance(layer, layers.GlobalAveragePooling2D):
            cam_layer = previous
        previous = hidden
    return hidden, taps, cam_layer


def _target_sum(logits, targets):
    import tensorflow as tf

    return tf.reduce_sum(tf.gather(logits, np.asarray(targets), axis=1, batch_dims=1))


def nchw(array) -> np.ndarray:
    return np.asarray(array, dtype=np.float64).transpose(0, 3, 1, 2)


def tf_fullgrad_terms(chain, x, targets):
    """``x * dz/dx`` and ``b_l * dz/da_l`` per layer, channels first (float64)."""
    import tensorflow as tf

    inputs = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        logits, taps, _ = tf_forward(chain, inputs)
        score = _target_sum(logits, targets)
    gradients = tape.gradient(score, [inputs] + [output for _, output in taps])
    input_term = nchw(x) * nchw(gradients[0])
    bias_terms = [nchw(g) * bias[None, :, None, None].astype(np.float64)
                  for (bias, _), g in zip(taps, gradients[1:], strict=True)]  # fmt: skip
    return input_term, bias_terms, logits.numpy()


def tf_fullgrad(chain, x, targets) -> np.ndarray:
    """FullGrad's map from TensorFlow's terms and pytorch-grad-cam's post-processing."""
    input_term, bias_terms, _ = tf_fullgrad_terms(chain, x, targets)
    size = (x.shape[2], x.shape[1])
    total = scale_accross_batch_and_channels(np.abs(input_term).astype(np.float32), size).sum(1)
    for term in bias_terms:
        total += scale_accross_batch_and_channels(np.abs(term).astype(np.float32), size).sum(1)
    return scale_cam_image(total)


def tf_guided(chain, x, targets) -> np.ndarray:
    """Guided Backprop input gradients, channels first."""
    import tensorflow as tf

    inputs = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        logits, _, _ = tf_forward(chain, inputs, guided=True)
        score = _target_sum(logits, targets)
    return nchw(tape.gradient(score, inputs))


def tf_gradcam_mask(chain, x, targets) -> np.ndarray:
    """Grad-CAM at the last feature map, pytorch-grad-cam's post-processing (input size)."""
    import tensorflow as tf

    inputs = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        logits, _, activations = tf_forward(chain, inputs)
        score = _target_sum(logits, targets)
    gradients = nchw(tape.gradient(score, activations))
    weighted = gradients.mean(axis=(2, 3))[:, :, None, None] * nchw(activations)
    return pgc_postprocess(weighted.sum(axis=1), (x.shape[2], x.shape[1]))


def pgc_postprocess(raw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """pytorch-grad-cam's BaseCAM post-processing of one layer's raw maps: ReLU, min-max,
    resize (``size`` as (W, H)), then ``aggregate_multi_layers``' ReLU and min-max."""
    return scale_cam_image(np.maximum(scale_cam_image(np.maximum(raw, 0), size), 0))


def relative_deviation(ours: np.ndarray, theirs: np.ndarray) -> float:
    scale = float(np.abs(theirs).max())
    assert scale > 0
    return float(np.abs(np.asarray(ours, np.float64) - theirs).max()) / scale


# --- TFLite float against TensorFlow ------------------------------------------------------


def test_fullgrad_on_tflite_matches_tensorflow(keras_case) -> None:
    chain, paths, x, targets = keras_case
    model = CamModel(str(paths["float"]))
    ours, used = model.cams(x, method="fullgrad", targets=targets)
    np.testing.assert_array_equal(used, targets)
    theirs = tf_fullgrad(chain, x, targets)
    assert theirs.max() > 0.99
    deviation = record("tflite-float", "fullgrad", float(np.abs(ours - theirs).max()))
    assert deviation <= TOLERANCE
    # Term by term: the folded Conv biases times the pre-ReLU gradients are TensorFlow's.
    sibling = model.with_backward(bias_gradients=True, input_gradient=True)
    run = sibling.run(x, targets)
    input_term, bias_terms, _ = tf_fullgrad_terms(chain, x, targets)
    ours_terms = [np.asarray(t) for t in run.bias_gradients.values()]
    assert len(ours_terms) == len(bias_terms) == 4
    for mine, truth in zip(ours_terms, bias_terms, strict=True):
        assert (
            record("tflite-float", "fullgrad bias terms", relative_deviation(mine, truth)) <= 1e-4
        )
    ours_input = nchw(x) * nchw(run.input_gradient)
    assert (
        record("tflite-float", "fullgrad input term", relative_deviation(ours_input, input_term))
        <= 1e-4
    )


def test_full_gradient_completeness_on_tflite(keras_case) -> None:
    """``z = <x, dz/dx> + sum_l <b_l, dz/da_l>``: the engine's terms decompose the logit."""
    chain, paths, x, targets = keras_case
    model = CamModel(str(paths["float"])).with_backward(bias_gradients=True, input_gradient=True)
    run = model.run(x, targets)
    total = (np.asarray(run.input_gradient, np.float64) * x).reshape(len(x), -1).sum(axis=1)
    for term in run.bias_gradients.values():
        total += np.asarray(term, np.float64).reshape(len(x), -1).sum(axis=1)
    logits = run.score[np.arange(len(x)), targets]
    np.testing.assert_allclose(total, logits, rtol=1e-4, atol=1e-6)


def test_guided_methods_on_tflite_match_tensorflow(keras_case) -> None:
    chain, paths, x, targets = keras_case
    model = CamModel(str(paths["float"]))
    guided = tf_guided(chain, x, targets)
    gradients, used = cam.guided_backprop(model, x, targets)
    np.testing.assert_array_equal(used, targets)
    assert gradients.shape == guided.shape  # channels first, whatever the model's layout
    assert (
        record("tflite-float", "guided gradients", relative_deviation(gradients, guided))
        <= TOLERANCE
    )
    saliency = np.abs(guided).max(axis=1)
    raw, _ = model.cams(x, method="guidedbackprop", targets=targets, raw=True)
    assert record("tflite-float", "guidedbackprop", relative_deviation(raw, saliency)) <= TOLERANCE
    recipe = np.abs(tf_gradcam_mask(chain, x, targets)[:, None] * guided).max(axis=1)
    raw, _ = model.cams(x, method="guidedgradcam", targets=targets, raw=True)
    assert record("tflite-float", "guidedgradcam", relative_deviation(raw, recipe)) <= TOLERANCE


@pytest.mark.parametrize("method", ["fullgrad", "guidedbackprop"])
def test_sp2ps_cam_on_the_tflite_file_matches_tensorflow(keras_case, method, tmp_path) -> None:
    """The CLI converts the .tflite itself; its maps and targets (the top class) are
    TensorFlow's."""
    chain, paths, x, _ = keras_case
    tflite = Path(paths["float"]).with_suffix(".tflite")
    np.save(tmp_path / "photos.npy", x)
    out = tmp_path / "out"
    arguments = ["cam", tflite, tmp_path / "photos.npy", "--method", method, "--preset", "unit"]
    result = CliRunner().invoke(cli, [str(a) for a in [*arguments, "--out", out, "-q"]])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "cams.csv").open()))
    targets = np.array([int(row["target"]) for row in rows])
    np.testing.assert_array_equal(targets, tf_forward(chain, x)[0].numpy().argmax(axis=1))
    maps = np.stack([np.load(out / f"{Path(row['file']).stem}.npy") for row in rows])
    if method == "fullgrad":
        theirs = tf_fullgrad(chain, x, targets)
    else:
        theirs = pgc_postprocess(np.abs(tf_guided(chain, x, targets)).max(axis=1), x.shape[1:3])
    assert record("tflite-float cli", method, float(np.abs(maps - theirs).max())) <= TOLERANCE


# --- quantized models against their float source -----------------------------------------


def distance_ratios(quantized: np.ndarray, floating: np.ndarray) -> np.ndarray:
    """Per image: ||q_i - f_i|| / min_{j != i} ||f_j - f_i||."""
    flat_q = quantized.reshape(len(quantized), -1).astype(np.float64)
    flat_f = floating.reshape(len(floating), -1).astype(np.float64)
    between = np.linalg.norm(flat_f[:, None] - flat_f[None], axis=2)
    np.fill_diagonal(between, np.inf)
    return np.linalg.norm(flat_q - flat_f, axis=1) / between.min(axis=1)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def resnet18_qdq(tmp_path_factory):
    path, _, _ = export_torchvision("resnet18", False)
    x = sample_photos(SIZE, nchw=True)
    folder = tmp_path_factory.mktemp("qdq")
    quantized = quantize_qdq(Path(path), folder / "resnet18-qdq.onnx", x)
    floating = CamModel(str(path))
    targets = floating.scores(x).argsort(axis=1)[:, -2]
    return floating, CamModel(str(quantized)), x, targets


def quantized_cases(keras_case, resnet18_qdq):
    chain, paths, x, targets = keras_case
    yield "tflite-int8", CamModel(str(paths["float"])), CamModel(str(paths["int8"])), x, targets
    yield "resnet18-qdq", *resnet18_qdq


def _matched_terms(floating: dict, quantized: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """The bias terms of the same Conv in both models, by node name (tf2onnx's int8 graph
    adds ``_prequant``; ONNX Runtime's QDQ graph may order parallel branches differently)."""
    by_name = {name.removesuffix("_prequant"): np.asarray(term) for name, term in quantized.items()}
    assert set(by_name) == set(floating)
    return [(np.asarray(term), by_name[name]) for name, term in floating.items()]


def _decomposition(run, x: np.ndarray) -> np.ndarray:
    total = (np.asarray(run.input_gradient, np.float64) * x).reshape(len(x), -1).sum(axis=1)
    for term in run.bias_gradients.values():
        total += np.asarray(term, np.float64).reshape(len(x), -1).sum(axis=1)
    return total


def test_quantized_fullgrad_follows_the_float_model(keras_case, resnet18_qdq) -> None:
    for name, floating, quantized, x, targets in quantized_cases(keras_case, resnet18_qdq):
        wanted = {"bias_gradients": True, "input_gradient": True}
        expected = floating.with_backward(**wanted).run(x, targets)
        run = quantized.with_backward(**wanted).run(x, targets)
        # Every Conv's term keeps its direction (measured >= 0.70, the first Conv, where the
        # straight-through gradient has crossed every quantized activation).
        for want, got in _matched_terms(expected.bias_gradients, run.bias_gradients):
            similarity = record(name, "fullgrad term cosine", float(cosines(got, want).min()), min)
            assert similarity >= QUANTIZED_TERM_COSINE
        # The terms still decompose the quantized logit, to within the rounding of the
        # activations (measured <= 2.1 %).
        logits = run.score[np.arange(len(x)), targets]
        error = np.abs(_decomposition(run, x) - logits) / np.abs(logits)
        assert record(name, "fullgrad decomposition error", float(error.max())) <= 0.05
        # Maps: each quantized map is most like its own image's float map (FullGrad's maps
        # of different images are alike: 0.91-0.97 on resnet18).
        ours, _ = quantized.cams(x, method="fullgrad", targets=targets)
        reference, _ = floating.cams(x, method="fullgrad", targets=targets)
        pearson = np.corrcoef(ours.reshape(len(x), -1), reference.reshape(len(x), -1))
        pearson = pearson[: len(x), len(x) :]
        np.testing.assert_array_equal(pearson.argmax(axis=1), np.arange(len(x)))
        assert record(name, "fullgrad map pearson", float(pearson.diagonal().min()), min) >= 0.8


@pytest.mark.parametrize("method", ["guidedbackprop", "guidedgradcam"])
def test_quantized_guided_maps_follow_the_float_model(keras_case, resnet18_qdq, method) -> None:
    for name, floating, quantized, x, targets in quantized_cases(keras_case, resnet18_qdq):
        expected, _ = floating.cams(x, method=method, targets=targets)
        ours, used = quantized.cams(x, method=method, targets=targets)
        np.testing.assert_array_equal(used, targets)
        ratio = record(
            name, f"{method} distance ratio", float(distance_ratios(ours, expected).max())
        )
        assert ratio <= QUANTIZED_DISTANCE_RATIO


def test_quantized_guided_gradients_keep_their_direction(keras_case, resnet18_qdq) -> None:
    for name, floating, quantized, x, targets in quantized_cases(keras_case, resnet18_qdq):
        expected, _ = cam.guided_backprop(floating, x, targets)
        ours, _ = cam.guided_backprop(quantized, x, targets)
        similarity = record(
            name, "guided gradient cosine", float(cosines(ours, expected).min()), min
        )
        assert similarity >= QUANTIZED_GRADIENT_COSINE
        # Control: another image's float gradients are nearly orthogonal (measured <= 0.1).
        assert cosines(ours, np.roll(expected, 1, axis=0)).max() < 0.3
