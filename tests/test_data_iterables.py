"""Any iterable of (images, labels) batches as data: a real torch DataLoader and a real
tf.data pipeline give the same Sp2PS as the same images read from an .npz file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sp2ps_onnx.data import open_data
from sp2ps_onnx.errors import InputDataError
from sp2ps_onnx.scoring import DataOptions, MetricOptions, RunOptions, score_models

MODELS = Path(__file__).resolve().parent.parent / "models"
ORIGINAL = MODELS / "fmnist_cnn.onnx"
PRUNED = [MODELS / "pruned" / "fmnist_cnn_mag80.onnx", MODELS / "keras" / "fmnist_keras_mag70.onnx"]
N = 40


@pytest.fixture(scope="module")
def samples() -> tuple[np.ndarray, np.ndarray]:
    archive = np.load(MODELS / "samples" / "fmnist_test.npz")
    return archive["x"][:N], archive["y"][:N].astype(np.int64)


@pytest.fixture(scope="module")
def from_file(samples, tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("npz") / "data.npz"
    np.savez(path, x=samples[0], y=samples[1])
    return _per_sample(score_models(
        ORIGINAL,
        PRUNED,
        path,
        data_options=DataOptions(preset="unit"),
        metric=MetricOptions(n_bootstrap=0),
    ))


def _per_sample(report) -> dict:
    return {m.info.name: ([r["h"] for r in m.rows], [r["target_pruned"] for r in m.rows],
                          m.sp2ps, m.result.accuracy_pruned) for m in report.models}


def _assert_same(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for name, (h, targets, sp2ps, accuracy) in expected.items():
        np.testing.assert_allclose(got[name][0], h, atol=1e-6)
        assert got[name][1] == targets
        assert got[name][2] == pytest.approx(sp2ps, abs=1e-6)
        assert got[name][3] == accuracy


def test_torch_dataloader_of_uint8_images(samples, from_file) -> None:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    x, y = samples
    loader = DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=7)
    calls = []
    report = score_models(
        ORIGINAL,
        PRUNED,
        loader,
        data_options=DataOptions(preset="unit"),
        metric=MetricOptions(n_bootstrap=0),
        run=RunOptions(batch_size=5, progress=lambda *a: calls.append(a)),
    )
    _assert_same(_per_sample(report), from_file)
    assert report.n == N and calls[-1] == (N, N)  # the DataLoader's dataset gives the total
    assert report.models[0].rows[8]["id"] == "DataLoader[8]"
    # A DataLoader is re-iterable: the same source can be read twice.
    source = open_data(loader)
    assert sum(len(b.ids) for b in source.batches(16)) == N
    assert sum(len(b.ids) for b in source.batches(16)) == N


def test_torch_dataloader_with_a_transform_gives_preprocessed_floats(samples, from_file) -> None:
    import torch
    from torch.utils.data import DataLoader, Dataset

    x, y = samples

    class ToUnitTensor(Dataset):  # what torchvision's ToTensor() does: CHW float in [0, 1]
        def __len__(self) -> int:
            return len(x)

        def __getitem__(self, i: int):
            return torch.from_numpy(x[i]).float().div(255).unsqueeze(0), int(y[i])

    loader = DataLoader(ToUnitTensor(), batch_size=16)
    report = score_models(ORIGINAL, PRUNED, loader, metric=MetricOptions(n_bootstrap=0))
    assert report.config["data_preprocessed"] is True
    # The NCHW float batches also feed the NHWC Keras model (transposed for it).
    _assert_same(_per_sample(report), from_file)


def test_tf_data_pipeline(samples, from_file) -> None:
    tf = pytest.importorskip("tensorflow")  # a test dependency in pyproject; never skipped in CI

    x, y = samples
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(9).prefetch(2)
    report = score_models(
        ORIGINAL,
        PRUNED,
        dataset.as_numpy_iterator(),
        data_options=DataOptions(preset="unit"),
        metric=MetricOptions(n_bootstrap=0),
    )
    _assert_same(_per_sample(report), from_file)


def test_generators_of_dicts_and_bare_arrays(samples) -> None:
    x, y = samples
    dicts = open_data(({"image": x[i : i + 8], "label": y[i : i + 8]} for i in range(0, N, 8)),
                      limit=20)
    batches = list(dicts.batches(6))
    assert [len(b.ids) for b in batches] == [6, 2, 6, 2, 4]
    np.testing.assert_array_equal(np.concatenate([b.labels for b in batches]), y[:20])
    np.testing.assert_array_equal(np.stack([i for b in batches for i in b.images]), x[:20])
    with pytest.raises(InputDataError, match="already read"):
        list(dicts.batches(6))
    bare = open_data(iter([x[:5], x[5:9]]))
    assert not bare.has_labels and bare.size_hint is None
    assert [len(b.ids) for b in bare.batches(32)] == [5, 4]


@pytest.mark.parametrize(
    ("batches", "message"),
    [
        (iter([]), "yielded no batches"),
        ([(np.zeros((2, 8, 8), np.uint8), np.zeros(2, np.int64)), np.zeros((2, 8, 8), np.uint8)],
         "batch 1 of list has no labels"),
        ([(np.zeros((2, 8, 8), np.uint8), np.zeros(3, np.int64))], "shape \\(2,\\)"),
        ([(np.zeros((2, 8, 8), np.uint8), np.array([0, -1]))], "negative"),
        ([(np.zeros((2, 8, 8), np.int32),)], "dtype int32"),
        ([{"pixels": np.zeros((2, 8, 8), np.uint8)}], "exactly one image key"),
        ([(np.zeros((2, 8, 8), np.uint8), np.zeros(2, np.int64), "extra")], "has 3 items"),
        ([np.zeros((2, 8, 8), np.uint8), np.zeros((2, 1, 8, 8), np.float32)], "uint8 images or"),
    ],
)
def test_bad_batches_are_one_clear_error(batches, message: str) -> None:
    with pytest.raises(InputDataError, match=message):
        source = open_data(batches)
        list(source.batches(4))
