"""``eigen_smooth`` and ``aug_smooth`` through every layer that takes a method (issue 20):
``CamModel.cams``, ``CamOptions`` (checked when made), the scoring kernel behind ``sp2ps
score`` and the ``sp2ps cam`` command's ``--eigen-smooth`` / ``--aug-smooth``, each against
pytorch-grad-cam 1.5's own ``GradCAM(...)(x, eigen_smooth=..., aug_smooth=...)`` on the same
torch model (the tiny CNN of tests/test_cam.py, exported to ONNX and run by ONNX Runtime)."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from pytorch_grad_cam import GradCAM, ShapleyCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from sp2ps_onnx import CamModel
from sp2ps_onnx.cli import cli
from sp2ps_onnx.data import Batch
from sp2ps_onnx.errors import InputDataError
from sp2ps_onnx.scoring import CamOptions, DataOptions, MetricOptions
from sp2ps_onnx.scoring.batch import ScorerSpec, build_scorer
from tests.test_cam import tiny_setup
from tests.test_cam_backward_methods import export

TOLERANCE = 1e-3
OPTIONS = [
    {"eigen_smooth": True},
    {"aug_smooth": True},
    {"eigen_smooth": True, "aug_smooth": True},
]
IDS = ["eigen", "aug", "both"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    net, x, _ = tiny_setup(relu_before_tap=False, count=3, seed=6)
    path = export(net, x, tmp_path_factory.mktemp("smooth") / "tiny.onnx")
    with torch.no_grad():
        top = net(x).argmax(dim=1).numpy()
    return net, x, top, path


def reference(net, x: torch.Tensor, targets, method=GradCAM, **options) -> np.ndarray:
    explainer = method(net, target_layers=[net.tap])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return explainer(x, targets=[ClassifierOutputTarget(int(t)) for t in targets], **options)
    finally:
        explainer.activations_and_grads.release()


def assert_close(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() < TOLERANCE


@pytest.mark.parametrize("options", OPTIONS, ids=IDS)
def test_cams_takes_the_options(tiny, options) -> None:
    net, x, top, path = tiny
    model = CamModel(path)
    ours, used = model.cams(x.numpy(), method="gradcam", **options)
    np.testing.assert_array_equal(used, top)
    theirs = reference(net, x, top, **options)
    assert_close(ours, theirs)
    # The option changes the map: the test would see it ignored.
    assert np.abs(reference(net, x, top) - theirs).max() > 10 * TOLERANCE


def test_cams_with_shapleycam_and_both_options(tiny) -> None:
    net, x, top, path = tiny
    ours, _ = CamModel(path).cams(x.numpy(), "shapleycam", eigen_smooth=True, aug_smooth=True)
    assert_close(ours, reference(net, x, top, ShapleyCAM, eigen_smooth=True, aug_smooth=True))


@pytest.mark.parametrize("options", OPTIONS, ids=IDS)
def test_the_scoring_kernel_uses_the_options(tiny, options) -> None:
    """What ``sp2ps score`` computes per batch (the local and the Ray backend alike)."""
    net, x, top, path = tiny
    spec = ScorerSpec(cam=CamOptions(method="gradcam", **options),
                      data=DataOptions(preset="unit"), metric=MetricOptions(),
                      mode="original", batch_size=8)  # fmt: skip
    scorer = build_scorer(path, [path], ["original", "pruned"], spec)
    outputs = scorer.run_models(scorer.prepare(Batch(x.numpy(), None, ["a", "b", "c"]),
                                               np.arange(3)))  # fmt: skip
    theirs = reference(net, x, top, **options)
    for maps, targets, _ in (outputs.original, *outputs.pruned):
        np.testing.assert_array_equal(targets, top)
        assert_close(maps, theirs)


@pytest.mark.parametrize("flags", [["--eigen-smooth"], ["--aug-smooth"]], ids=["eigen", "aug"])
def test_the_cam_command_takes_the_flags(tiny, flags, tmp_path) -> None:
    net, x, top, path = tiny
    np.save(tmp_path / "images.npy", x.numpy())  # float: the model input as it is
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli, ["cam", path, str(tmp_path / "images.npy"), "--method", "gradcam", *flags,
              "--out", str(out), "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with open(out / "cams.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    maps = np.stack([np.load(out / Path(row["file"]).with_suffix(".npy")) for row in rows])
    np.testing.assert_array_equal([int(row["target"]) for row in rows], top)
    options = {flag.strip("-").replace("-", "_"): True for flag in flags}
    assert_close(maps, reference(net, x, top, **options))


def test_options_are_refused_where_pytorch_grad_cam_has_none(tiny, tmp_path) -> None:
    with pytest.raises(InputDataError, match="eigen_smooth does not apply to CAM method 'fem'"):
        CamOptions(method="fem", eigen_smooth=True)
    with pytest.raises(InputDataError, match="aug_smooth does not apply to CAM method 'dff'"):
        CamOptions(method="dff", aug_smooth=True)
    _, x, _, path = tiny
    with pytest.raises(InputDataError, match="'guidedbackprop'.*--aug-smooth"):
        CamModel(path).cams(x.numpy(), "guidedbackprop", aug_smooth=True)
    np.save(tmp_path / "images.npy", x.numpy())
    result = CliRunner().invoke(
        cli, ["cam", path, str(tmp_path / "images.npy"), "--method", "eigencam",
              "--eigen-smooth", "--out", str(tmp_path / "out")],
    )  # fmt: skip
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sp2ps: error: eigen_smooth does not apply")
    assert "--eigen-smooth" in lines[0] and not (tmp_path / "out").exists()
