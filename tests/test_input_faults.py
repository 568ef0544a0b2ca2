"""Bad inputs a new user lets through (docs/reliability.md): NaN/Inf in an input sample is a
data fault like a corrupt image; a --classes path with a typo and a class list of the wrong
length are errors that name what is wrong."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from sp2ps_onnx import InputDataError
from sp2ps_onnx.cli import cli
from sp2ps_onnx.data import open_data
from sp2ps_onnx.scoring import DataOptions, MetricOptions, RunOptions, score_models
from tests.tiny_models import cnn

SIZE = 16
CLASSES = 4
BAD = {2: np.inf, 5: np.nan, 8: -np.inf}  # sample index -> the value planted in it


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def make_files(root: Path) -> dict:
    """Two tiny models, float inputs with NaN/Inf planted in samples BAD (bad.npz) and the
    same inputs without those samples (clean.npz)."""
    onnx.save(cnn(SIZE), str(root / "original.onnx"))
    onnx.save(cnn(SIZE, seed=1), str(root / "pruned.onnx"))
    rng = np.random.default_rng(3)
    x = rng.normal(size=(12, 1, SIZE, SIZE)).astype(np.float32)
    y = rng.integers(0, CLASSES, len(x))
    bad = x.copy()
    for i, value in BAD.items():
        bad[i, 0, i % SIZE, 3] = value
    keep = [i for i in range(len(x)) if i not in BAD]
    np.savez(root / "bad.npz", x=bad, y=y)
    np.savez(root / "clean.npz", x=x[keep], y=y[keep])
    return {"root": root, "original": root / "original.onnx", "pruned": root / "pruned.onnx",
            "bad": root / "bad.npz", "clean": root / "clean.npz", "x": bad, "y": y}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_files(tmp_path_factory.mktemp("input_faults"))


def score(setup: dict, data, **data_options):
    return score_models(setup["original"], [setup["pruned"]], data,
                        data_options=DataOptions(**data_options),
                        metric=MetricOptions(n_bootstrap=50, examples=2),
                        run=RunOptions(batch_size=4))


def test_nonfinite_samples_are_skipped_listed_and_change_nothing_else(setup) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no NumPy RuntimeWarning may leak
        report = score(setup, setup["bad"])
    assert [f["id"] for f in report.faults] == [f"bad.npz[{i}]" for i in sorted(BAD)]
    for fault in report.faults:
        assert fault["id"] in fault["reason"] and str(setup["bad"]) in fault["reason"]
    assert "1 NaN" in report.faults[1]["reason"]
    assert "1 infinite" in report.faults[0]["reason"]
    # The same numbers as the data that never held the bad samples.
    clean = score(setup, setup["clean"])
    assert report.n == clean.n == 12 - len(BAD)
    ours, theirs = report.models[0], clean.models[0]
    assert ours.sp2ps == theirs.sp2ps
    assert [r["h"] for r in ours.rows] == [r["h"] for r in theirs.rows]
    assert [r["id"] for r in ours.rows] == [f"bad.npz[{i}]" for i in range(12) if i not in BAD]
    assert report.model_faults.get("total", 0) == 0


def test_nonfinite_samples_with_strict_are_an_error_naming_the_sample(setup, tmp_path) -> None:
    with pytest.raises(InputDataError, match=r"bad\.npz\[2\].*infinite"):
        score(setup, setup["bad"], strict=True)
    result = invoke("score", setup["original"], setup["pruned"], "--data", setup["bad"],
                    "--strict", "--out", tmp_path / "r")
    assert result.exit_code == 2
    assert result.stderr.startswith("sp2ps: error: input sample bad.npz[2] of ")
    assert not (tmp_path / "r").exists()


def test_nonfinite_samples_of_npy_files_and_iterables_are_faults(setup, tmp_path) -> None:
    x, y = setup["x"], setup["y"]
    big = x.astype(np.float64)
    big[10, 0, 0, 0] = 1e39  # finite as float64, infinite as the model's float32
    np.save(tmp_path / "inputs.npy", big)
    iterable = [(x[i:i + 5], y[i:i + 5]) for i in range(0, len(x), 5)]
    for data, name, bad in ((tmp_path / "inputs.npy", "inputs.npy", {**BAD, 10: 0}),
                            (iterable, "list", BAD)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            source = open_data(data)
            ids = [i for batch in source.batches(4) for i in batch.ids]
        assert ids == [f"{name}[{i}]" for i in range(len(x)) if i not in bad]
        assert [f.id for f in source.faults] == [f"{name}[{i}]" for i in sorted(bad)]
        with pytest.raises(InputDataError, match=rf"{name}\[2\]"):
            list(open_data(data, strict=True).batches(4))


def test_a_float_image_file_with_nan_pixels_is_a_named_fault(tmp_path) -> None:
    folder = tmp_path / "flat"
    folder.mkdir()
    iio.imwrite(folder / "good.tif", np.full((SIZE, SIZE), 0.5, dtype=np.float32))
    iio.imwrite(folder / "nan.tif", np.full((SIZE, SIZE), np.nan, dtype=np.float32))
    source = open_data(folder)
    assert [i for batch in source.batches(4) for i in batch.ids] == ["good.tif"]
    assert [f.id for f in source.faults] == ["nan.tif"]
    assert "NaN or infinite" in source.faults[0].reason


@pytest.mark.parametrize("value, what", [
    ("{root}/typo-classes.txt", "does not exist"),
    ("labels.json", "does not exist"),
    ("{root}", "is a folder"),
])
def test_classes_that_look_like_a_missing_path_are_an_error(setup, tmp_path, value, what):
    value = value.format(root=tmp_path)
    with pytest.raises(InputDataError, match=what) as caught:
        open_data(setup["bad"], classes=value)
    assert f"--classes {value} " in str(caught.value)
    result = invoke("score", setup["original"], setup["pruned"], "--data", setup["bad"],
                    "--classes", value, "--out", tmp_path / "r")
    assert result.exit_code == 2 and value in result.stderr and what in result.stderr


def test_class_names_that_are_not_paths_are_still_names(setup, tmp_path) -> None:
    (tmp_path / "names.txt").write_text("w\nx\ny\nz\n")
    for value, names in (("a,b,c,d", ["a", "b", "c", "d"]), ("cat", ["cat"]),
                         (str(tmp_path / "names.txt"), ["w", "x", "y", "z"]),
                         (tmp_path / "names.txt", ["w", "x", "y", "z"])):
        assert open_data(setup["bad"], classes=value).class_names == names


def test_a_class_list_of_the_wrong_length_is_an_error_unless_partial(setup, tmp_path) -> None:
    with pytest.raises(InputDataError, match="--classes names 2 class.*model has 4 classes"):
        score(setup, setup["clean"], classes="a,b")
    partial = score(setup, setup["clean"], classes="a,b,c,d,e", classes_partial=True)
    assert partial.class_names == ["a", "b", "c", "d", "e"]
    assert partial.models[0].sp2ps == score(setup, setup["clean"]).models[0].sp2ps
    # Class folders count as a class list too: 2 folders for a 4-class model.
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (tmp_path / "folders" / name).mkdir(parents=True)
        iio.imwrite(tmp_path / "folders" / name / "0.png",
                    rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8))
    common = ["score", setup["original"], setup["pruned"], "--data", tmp_path / "folders",
              "--preset", "unit", "--bootstrap", 0, "--no-report", "--format", "json"]
    result = invoke(*common)
    assert result.exit_code == 2
    assert "2 class folder(s) (cat, dog) but the model has 4 classes" in result.stderr
    result = invoke(*common, "--classes-partial", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n"] == 2

