"""ShapleyCAM (issue 20) against pytorch-grad-cam 1.5's ``ShapleyCAM`` on the same torch
models, exported to ONNX and run by CamModel: small CNNs whose heads are curved (Sigmoid,
Softmax: a non-zero Hessian-vector product, checked to move the map away from Grad-CAM's),
with ``eigen_smooth`` and ``aug_smooth``; torchvision resnet18 (a piecewise-linear head: no
product is built, torch's is 0) and mobilenet_v3_small (a HardSwish in the classifier); and
a head whose product cannot be built, refused by name."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM, ShapleyCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from sp2ps_onnx import CamModel, cam
from sp2ps_onnx.errors import UnsupportedModelError
from tests.test_cam_reference import torchvision_case

TOLERANCE = 1e-3
TARGETS = [1, 4, 7]


def export(net: nn.Module, x: torch.Tensor, path: Path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, (x,), str(path), input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
            dynamo=False,
        )  # fmt: skip
    return str(path)


def reference(method, net: nn.Module, layer: nn.Module, x: torch.Tensor, targets, **options):
    """pytorch-grad-cam's full call (hooks, its double backward, its post-processing)."""
    explainer = method(net, target_layers=[layer])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return explainer(x, targets=[ClassifierOutputTarget(int(t)) for t in targets], **options)
    finally:
        explainer.activations_and_grads.release()


def curved_net(activation: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 16), activation, nn.Linear(16, 10),
    ).eval()  # fmt: skip
    with torch.no_grad():
        net[6].weight.mul_(4)  # far from the activation's linear part: a large second order
    return net


@pytest.fixture(scope="module", params=["sigmoid", "softmax"])
def curved(request, tmp_path_factory):
    activation = nn.Sigmoid() if request.param == "sigmoid" else nn.Softmax(dim=1)
    net = curved_net(activation)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    path = export(net, x, tmp_path_factory.mktemp("curved") / f"{request.param}.onnx")
    return net, x, CamModel(path)


@pytest.mark.parametrize(
    "options", [{}, {"eigen_smooth": True}, {"aug_smooth": True}], ids=["plain", "eigen", "aug"]
)
def test_shapleycam_matches_pytorch_grad_cam_on_curved_heads(curved, options) -> None:
    net, x, model = curved
    assert not model.hessian_vanishes
    ours, used = cam.explain(model, x.numpy(), "shapleycam", targets=TARGETS, **options)
    theirs = reference(ShapleyCAM, net, net[3], x, TARGETS, **options)
    np.testing.assert_array_equal(used, TARGETS)
    assert ours.shape == theirs.shape and ours.dtype == np.float32
    assert np.abs(ours - theirs).max() < TOLERANCE
    # The second-order term counts: Grad-CAM (the first-order term alone) is far away.
    gradcam = reference(GradCAM, net, net[3], x, TARGETS, **options)
    assert np.abs(gradcam - theirs).max() > 10 * TOLERANCE


def test_shapleycam_makes_one_run_of_the_model_with_the_product(curved) -> None:
    """explain runs the sibling built with the Hessian-vector product once per batch (its
    gradients and activations are the plain run's), built once per model."""
    _, x, model = curved
    calls: list[int] = []
    cam.explain(model, x.numpy(), "shapleycam", targets=TARGETS)
    ((options, sibling),) = model._with_backward
    assert options.hessian_vector_product
    original_run, sibling_run = model.run, sibling.run
    model.run = lambda *a, **k: calls.append(0) or original_run(*a, **k)
    sibling.run = lambda *a, **k: calls.append(1) or sibling_run(*a, **k)
    try:
        cam.explain(model, x.numpy(), "shapleycam", targets=TARGETS)
    finally:
        del model.run, sibling.run
    assert calls == [1]
    assert len(model._with_backward) == 1


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_shapleycam_on_torchvision_models_matches_pytorch_grad_cam(name: str) -> None:
    """resnet18's head (average pool, Linear) is linear in layer4: torch's product is 0 and
    none is built here (ShapleyCAM is Grad-CAM); mobilenet_v3_small's classifier has a
    HardSwish between its Linears: a real product, built from the rules."""
    path, tapped, x = torchvision_case(name)
    model = CamModel(str(path))
    ours, targets = model.cams(x.numpy(), method="shapleycam")
    theirs = reference(ShapleyCAM, tapped, tapped.tap, x, targets)
    assert np.abs(ours - theirs).max() < TOLERANCE
    if name == "resnet18":
        assert model.hessian_vanishes and not model._with_backward
    else:
        assert [op for _, op in model.curved_head_ops] == ["HardSwish"]
        assert len(model._with_backward) == 1
        gradcam = reference(GradCAM, tapped, tapped.tap, x, targets)
        assert np.abs(gradcam - theirs).max() > 10 * TOLERANCE


def test_a_head_without_a_product_is_refused_by_name(tmp_path) -> None:
    """A Conv after the layer and a Sigmoid after it: the first backward pass runs a
    ConvTranspose whose input depends on the layer, and ConvTranspose has no rule."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1), nn.Sigmoid(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 10),
    ).eval()  # fmt: skip
    x = torch.randn(2, 3, 16, 16)
    model = CamModel(export(net, x, tmp_path / "conv-head.onnx"), layer="/1/Relu_output_0")
    assert [op for _, op in model.curved_head_ops] == ["Sigmoid"]
    with pytest.raises(UnsupportedModelError, match="ConvTranspose.*ShapleyCAM"):
        cam.explain(model, x.numpy(), "shapleycam")
    maps, _ = cam.explain(model, x.numpy(), "gradcam")  # the other methods still run
    assert maps.shape == (2, 16, 16)


def test_shapleycam_on_a_vision_transformer_matches_its_definition() -> None:
    """A timm ViT's class-token head (the last block's attention and MLP after norm1: Softmax,
    LayerNorm, GELU). pytorch-grad-cam 1.5.7's ShapleyCAM cannot take a reshape_transform (its
    BaseCAM gets the untransformed (N, T, C) tokens: "Invalid activation shape"), so the
    reference is its formula written out on torch's double backward, with pytorch-grad-cam's
    post-processing (``scale_cam_image``)."""
    import copy

    from pytorch_grad_cam.utils.image import scale_cam_image

    from tests.test_transformers import NARROW_DEIT, VIT, case

    path, shared, x = case(VIT, **NARROW_DEIT)
    model = copy.deepcopy(shared)
    for block in model.blocks:
        block.attn.fused_attn = False  # torch has no double backward of fused attention
    ours, targets = CamModel(str(path)).cams(x.numpy(), method="shapleycam")

    captured: list[torch.Tensor] = []
    handle = model.blocks[-1].norm1.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        logits = model(x)
    finally:
        handle.remove()
    (tokens,) = captured
    score = logits[torch.arange(len(x)), torch.as_tensor(targets)].sum()
    (grads,) = torch.autograd.grad(score, tokens, create_graph=True)
    (product,) = torch.autograd.grad(grads, tokens, grad_outputs=tokens)
    patches = slice(1, None)  # the class token is no position of the map
    weights = (grads - 0.5 * product)[:, patches].mean(dim=1)  # (N, C)
    raw = torch.einsum("nc,ntc->nt", weights, tokens[:, patches]).detach().numpy()
    raw = raw.reshape(len(x), 14, 14)
    theirs = scale_cam_image(scale_cam_image(np.maximum(raw, 0), (224, 224)))
    assert np.abs(ours - theirs).max() < TOLERANCE
    first_order = torch.einsum("nc,ntc->nt", grads[:, patches].mean(dim=1), tokens[:, patches])
    gradcam = scale_cam_image(scale_cam_image(
        np.maximum(first_order.detach().numpy().reshape(len(x), 14, 14), 0), (224, 224)))
    assert np.abs(gradcam - theirs).max() > 3 * TOLERANCE  # the product counts here too


def test_registry_entries_say_which_backward_outputs_they_read() -> None:
    backward = {name: cam.CAM_METHODS[name].backward for name in cam.METHODS}
    assert backward["shapleycam"] == ("hessian_vector_product",)
    assert backward["fullgrad"] == ("bias_gradients", "input_gradient")
    assert backward["guidedgradcam"] == backward["guidedbackprop"] == ("guided_input_gradient",)
    assert all(cam.CAM_METHODS[name].needs == "perturbation" for name, flags in backward.items() if flags)
    with pytest.raises(TypeError, match="backward outputs reach only 'perturbation' methods"):
        cam.CamMethod.of("mine", lambda a, g: a, needs="gradient", backward=("input_gradient",))
