"""Per-stage Sp2PS (``CamOptions(layers="stages")``, ``sp2ps score --layers stages``) and a
CAM averaged over several layers in a scoring run (``CamOptions(cam_layers=...)``).

The truth for every stage is an independent one-layer run: ``score_models`` with that stage's
layers named (``layer=`` for the original, ``pruned_layer=`` for the compared model). The last
stage is the default layer, so its Sp2PS is the plain run's, to the last bit. Earlier stages
come from one run of a graph with every stage as an output, which ONNX Runtime may fuse
otherwise than the one-layer graph: on resnet18 they agree within 1e-5, on the bundled CNN
to the bit.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper
from torch import nn

from sp2ps_onnx import CamModel
from sp2ps_onnx.cli import cli
from sp2ps_onnx.errors import InputDataError, ModelMismatchError
from sp2ps_onnx.graph import stage_layers
from sp2ps_onnx.scoring import (
    CamOptions,
    DataOptions,
    MetricOptions,
    ReferenceOptions,
    RunOptions,
    score_models,
)
from tests.exports import export_torchvision

MODELS = Path(__file__).resolve().parent.parent / "models"
ORIGINAL = MODELS / "fmnist_cnn.onnx"
PRUNED = [MODELS / "pruned" / "fmnist_cnn_mag80.onnx",
          MODELS / "pruned" / "fmnist_cnn_l1filter50.onnx"]
KERAS = MODELS / "keras" / "fmnist_keras.onnx"  # other layer names, the same stages
DATA = MODELS / "samples" / "fmnist_test.npz"
FMNIST = dict(data_options=DataOptions(preset="unit", limit=40),
              metric=MetricOptions(n_bootstrap=200, seed=3, examples=0),
              run=RunOptions(batch_size=16))


def _assert_same_score(stage, one, tolerance: float = 1e-9) -> None:
    """A stage's result against a one-layer run's: Sp2PS, CI and means."""
    assert stage.sp2ps == pytest.approx(one.sp2ps, abs=tolerance)
    assert stage.result.ci95 == pytest.approx(one.result.ci95, abs=tolerance)
    assert stage.result.mean_spatial == pytest.approx(one.result.mean_spatial, abs=tolerance)
    assert stage.result.n == one.result.n


@pytest.fixture(scope="module")
def fmnist_stages():
    references = ReferenceOptions(floor=True, models=(KERAS,))
    staged = score_models(ORIGINAL, PRUNED, DATA, cam=CamOptions(layers="stages"),
                          references=references, **FMNIST)
    plain = score_models(ORIGINAL, PRUNED, DATA, references=references, **FMNIST)
    return staged, plain


def test_bundled_models_last_stage_is_the_plain_score(fmnist_stages) -> None:
    staged, plain = fmnist_stages
    layers = stage_layers(str(ORIGINAL))
    assert [s["original_layer"] for s in staged.config["stages"]] == layers
    for model, alone in zip([*staged.models, *staged.references],
                            [*plain.models, *plain.references], strict=True):
        assert [s.resolution for s in model.stages] == [(28, 28), (14, 14), (7, 7)]
        last = model.stages[-1]
        # The main score is untouched by the stages, and the last stage is it exactly.
        assert model.sp2ps == alone.sp2ps
        assert last.sp2ps == alone.sp2ps
        assert last.result.ci95 == alone.result.ci95
    keras = next(m for m in staged.references if m.role == "reference")
    assert [s.layer for s in keras.stages] == stage_layers(str(KERAS))
    # Earlier stages say something else than the last one.
    assert len({round(s.sp2ps, 6) for s in staged.models[0].stages}) == 3


def test_bundled_models_every_stage_equals_a_one_layer_run(fmnist_stages) -> None:
    staged, _ = fmnist_stages
    keras = next(m for m in staged.references if m.role == "reference")
    for k, stage in enumerate(staged.models[0].stages[:-1]):
        # The pruned models and the floor share the original's tensor names.
        one = score_models(ORIGINAL, PRUNED, DATA,
                           cam=CamOptions(layer=stage.original_layer,
                                          pruned_layer=stage.original_layer), **FMNIST)
        for model, alone in zip(staged.models, one.models, strict=True):
            _assert_same_score(model.stages[k], alone)
        _assert_same_score(staged.floor.stages[k], one.floor)
        one = score_models(ORIGINAL, [KERAS], DATA,
                           cam=CamOptions(layer=stage.original_layer,
                                          pruned_layer=keras.stages[k].layer),
                           references=ReferenceOptions(floor=False), **FMNIST)
        _assert_same_score(keras.stages[k], one.models[0])


def test_report_has_the_per_stage_table(fmnist_stages, tmp_path: Path) -> None:
    from sp2ps_onnx.report import format_table, render_html, stage_table

    staged, plain = fmnist_stages
    table = stage_table(staged)
    assert table["headers"] == ["28x28", "14x14", "7x7"]
    assert [row["name"] for row in table["rows"]][-2:] == [m.info.name for m in staged.ranked()]
    assert stage_table(plain) is None
    markdown = format_table(staged, "markdown")
    assert "where pruning moved the attention" in markdown.lower()
    assert f"{staged.models[0].stages[0].sp2ps:.3f}" in markdown
    assert "Per stage" in render_html(staged)
    data = staged.to_dict()
    stages = data["models"][0]["stages"]
    assert [s["resolution"] for s in stages] == [[28, 28], [14, 14], [7, 7]]
    assert stages[-1]["sp2ps"] == data["models"][0]["result"]["sp2ps"]
    assert stages[0]["ci95"][0] <= stages[0]["sp2ps"] <= stages[0]["ci95"][1]
    assert json.loads(format_table(staged, "json"))["stages"].keys() >= {
        m.info.name for m in staged.models}


class OnePool(nn.Module):
    """A 28x28 classifier with one pooling: stages 28x28 and 14x14 only."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(4, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


def test_stages_that_do_not_match_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "one_pool.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(OnePool().eval(), torch.zeros(1, 1, 28, 28), str(path),
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}}, dynamo=False)
    with pytest.raises(ModelMismatchError, match=r"28x28, 14x14 and the original .* 7x7"):
        score_models(ORIGINAL, [path], DATA, cam=CamOptions(layers="stages"), **FMNIST)
    # One layer each, the same models score.
    score_models(ORIGINAL, [path], DATA, **FMNIST)


def test_options_refuse_what_per_stage_scoring_cannot_do() -> None:
    with pytest.raises(InputDataError, match="stages"):
        CamOptions(layers="stage")
    with pytest.raises(InputDataError, match="several layers"):
        CamOptions(method="scorecam", layers="stages")
    with pytest.raises(InputDataError, match="cam_layers"):
        CamOptions(layers="stages", cam_layers=("a", "b"))
    assert CamOptions(cam_layers="a").cam_layers == ("a",)


def test_cache_keeps_the_stages(tmp_path: Path) -> None:
    options = dict(FMNIST, run=RunOptions(batch_size=16, cache=tmp_path / "cache"))
    first = score_models(ORIGINAL, PRUNED[:1], DATA, cam=CamOptions(layers="stages"), **options)
    again = score_models(ORIGINAL, PRUNED[:1], DATA, cam=CamOptions(layers="stages"), **options)
    assert again.config["cache"]["hits"] > 0
    for a, b in zip(first.models[0].stages, again.models[0].stages, strict=True):
        assert a.sp2ps == b.sp2ps
    # A one-layer run with the same cache does not take the stage passes for its own.
    plain = score_models(ORIGINAL, PRUNED[:1], DATA, **options)
    assert not plain.models[0].stages
    assert plain.models[0].sp2ps == first.models[0].sp2ps


def _magnitude_pruned(path: str, out: Path, share: float = 0.5) -> str:
    """``path`` with the ``share`` smallest weights of every Conv set to zero."""
    model = onnx.load(path)
    weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    for init in model.graph.initializer:
        if init.name in weights:
            w = numpy_helper.to_array(init).copy()
            w[np.abs(w) < np.quantile(np.abs(w), share)] = 0
            init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(out))
    return str(out)


def test_resnet18_stages(tmp_path: Path) -> None:
    path, _, _ = export_torchvision("resnet18", False)
    pruned = _magnitude_pruned(str(path), tmp_path / "resnet18_mag50.onnx")
    rng = np.random.default_rng(0)
    data = tmp_path / "images.npz"
    np.savez(data, x=rng.integers(0, 256, (12, 64, 64, 3), dtype=np.uint8),
             y=rng.integers(0, 10, 12))
    options = dict(data_options=DataOptions(preset="imagenet"),
                   metric=MetricOptions(n_bootstrap=100, seed=1, examples=0),
                   run=RunOptions(batch_size=6), references=ReferenceOptions(floor=False))
    staged = score_models(str(path), [pruned], data, cam=CamOptions(layers="stages"), **options)
    plain = score_models(str(path), [pruned], data, **options)
    stages = staged.models[0].stages
    assert [s.resolution for s in stages] == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    assert stages[-1].sp2ps == plain.models[0].sp2ps
    assert stages[-1].result.ci95 == plain.models[0].result.ci95
    for stage in stages[1:-1]:
        one = score_models(str(path), [pruned], data,
                           cam=CamOptions(layer=stage.original_layer, pruned_layer=stage.layer),
                           **options)
        # ONNX Runtime fuses the graph with several outputs otherwise than the one-layer
        # graph: the activations differ in the last float32 bits, a sample's h by ~1e-6.
        _assert_same_score(stage, one.models[0], tolerance=1e-5)


def test_cli_score_layers_stages_and_cam_layers(tmp_path: Path) -> None:
    runner = CliRunner()
    common = ["score", str(ORIGINAL), str(PRUNED[0]), "--data", str(DATA), "--preset", "unit",
              "--limit", "24", "--bootstrap", "50", "--no-floor", "-q", "--format", "json"]
    result = runner.invoke(cli, [*common, "--layers", "stages", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "a" / "results.json").read_text())
    assert len(written["models"][0]["stages"]) == 3
    assert "Per stage" in (tmp_path / "a" / "report.html").read_text()

    layers = stage_layers(str(ORIGINAL))[1:]
    result = runner.invoke(cli, [*common, "--cam-layers", ",".join(layers),
                                 "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "b" / "results.json").read_text())
    assert written["config"]["cam_layers"] == layers
    # The score is that of the maps averaged over both layers.
    archive = np.load(DATA)
    x = archive["x"][:24, None].astype(np.float32) / 255
    y = archive["y"][:24]
    maps_o, _ = CamModel(str(ORIGINAL)).cams(x, targets=y, layers=layers)
    maps_p, _ = CamModel(str(PRUNED[0])).cams(x, targets=y, layers=layers)
    from sp2ps_onnx.metric import sp2ps_many

    (per,) = sp2ps_many(maps_o, [maps_p], "ssim", "tv", normalize=True)
    assert written["models"][0]["result"]["sp2ps"] == pytest.approx(float(np.mean(per.h)),
                                                                    abs=1e-9)


def test_cli_cam_with_cam_layers_writes_the_averaged_maps(tmp_path: Path) -> None:
    layers = stage_layers(str(ORIGINAL))
    result = CliRunner().invoke(cli, [
        "cam", str(ORIGINAL), str(DATA), "--preset", "unit", "--limit", "3", "-q",
        "--cam-layers", "stages", "--out", str(tmp_path / "cams")])
    assert result.exit_code == 0, result.output
    archive = np.load(DATA)
    x, y = archive["x"][:3, None].astype(np.float32) / 255, archive["y"][:3]
    expected, _ = CamModel(str(ORIGINAL)).cams(x, targets=y, layers=layers)
    with open(tmp_path / "cams" / "cams.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))  # in data order
    assert len(rows) == 3
    for row, want in zip(rows, expected, strict=True):
        got = np.load(tmp_path / "cams" / row["file"].replace(".png", ".npy"))
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_judge_gives_the_stages_of_score_models(fmnist_stages) -> None:
    from sp2ps_onnx.scoring import Sp2PSJudge

    staged, _ = fmnist_stages
    judge = Sp2PSJudge(ORIGINAL, DATA, cam=CamOptions(layers="stages"),
                       references=ReferenceOptions(floor=True, models=(KERAS,)), **FMNIST)
    scored = judge.score(PRUNED[0])
    want = staged.models[0].stages
    assert [s.sp2ps for s in scored.stages] == [s.sp2ps for s in want]
    assert [s.sp2ps for s in judge.references[0].stages] == [
        s.sp2ps for s in staged.references[0].stages]


def test_ray_gives_the_stages_of_a_local_run(fmnist_stages) -> None:
    import ray

    from sp2ps_onnx.scoring import RayOptions

    staged, _ = fmnist_stages
    try:
        remote = score_models(ORIGINAL, PRUNED, DATA, cam=CamOptions(layers="stages"),
                              references=ReferenceOptions(floor=True, models=(KERAS,)),
                              **dict(FMNIST, run=RunOptions(batch_size=16,
                                                            ray=RayOptions(workers=1))))
    finally:
        ray.shutdown()
    assert remote.config["backend"] == "ray"
    for mine, theirs in zip([*staged.models, *staged.references],
                            [*remote.models, *remote.references], strict=True):
        assert [s.sp2ps for s in theirs.stages] == pytest.approx(
            [s.sp2ps for s in mine.stages], abs=1e-12)


def test_per_sample_csv_has_every_stage_and_they_aggregate_to_the_stage_scores(
        fmnist_stages, tmp_path: Path) -> None:
    import csv

    from sp2ps_onnx.report import write_report

    staged, plain = fmnist_stages
    write_report(staged, tmp_path, formats=("png",))
    with open(tmp_path / "per_sample.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for model in [*staged.models, *staged.references]:
        mine = [r for r in rows if r["model"] == model.info.name]
        assert len(mine) == staged.n
        for stage in model.stages:
            k = stage.stage
            h = np.array([float(r[f"stage{k}_h"]) for r in mine if r[f"stage{k}_h"] != ""])
            spatial = np.array([float(r[f"stage{k}_spatial"]) for r in mine
                                if r[f"stage{k}_spatial"] != ""])
            # Mean aggregation: the stage's Sp2PS and mean s are the plain means of its column.
            assert h.size == stage.result.n
            assert h.mean() == pytest.approx(stage.sp2ps, abs=1e-6)
            assert spatial.mean() == pytest.approx(stage.result.mean_spatial, abs=1e-6)
        # The last stage is the main layer: its column is the h column.
        last = f"stage{len(model.stages) - 1}_h"
        assert [r[last] for r in mine] == [r["h"] for r in mine]
    assert not any(key.startswith("stage") for key in plain.models[0].rows[0])
