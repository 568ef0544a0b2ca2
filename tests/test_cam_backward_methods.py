"""CAM methods that need the backward pass beyond the layer (issue 20): FullGrad, Guided
Backprop and Guided Grad-CAM, against pytorch-grad-cam's ``FullGrad``,
``GuidedBackpropReLUModel`` and its documented Guided Grad-CAM recipe (``cam_mask * gb``) on
the same torch models, exported to ONNX and run by CamModel."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from pytorch_grad_cam import FullGrad, GradCAM, GuidedBackpropReLUModel
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from sp2ps_onnx import CamModel, cam
from sp2ps_onnx.cli import cli
from sp2ps_onnx.graph import BackwardOptions
from tests.exports import export_torchvision
from tests.test_cam import tiny_setup

TOLERANCE = 1e-3
BUNDLED_CNN = Path(__file__).resolve().parent.parent / "models" / "fmnist_cnn.onnx"


def export(net: torch.nn.Module, x: torch.Tensor, path: Path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, (x,), str(path), input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
            dynamo=False,
        )  # fmt: skip
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    net, x, targets = tiny_setup(relu_before_tap=True)
    path = export(net, x, tmp_path_factory.mktemp("tiny") / "tiny.onnx")
    return net, x, targets, path


def reference_fullgrad(net, x: torch.Tensor, targets, **options) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = FullGrad(net, target_layers=[])
        try:
            return reference(
                x, targets=[ClassifierOutputTarget(int(t)) for t in targets], **options
            )
        finally:
            reference.activations_and_grads.release()


def reference_guided(net, x: torch.Tensor, targets) -> np.ndarray:
    """pytorch-grad-cam's guided gradients (N, C, H, W); it explains one image per call."""
    model = GuidedBackpropReLUModel(net, device="cpu")
    images = [model(x[i : i + 1].clone(), int(t)).transpose(2, 0, 1) for i, t in enumerate(targets)]
    return np.stack(images)


def reference_gradcam_mask(net, x: torch.Tensor, targets, layer) -> np.ndarray:
    reference = GradCAM(net, target_layers=[layer])
    try:
        return reference(x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    finally:
        reference.activations_and_grads.release()


def test_fullgrad_matches_pytorch_grad_cam_on_the_tiny_net(tiny) -> None:
    net, x, targets, path = tiny
    maps, used = cam.explain(CamModel(path), x.numpy(), "fullgrad", targets=targets)
    theirs = reference_fullgrad(net, x, targets)
    np.testing.assert_array_equal(used, targets)
    assert np.abs(maps - theirs).max() < TOLERANCE
    assert theirs.max() > 0.99  # a real map, not a constant one


def test_fullgrad_aug_smooth_matches_pytorch_grad_cam(tiny) -> None:
    net, x, targets, path = tiny
    maps, _ = cam.explain(CamModel(path), x.numpy(), "fullgrad", targets=targets, aug_smooth=True)
    theirs = reference_fullgrad(net, x, targets, aug_smooth=True)
    assert np.abs(maps - theirs).max() < TOLERANCE


def test_fullgrad_uses_the_given_model_when_it_has_the_outputs(tiny) -> None:
    net, x, targets, path = tiny
    options = BackwardOptions(bias_gradients=True, input_gradient=True)
    model = CamModel(path, backward=options)
    maps, _ = cam.explain(model, x.numpy(), "fullgrad", targets=targets)
    assert not model._with_backward  # no second model built
    assert np.abs(maps - reference_fullgrad(net, x, targets)).max() < TOLERANCE


def test_guided_backprop_matches_pytorch_grad_cam_on_the_tiny_net(tiny) -> None:
    net, x, targets, path = tiny
    model = CamModel(path)
    gradients, used = cam.guided_backprop(model, x.numpy(), targets)
    theirs = reference_guided(net, x, targets)
    np.testing.assert_array_equal(used, targets)
    scale = np.abs(theirs).max()
    assert scale > 0
    assert np.abs(gradients - theirs).max() / scale < TOLERANCE
    maps, _ = cam.explain(model, x.numpy(), "guidedbackprop", targets=targets, raw=True)
    assert np.abs(maps - np.abs(theirs).max(axis=1)).max() / scale < TOLERANCE


def test_guided_gradcam_matches_pytorch_grad_cams_recipe_on_the_tiny_net(tiny) -> None:
    net, x, targets, path = tiny
    mask = reference_gradcam_mask(net, x, targets, net.tap)
    theirs = np.abs(mask[:, None] * reference_guided(net, x, targets)).max(axis=1)
    ours, _ = cam.explain(CamModel(path), x.numpy(), "guidedgradcam", targets=targets, raw=True)
    scale = theirs.max()
    assert scale > 0
    assert np.abs(ours - theirs).max() / scale < TOLERANCE


def test_fullgrad_runs_from_the_cli_on_the_bundled_cnn(tmp_path) -> None:
    images = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
    np.save(tmp_path / "images.npy", images)
    result = CliRunner().invoke(
        cli, ["cam", str(BUNDLED_CNN), str(tmp_path / "images.npy"), "--method", "fullgrad", "--preset", "unit",
              "--out", str(tmp_path / "out")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "cams.csv").is_file()
    assert len(list((tmp_path / "out").rglob("*.npy"))) == len(images)


def test_guided_gradients_differ_from_plain_ones(tiny) -> None:
    """The guided rule is in force: the plain input gradient does not pass the comparison."""
    net, x, targets, path = tiny
    plain = CamModel(path, backward=BackwardOptions(input_gradient=True))
    plain_gradients = plain.run(x.numpy(), targets).input_gradient
    theirs = reference_guided(net, x, targets)
    assert np.abs(plain_gradients - theirs).max() / np.abs(theirs).max() > 10 * TOLERANCE


@pytest.fixture(scope="module")
def resnet18():
    path, shared, x = export_torchvision("resnet18", False)
    # pytorch-grad-cam's guided backprop swaps the model's ReLU modules: work on a copy of
    # the export cache's shared model, which other test modules read.
    model = copy.deepcopy(shared)
    with torch.no_grad():
        targets = model(x).argsort(dim=1)[:, -2].numpy()
    return model, x, targets, CamModel(str(path))


def test_fullgrad_on_resnet18_matches_pytorch_grad_cam(resnet18) -> None:
    """resnet18's BatchNorms are folded into its Convs by the exporter: the fused biases are
    the BatchNorms' effective ones, pytorch-grad-cam's terms."""
    model, x, targets, cam_model = resnet18
    maps, _ = cam.explain(cam_model, x.numpy(), "fullgrad", targets=targets)
    assert np.abs(maps - reference_fullgrad(model, x, targets)).max() < TOLERANCE


def test_guided_methods_on_resnet18_match_pytorch_grad_cam(resnet18) -> None:
    model, x, targets, cam_model = resnet18
    guided = reference_guided(model, x, targets)
    ours, _ = cam.guided_backprop(cam_model, x.numpy(), targets)
    assert np.abs(ours - guided).max() / np.abs(guided).max() < TOLERANCE
    mask = reference_gradcam_mask(model, x, targets, model.layer4)
    theirs = np.abs(mask[:, None] * guided).max(axis=1)
    maps, _ = cam.explain(cam_model, x.numpy(), "guidedgradcam", targets=targets, raw=True)
    assert np.abs(maps - theirs).max() / theirs.max() < TOLERANCE


KERAS_CNN = BUNDLED_CNN.parent / "keras" / "fmnist_keras.onnx"


@pytest.mark.parametrize("score", ["logits", "probabilities"])
def test_siblings_explain_the_given_models_score_on_a_channels_last_model(score: str) -> None:
    """A Keras export (NHWC, a final Softmax): the model built with the backward options
    scores what the given one scores (its Softmax cut or kept), once per set of options, and
    the maps have the input's size."""
    model = CamModel(KERAS_CNN, score=score)
    x = np.random.default_rng(0).random((2, *model.graph.info.input_shape[1:]), dtype=np.float32)
    expected = model.run(x).score
    for method in ("fullgrad", "guidedbackprop", "guidedgradcam"):
        maps, _ = cam.explain(model, x, method)
        assert maps.shape == (2, *model.input_spatial_size)
        assert maps.max() > 0.99
    siblings = [sibling for _, sibling in model._with_backward]
    assert len(siblings) == 2
    for sibling in siblings:
        np.testing.assert_allclose(sibling.run(x).score, expected, rtol=1e-5, atol=1e-6)
