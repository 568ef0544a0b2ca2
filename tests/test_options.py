"""The typed options of a scoring run: a wrong value is refused when the options are made,
before any model is opened, and the same options from the CLI and the API give the same
numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from sp2ps_onnx import cam, metric
from sp2ps_onnx.cli import cli
from sp2ps_onnx.errors import InputDataError, Sp2PSError
from sp2ps_onnx.scoring import (
    CamOptions,
    DataOptions,
    MetricOptions,
    RayOptions,
    RunOptions,
    score_models,
)

MODELS = Path(__file__).resolve().parent.parent / "models"
ORIGINAL = MODELS / "fmnist_cnn.onnx"
PRUNED = MODELS / "pruned" / "fmnist_cnn_mag80.onnx"
DATA = MODELS / "samples" / "fmnist_test.npz"


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda: CamOptions(method="gradcam+++"), cam.METHODS),
        (lambda: CamOptions(target="labels"), ("label", "original", "self")),
        (lambda: DataOptions(preset="imagenette"), ("imagenet", "unit")),
        (lambda: MetricOptions(spatial="msssim"), tuple(metric.SPATIAL)),
        (lambda: MetricOptions(spectral="l2"), tuple(metric.SPECTRAL)),
        (lambda: MetricOptions(aggregation="median"), tuple(metric.AGGREGATIONS)),
    ],
)
def test_an_unknown_name_is_refused_with_the_valid_ones(make, named) -> None:
    with pytest.raises(Sp2PSError) as caught:
        make()
    for name in named:
        assert name in str(caught.value)


@pytest.mark.parametrize(
    "make",
    [
        lambda: RunOptions(batch_size=0),
        lambda: RunOptions(device="tpu"),
        lambda: RunOptions(resume=True),
        lambda: DataOptions(limit=0),
        lambda: MetricOptions(n_bootstrap=-1),
        lambda: MetricOptions(examples=-2),
        lambda: RayOptions(workers=0),
    ],
)
def test_an_impossible_value_is_refused(make) -> None:
    with pytest.raises(InputDataError):
        make()


def test_options_are_frozen_values() -> None:
    a = DataOptions(mean=[0.5, 0.5, 0.5], size=[28, 28], classes=["a", "b"])
    b = DataOptions(mean=(0.5, 0.5, 0.5), size=(28, 28), classes=("a", "b"))
    assert a == b and hash(a) == hash(b)
    with pytest.raises(AttributeError):
        a.preset = "unit"  # type: ignore[misc]
    assert CamOptions(allow_domains=["x.y"]).allow_domains == ("x.y",)


def test_cli_and_api_build_the_same_run(tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = CliRunner().invoke(cli, [
        "score", str(ORIGINAL), str(PRUNED), "--data", str(DATA), "--preset", "unit",
        "--limit", "40", "--batch-size", "16", "--method", "hirescam", "--target", "original",
        "--spatial", "pearson", "--bootstrap", "50", "--seed", "7", "--examples", "2",
        "--out", str(out), "-q",
    ])
    assert result.exit_code == 0, result.output
    from_cli = json.loads((out / "results.json").read_text())
    report = score_models(
        ORIGINAL, [PRUNED], DATA,
        cam=CamOptions(method="hirescam", target="original"),
        data_options=DataOptions(preset="unit", limit=40),
        metric=MetricOptions(spatial="pearson", n_bootstrap=50, seed=7, examples=2),
        run=RunOptions(batch_size=16),
    )
    from_api = json.loads(json.dumps(report.to_dict()))
    for key in ("method", "target", "spatial", "n_bootstrap", "seed", "batch_size", "limit"):
        assert from_cli["config"][key] == from_api["config"][key], key
    assert from_cli["models"][0]["result"] == from_api["models"][0]["result"]
