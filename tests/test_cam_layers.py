"""Several target layers against pytorch-grad-cam 1.5.7: its list of ``target_layers``
(``compute_cam_per_layer`` + ``aggregate_multi_layers``, every layer's map ReLU'd, min-max
scaled and resized, then averaged and min-max scaled) and RefineCAM (the product of the
Grad-CAM++ maps of each layer).

Ours: ``CamModel(onnx).cams(x, method, layers=[a, b])``, both layers from one ONNX Runtime
run. Theirs: the CAM class called on the torch model with ``target_layers=[module_a,
module_b]`` (its own hooks, autograd and post-processing). Models: a small two-stage CNN
and torchvision resnet18 (random weights, 64x64, legacy exporter) at (layer3, layer4).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, LayerCAM, RefineCAM, XGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from sp2ps_onnx import CamModel, cam
from sp2ps_onnx.errors import InputDataError
from tests.exports import as_numpy, example_input, export_torchvision
from tests.test_torch_autograd import find_onnx_tensor

TOLERANCE = 1e-3
REFERENCES = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "xgradcam": XGradCAM,
              "layercam": LayerCAM}


class TwoStageNet(nn.Module):
    """conv-relu (16x16) -> pool -> conv-relu (8x8) -> global average pool -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(8, 12, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stage2(self.stage1(x)).mean(dim=(2, 3)))


def _export(model: nn.Module, x: torch.Tensor, path: Path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, x, str(path), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}}, dynamo=False)
    return str(path)


def _tensors(path: str, model: nn.Module, x: torch.Tensor, modules: list[nn.Module]) -> list[str]:
    """The ONNX tensors holding the outputs of ``modules``."""
    captured: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _i, out: captured.append(out.detach().clone()))
               for m in modules]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return [find_onnx_tensor(path, as_numpy(x), value.numpy()) for value in captured]


def _theirs(kind, model: nn.Module, modules: list[nn.Module], x: torch.Tensor, targets):
    reference = kind(model, target_layers=modules)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        maps = reference(x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    for base in getattr(reference, "base_cam_per_layer", [reference]):
        base.activations_and_grads.release()
    return maps


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory):
    torch.manual_seed(0)
    model = TwoStageNet().eval()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    path = _export(model, x, tmp_path_factory.mktemp("layers") / "two_stage.onnx")
    modules = [model.stage1, model.stage2]
    return path, model, modules, _tensors(path, model, x, modules), x


@pytest.fixture(scope="module")
def resnet18():
    path, model, _ = export_torchvision("resnet18", False)
    x = example_input(64, batch=3, seed=11)
    modules = [model.layer3, model.layer4]
    return str(path), model, modules, _tensors(str(path), model, x, modules), x


def _max_deviation(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(ours.astype(np.float64) - theirs).max())


@pytest.mark.parametrize("method", list(REFERENCES))
def test_two_layers_match_pytorch_grad_cam_on_a_small_cnn(two_stage, method: str) -> None:
    path, model, modules, tensors, x = two_stage
    cam_model = CamModel(path)
    ours, targets = cam_model.cams(x.numpy(), method=method, layers=tensors)
    theirs = _theirs(REFERENCES[method], model, modules, x, targets)
    assert ours.shape == theirs.shape == (3, 16, 16)
    assert _max_deviation(ours, theirs) <= TOLERANCE
    # Not the one-layer map: the first layer counts.
    alone = cam_model.cams(x.numpy(), method=method, targets=targets)[0]
    assert _max_deviation(ours, alone) > 10 * TOLERANCE


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_layer3_and_layer4_match_pytorch_grad_cam_on_resnet18(resnet18, method: str) -> None:
    path, model, modules, tensors, x = resnet18
    ours, targets = CamModel(path).cams(x.numpy(), method=method, layers=tensors)
    theirs = _theirs(REFERENCES[method], model, modules, x, targets)
    assert _max_deviation(ours, theirs) <= TOLERANCE
    # The same numbers from explicit targets, in either order of the layers (a mean).
    again, _ = CamModel(path).cams(x.numpy(), method=method, targets=targets,
                                   layers=tensors[::-1])
    np.testing.assert_allclose(again, ours, atol=1e-6)


@pytest.mark.parametrize("case", ["two_stage", "resnet18"])
def test_refinecam_matches_pytorch_grad_cam(case: str, request) -> None:
    path, model, modules, tensors, x = request.getfixturevalue(case)
    ours, targets = CamModel(path).cams(x.numpy(), method="refinecam", layers=tensors)
    theirs = _theirs(RefineCAM, model, modules, x, targets)
    assert _max_deviation(ours, theirs) <= TOLERANCE
    # One layer: RefineCAM is its base method, Grad-CAM++.
    single, _ = CamModel(path).cams(x.numpy(), method="refinecam", targets=targets)
    plain, _ = CamModel(path).cams(x.numpy(), method="gradcam++", targets=targets)
    np.testing.assert_allclose(single, plain, atol=1e-6)


@pytest.mark.parametrize("option", ["aug_smooth", "eigen_smooth"])
def test_two_layers_with_smoothing_match_pytorch_grad_cam(two_stage, option: str) -> None:
    path, model, modules, tensors, x = two_stage
    ours, targets = cam.explain_layers(CamModel(path), x.numpy(), tensors, method="gradcam",
                                       **{option: True})
    reference = GradCAM(model, target_layers=modules)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = reference(x, [ClassifierOutputTarget(int(t)) for t in targets], **{option: True})
    reference.activations_and_grads.release()
    assert _max_deviation(ours, theirs) <= TOLERANCE


def test_refinecam_refuses_the_smoothing_options(two_stage) -> None:
    """pytorch-grad-cam's RefineCAM has no aug_smooth, and its eigen_smooth lands in the base
    CAM's aug_smooth parameter; neither is offered here."""
    path, model, modules, tensors, x = two_stage
    # What pytorch-grad-cam 1.5.7's RefineCAM does with eigen_smooth=True: its base CAMs
    # average augmented inputs (aug_smooth), and no principal component is taken.
    targets = [ClassifierOutputTarget(t) for t in (0, 1, 2)]
    refine = RefineCAM(model, target_layers=modules)
    bases = [GradCAMPlusPlus(model, target_layers=[m]) for m in modules]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flagged = refine(x, targets, True)
        augmented = np.prod([base(x, targets, aug_smooth=True) for base in bases], axis=0)
    for explainer in [*refine.base_cam_per_layer, *bases]:
        explainer.activations_and_grads.release()
    low = augmented.min(axis=(1, 2), keepdims=True)
    expected = (augmented - low) / ((augmented - low).max(axis=(1, 2), keepdims=True) + 1e-7)
    np.testing.assert_allclose(flagged, expected, atol=1e-6)
    with pytest.raises(InputDataError, match="eigen_smooth"):
        cam.explain_layers(CamModel(path), x.numpy(), tensors, method="refinecam",
                           eigen_smooth=True)
    with pytest.raises(InputDataError, match="aug_smooth"):
        cam.explain_layers(CamModel(path), x.numpy(), tensors, method="refinecam",
                           aug_smooth=True)


def test_layer_cams_are_each_layers_own_map(two_stage) -> None:
    path, _, _, tensors, x = two_stage
    maps, targets = cam.layer_cams(CamModel(path), x.numpy(), "gradcam", layers=tensors)
    assert list(maps) == tensors
    for tensor in tensors:
        alone, used = CamModel(path, layer=tensor).cams(x.numpy(), "gradcam", targets=targets)
        np.testing.assert_array_equal(used, targets)
        np.testing.assert_allclose(maps[tensor], alone, atol=1e-6)


def test_several_layers_refuse_what_they_cannot_do(two_stage) -> None:
    path, _, _, tensors, x = two_stage
    cam_model = CamModel(path)
    with pytest.raises(InputDataError, match="several layers"):
        cam_model.cams(x.numpy(), method="scorecam", layers=tensors)
    with pytest.raises(InputDataError, match="raw=True"):
        cam_model.cams(x.numpy(), method="gradcam", layers=tensors, raw=True)
    with pytest.raises(InputDataError, match="empty"):
        cam_model.cams(x.numpy(), method="gradcam", layers=[])
