"""Fashion-MNIST from the original IDX files (Debian package ``dataset-fashion-mnist``).

The one IDX reader of the repository: the study, ``models/build.py`` and the benchmarks all
read the data set through :func:`load` or :func:`load_split`.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
#: The class names as folder names ("T-shirt/top" -> "T-shirt_top"), for image folders.
FOLDER_NAMES = tuple(name.replace("/", "_").replace(" ", "_") for name in CLASS_NAMES)


class DatasetMissing(RuntimeError):
    """The Fashion-MNIST files are not where they should be, or are not IDX files."""


def _idx_file(folder: Path, stem: str) -> Path:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    raise DatasetMissing(
        f"Fashion-MNIST file {stem}[.gz] not found in {folder}; install it with "
        "'apt-get install dataset-fashion-mnist' or set FMNIST_DIR to the folder of the IDX files"
    )


def read_idx(path: Path) -> np.ndarray:
    """An unsigned-byte IDX array: magic 0 0 0x08 ndim, big-endian dims, then the data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[:2] != b"\x00\x00":
        raise DatasetMissing(f"{path} is not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise DatasetMissing(f"{path}: expected unsigned-byte IDX data (code 0x08), "
                             f"got {raw[2]:#x}")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DatasetMissing(f"{path}: the header says {dims} but the file holds "
                             f"{data.size} bytes of data")
    return data.reshape(dims).copy()


def load_split(
    split: str, folder: str | os.PathLike[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of ``split`` ("train" or "test")."""
    root = Path(folder or os.environ.get("FMNIST_DIR", DEFAULT_DIR))
    prefix = {"train": "train", "test": "t10k"}[split]
    images = read_idx(_idx_file(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_idx_file(root, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise DatasetMissing(f"unexpected Fashion-MNIST {split} shapes in {root}: images "
                             f"{images.shape}, labels {labels.shape}")
    return images, labels


def load(folder: str | os.PathLike[str] | None = None) -> dict[str, np.ndarray]:
    """``x_train`` (60000, 28, 28) uint8, ``y_train`` int64, ``x_test``, ``y_test``."""
    data = {}
    for split in ("train", "test"):
        data[f"x_{split}"], data[f"y_{split}"] = load_split(split, folder)
    return data


def subset(data: dict[str, np.ndarray], train: int | None, test: int | None,
           seed: int) -> dict[str, np.ndarray]:
    """A class-mixed random subset (the full split when the count is None)."""
    rng = np.random.default_rng(seed)
    out = dict(data)
    for split, count in (("train", train), ("test", test)):
        if count is not None and count < len(data[f"y_{split}"]):
            index = np.sort(rng.choice(len(data[f"y_{split}"]), size=count, replace=False))
            out[f"x_{split}"] = data[f"x_{split}"][index]
            out[f"y_{split}"] = data[f"y_{split}"][index]
    return out
