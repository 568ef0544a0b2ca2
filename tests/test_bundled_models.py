"""Checks of the bundled Fashion-MNIST models in models/ against the artifacts themselves.

metrics.json is produced by models/build.py; here every claim in it is re-derived from the ONNX
files and the committed test sample with onnx / onnxruntime / numpy only.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import imageio.v3 as imageio
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
SAMPLES_DIR = MODELS_DIR / "samples"
ORIGINAL = "fmnist_cnn.onnx"
KERAS_ORIGINAL = "keras/fmnist_keras.onnx"
EXPECTED_MODELS = (
    ORIGINAL,
    "pruned/fmnist_cnn_mag50.onnx",
    "pruned/fmnist_cnn_mag80.onnx",
    "pruned/fmnist_cnn_mag95.onnx",
    "pruned/fmnist_cnn_l1filter25.onnx",
    "pruned/fmnist_cnn_l1filter50.onnx",
    KERAS_ORIGINAL,
    "keras/fmnist_keras_mag70.onnx",
)
MAGNITUDE_MODELS = [name for name in EXPECTED_MODELS if re.search(r"_mag\d+\.onnx$", name)]
FILTER_MODELS = [name for name in EXPECTED_MODELS if "l1filter" in name]
ACCURACY_TOLERANCE = 0.08


@pytest.fixture(scope="module")
def metrics() -> dict:
    return json.loads((MODELS_DIR / "metrics.json").read_text())


@pytest.fixture(scope="module")
def samples() -> tuple[np.ndarray, np.ndarray]:
    with np.load(SAMPLES_DIR / "fmnist_test.npz") as archive:
        return archive["x"], archive["y"]


def load(relative: str) -> onnx.ModelProto:
    return onnx.load(str(MODELS_DIR / relative))


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def layer_weights(model: onnx.ModelProto) -> list[np.ndarray]:
    """Weight tensors of every Conv / Gemm / MatMul node, in graph order."""
    constants = initializers(model)
    weights = []
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            weights.extend(constants[name] for name in node.input[:2] if name in constants)
    return weights


def conv_output_channels(model: onnx.ModelProto) -> list[int]:
    constants = initializers(model)
    return [constants[node.input[1]].shape[0] for node in model.graph.node if node.op_type == "Conv"]


def float_param_count(model: onnx.ModelProto) -> int:
    return sum(a.size for a in initializers(model).values() if np.issubdtype(a.dtype, np.floating))


def predict(relative: str, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(MODELS_DIR / relative), providers=["CPUExecutionProvider"])
    (model_input,) = session.get_inputs()
    x = images.astype(np.float32) / 255.0
    x = x[:, None] if model_input.shape[1] == 1 else x[..., None]
    return session.run(None, {model_input.name: x})[0]


def test_metrics_lists_every_bundled_model(metrics: dict) -> None:
    assert sorted(metrics["models"]) == sorted(EXPECTED_MODELS)
    on_disk = {p.relative_to(MODELS_DIR).as_posix() for p in MODELS_DIR.rglob("*.onnx")}
    assert on_disk == set(EXPECTED_MODELS)


@pytest.mark.parametrize("relative", EXPECTED_MODELS)
def test_model_is_valid_and_described_by_metrics(relative: str, metrics: dict) -> None:
    path = MODELS_DIR / relative
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    entry = metrics["models"][relative]
    assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert entry["size_bytes"] == path.stat().st_size
    assert entry["params"] == float_param_count(model)
    weights = layer_weights(model)
    assert entry["weights_total"] == sum(w.size for w in weights)
    zeros = sum(int(np.count_nonzero(w == 0)) for w in weights)
    assert entry["weights_zero"] == zeros
    assert entry["sparsity"] == pytest.approx(zeros / sum(w.size for w in weights), abs=1e-6)


@pytest.mark.parametrize("relative", EXPECTED_MODELS)
def test_model_interface_has_dynamic_batch(relative: str) -> None:
    session = ort.InferenceSession(str(MODELS_DIR / relative), providers=["CPUExecutionProvider"])
    (model_input,) = session.get_inputs()
    (model_output,) = session.get_outputs()
    assert model_input.name == "input"
    keras_model = relative.startswith("keras/")
    assert model_output.name == ("probs" if keras_model else "logits")
    assert model_input.shape[1:] == ([28, 28, 1] if keras_model else [1, 28, 28])
    assert not isinstance(model_input.shape[0], int)
    for batch in (1, 5):
        shape = (batch, 28, 28, 1) if keras_model else (batch, 1, 28, 28)
        x = np.random.default_rng(batch).random(shape, dtype=np.float32)
        (scores,) = session.run(None, {"input": x})
        assert scores.shape == (batch, 10)
        if keras_model:
            np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("relative", MAGNITUDE_MODELS)
def test_magnitude_pruned_sparsity_matches_name(relative: str, metrics: dict) -> None:
    claimed = int(re.search(r"_mag(\d+)\.onnx$", relative).group(1)) / 100.0
    weights = layer_weights(load(relative))
    zeros = sum(int(np.count_nonzero(w == 0)) for w in weights)
    assert zeros / sum(w.size for w in weights) == pytest.approx(claimed, abs=0.005)
    original = KERAS_ORIGINAL if relative.startswith("keras/") else ORIGINAL
    assert metrics["models"][original]["sparsity"] < 0.01
    # Unstructured pruning keeps the architecture: same tensor shapes as the original.
    original_shapes = [w.shape for w in layer_weights(load(original))]
    assert [w.shape for w in weights] == original_shapes


@pytest.mark.parametrize("relative", FILTER_MODELS)
def test_filter_pruned_models_really_lose_channels(relative: str) -> None:
    removed = int(re.search(r"l1filter(\d+)\.onnx$", relative).group(1)) / 100.0
    original, pruned = load(ORIGINAL), load(relative)
    original_channels = conv_output_channels(original)
    pruned_channels = conv_output_channels(pruned)
    assert len(pruned_channels) == len(original_channels)
    for before, after in zip(original_channels, pruned_channels, strict=True):
        assert after == before - round(before * removed)
    assert float_param_count(pruned) < float_param_count(original) * (1 - removed) + 1000
    weights = layer_weights(pruned)
    # The classifier (Gemm, transB=1) reads exactly the channels the last conv still produces.
    assert weights[-1].shape == (10, pruned_channels[-1])
    assert sum(int(np.count_nonzero(w == 0)) for w in weights) / sum(w.size for w in weights) < 0.01


@pytest.mark.parametrize("relative", EXPECTED_MODELS)
def test_sample_accuracy_agrees_with_full_test_accuracy(
    relative: str, metrics: dict, samples: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = samples
    accuracy = float(np.mean(np.argmax(predict(relative, images), axis=1) == labels))
    entry = metrics["models"][relative]
    assert entry["sample_accuracy"] == pytest.approx(accuracy, abs=1e-4)  # stored to 4 dp
    assert abs(accuracy - entry["test_accuracy"]) <= ACCURACY_TOLERANCE
    if relative in (ORIGINAL, KERAS_ORIGINAL):
        assert accuracy >= 0.85


def test_pruning_ranks_as_expected(metrics: dict) -> None:
    accuracy = {name: entry["test_accuracy"] for name, entry in metrics["models"].items()}
    # Without fine-tuning, 95% global pruning must hurt clearly more than 50% with fine-tuning.
    assert accuracy["pruned/fmnist_cnn_mag95.onnx"] < accuracy["pruned/fmnist_cnn_mag50.onnx"] - 0.05
    assert accuracy["pruned/fmnist_cnn_mag50.onnx"] >= accuracy[ORIGINAL] - 0.03


def test_sample_set_is_stratified(samples: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = samples
    assert images.dtype == np.uint8 and images.shape == (300, 28, 28)
    assert labels.dtype == np.int64 and labels.shape == (300,)
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, 30))
    classes = (SAMPLES_DIR / "classes.txt").read_text().split()
    assert len(classes) == 10 and len(set(classes)) == 10
    assert all(re.fullmatch(r"[A-Za-z_-]+", name) for name in classes)


def test_png_folder_matches_npz_pixels(samples: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = samples
    classes = (SAMPLES_DIR / "classes.txt").read_text().split()
    pngs = sorted((SAMPLES_DIR / "fmnist_png").glob("*/*.png"))
    assert len(pngs) == 100
    seen = set()
    for png in pngs:
        position = int(png.stem)
        seen.add(position)
        assert png.parent.name == classes[labels[position]]
        pixels = imageio.imread(png)
        assert pixels.dtype == np.uint8
        np.testing.assert_array_equal(pixels, images[position])
    assert seen == set(range(100))
