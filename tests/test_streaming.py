"""Data is read batch by batch: .npy and uncompressed .npz are memory-mapped, a compressed
.npz too large for memory gets a hint, and a run can start at any sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sp2ps_onnx import data as data_module
from sp2ps_onnx.data import open_data
from sp2ps_onnx.errors import InputDataError


def images(n: int = 10) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(n, 6, 5), dtype=np.uint8), np.arange(n) % 3


@pytest.mark.parametrize("save", [np.savez, np.save])
def test_uncompressed_arrays_are_memory_mapped(tmp_path: Path, save) -> None:
    x, y = images()
    path = tmp_path / ("x.npz" if save is np.savez else "x.npy")
    save(path, **({"x": x, "y": y} if save is np.savez else {"arr": x}))
    source = open_data(path)
    assert isinstance(source._parts[0].array, np.memmap)
    got = np.concatenate([np.stack(b.images) for b in source.batches(3)])
    assert np.array_equal(got, x)


def test_compressed_npz_too_large_for_memory_gets_a_hint(tmp_path: Path, monkeypatch) -> None:
    x, y = images()
    np.savez_compressed(tmp_path / "x.npz", x=x, y=y)
    assert np.array_equal(np.stack(next(open_data(tmp_path / "x.npz").batches(10)).images), x)
    monkeypatch.setattr(data_module, "_available_memory", lambda: 100)
    with pytest.raises(InputDataError, match=r"x\.npz.*compressed.*numpy\.save as an \.npy"):
        open_data(tmp_path / "x.npz")


@pytest.mark.parametrize("start", [0, 1, 4, 7, 10, 12])
def test_batches_from_any_start_are_the_tail_of_the_whole(tmp_path: Path, start: int) -> None:
    x, y = images()
    np.savez(tmp_path / "x.npz", x=x[:4], y=y[:4])
    folder = tmp_path / "folder"
    import imageio.v3 as iio

    for i in range(4, 10):
        (folder / f"c{y[i]}").mkdir(parents=True, exist_ok=True)
        iio.imwrite(folder / f"c{y[i]}" / f"{i}.png", x[i])
    source = open_data([tmp_path / "x.npz", folder])
    whole = [(i, lab) for b in source.batches(3) for i, lab in zip(b.ids, b.labels, strict=True)]
    tail = [(i, lab) for b in source.batches(3, start=start)
            for i, lab in zip(b.ids, b.labels, strict=True)]
    assert tail == whole[start:]
