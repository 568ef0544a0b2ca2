"""The data of the worked examples: Fashion-MNIST from the Debian package
``dataset-fashion-mnist`` (:mod:`experiments.fmnist`), or the 300 bundled test samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from experiments.fmnist import DatasetMissing, load_split

ROOT = Path(__file__).resolve().parents[1]
ORIGINAL = ROOT / "models" / "fmnist_cnn.onnx"
BUNDLED = ROOT / "models" / "samples" / "fmnist_test.npz"


def split(name: str, n: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 images (N, 28, 28) and labels of the ``train`` or ``test`` split from
    ``offset`` on; the bundled samples stand in for both when the data set is missing."""
    try:
        x, y = load_split(name)
    except DatasetMissing:
        with np.load(BUNDLED) as archive:
            x, y = archive["x"], archive["y"]
        if name == "train":  # keep training images apart from the first (evaluation) ones
            offset += len(x) // 2
    return x[offset:offset + n], y[offset:offset + n]


def model_input(images: np.ndarray) -> np.ndarray:
    """The bundled CNN's input: [0, 1] floats, NCHW (the ``unit`` preset)."""
    return (images.astype(np.float32) / 255.0)[:, None]
