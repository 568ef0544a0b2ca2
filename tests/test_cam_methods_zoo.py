"""Every CAM method on torchvision mobilenet_v3_small and timm resnet10t, exported to ONNX and
run by CamModel, against pytorch-grad-cam on the same torch models (issue 20).

Models: random weights (fixed seeds; timm's ``zero_init_last`` off), BatchNorm statistics
estimated on the photos (with made-up ones the last feature maps are nearly the same at every
position and for every image, and the maps float32 noise), 10 classes, eval mode, legacy
exporter; inputs: two of scikit-image's photos at 96x96, ImageNet-normalised (3x3 last feature
maps; Score-CAM on one image, since it runs the model once per channel). mobilenet_v3_small brings Hardswish,
Hardsigmoid and squeeze-excitation (1x1 Conv biases for FullGrad, ReLUs in a side branch for
Guided Backprop); resnet10t a three-conv stem and average pooling in its shortcuts.

References, one per method, all on the torch model:

* the Grad-CAM family, EigenCAM, KPCA-CAM, FEM, Score-CAM: pytorch-grad-cam's classes, full
  call (hooks, autograd, post-processing); Ablation-CAM on the head alone fed with the torch
  activations (as tests/test_cam_reference.py does, same numbers, far fewer passes);
* RandomCAM: pytorch-grad-cam's class with the same NumPy seed (both draw their weights from
  NumPy's global generator), another seed gives another map;
* FinerCAM, FullGrad, Guided Backprop: pytorch-grad-cam's ``FinerCAM``, ``FullGrad``,
  ``GuidedBackpropReLUModel``; Guided Grad-CAM its recipe ``cam_mask * gb``;
* Deep Feature Factorization: pytorch-grad-cam's ``dff`` on the torch activations and the
  torch head on the concept embeddings;
* ReciproCAM: its definition written out in torch (``reciprocam_by_definition``);
* SobelCAM: OpenCV's Sobel filter in floating point on the same images.

Maps are compared after post-processing (values in [0, 1]) with a tolerance of 1e-3 on the
largest absolute difference; Guided Backprop's gradients relative to their largest magnitude.
The largest difference per method and model is printed by ``pytest -s``.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
import pytest
import timm
import torch
import torchvision
from pytorch_grad_cam import FinerCAM
from pytorch_grad_cam.feature_factorization.deep_feature_factorization import dff
from pytorch_grad_cam.utils.image import scale_cam_image
from torch import nn

from references.photos import sample_photos
from sp2ps_onnx import CamModel, cam
from tests import exports
from tests.test_cam_backward_methods import (
    export,
    reference_fullgrad,
    reference_gradcam_mask,
    reference_guided,
)
from tests.test_cam_methods import reciprocam_by_definition
from tests.test_cam_reference import (
    CHEAP_METHODS,
    Tapped,
    TappedHead,
    _Weights,
    negated_eigen_reference,
    reference_cams,
    torch_activations_and_gradients,
)

TOLERANCE = 1e-3
SIZE = 96
MODELS = ("mobilenet_v3_small", "resnet10t")
#: pytorch-grad-cam BaseCAM classes compared with a full call of theirs.
BASE_CAM_METHODS = (*CHEAP_METHODS, "scorecam")


@dataclass
class ZooCase:
    onnx_model: CamModel
    model: nn.Module  # the whole torch model (FullGrad, Guided Backprop hook or swap modules)
    tapped: Tapped  # the same model split at the ONNX default layer
    x: torch.Tensor
    targets: np.ndarray  # the second-best class of each image (not the easy top one)
    layer: nn.Module  # the module whose output is the ONNX default layer (Guided Grad-CAM)
    classifier: nn.Module  # the layers after the global pooling (DFF's concept scores)


def _calibrated(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """``model`` in eval mode with its BatchNorm statistics estimated on ``x`` and its mirror
    image. With made-up statistics the random-weight features drift to nearly the same
    values at every position and for every image, and the maps to float32 noise; estimated
    ones keep every channel at unit scale, as a trained model's are."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the calibration batch
    model.train()
    with torch.no_grad():
        model(torch.cat([x, x.flip(-1)]))
    return model.eval()


def _mobilenet_v3_small(x: torch.Tensor) -> tuple[nn.Module, Tapped, nn.Module, nn.Module]:
    torch.manual_seed(exports.SEED)
    model = torchvision.models.mobilenet_v3_small(weights=None, num_classes=exports.NUM_CLASSES)
    model = _calibrated(model, x)
    tapped = Tapped(model.features, lambda a: exports.torch_head("mobilenet_v3_small", model, a))
    return model, tapped, model.features, model.classifier


def _resnet10t(x: torch.Tensor) -> tuple[nn.Module, Tapped, nn.Module, nn.Module]:
    torch.manual_seed(exports.SEED)
    # timm zeroes the last BatchNorm scale of every block, which would leave the residual
    # branches out of every map.
    model = timm.create_model(
        "resnet10t", pretrained=False, num_classes=exports.NUM_CLASSES, zero_init_last=False
    )
    model = _calibrated(model, x)
    tapped = Tapped(model.forward_features, model.forward_head)
    return model, tapped, model.layer4, model.fc


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, ZooCase]:
    photos = torch.from_numpy(sample_photos(SIZE, nchw=True))
    x = photos[:2]
    folder = tmp_path_factory.mktemp("zoo")
    cases = {}
    for name, build in (("mobilenet_v3_small", _mobilenet_v3_small), ("resnet10t", _resnet10t)):
        model, tapped, layer, classifier = build(photos)
        tapped.weights = _Weights(model)
        tapped.eval()
        path = export(model, x, folder / f"{name}.onnx")
        with torch.no_grad():
            logits = model(x)
            # The ONNX default layer is the tensor the torch split taps: same scores.
            np.testing.assert_allclose(tapped(x).numpy(), logits.numpy(), rtol=1e-5, atol=1e-6)
        targets = logits.argsort(dim=1)[:, -2].numpy()  # not the top class: a harder target
        onnx_model = CamModel(path)
        scores = onnx_model.run(x.numpy(), targets).score
        np.testing.assert_allclose(scores, logits.numpy(), rtol=1e-4, atol=1e-5)
        cases[name] = ZooCase(onnx_model, model, tapped, x, targets, layer, classifier)
    return cases


#: Largest difference per (model, method) in this module (printed by ``pytest -s``).
DEVIATIONS: dict[tuple[str, str], float] = {}


@pytest.fixture(scope="module", autouse=True)
def _print_deviations():
    yield
    for (name, method), deviation in sorted(DEVIATIONS.items()):
        print(f"\n{name} {method}: {deviation:.3g}", end="")


def check(name: str, method: str, ours: np.ndarray, theirs: np.ndarray, scale: float = 1.0) -> None:
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    deviation = float(np.abs(ours.astype(np.float64) - theirs).max()) / scale
    DEVIATIONS[(name, method)] = max(DEVIATIONS.get((name, method), 0.0), deviation)
    assert deviation <= TOLERANCE, f"{name} {method}: {deviation:.3g} > {TOLERANCE:g}"


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("method", BASE_CAM_METHODS)
def test_base_cam_methods_match_pytorch_grad_cam(zoo, name: str, method: str) -> None:
    case = zoo[name]
    # Score-CAM runs the model once per channel (576 and 512 here): one image keeps it short.
    count = 1 if method == "scorecam" else len(case.x)
    x, targets = case.x[:count], case.targets[:count]
    ours, used = case.onnx_model.cams(x.numpy(), method=method, targets=targets)
    np.testing.assert_array_equal(used, targets)
    theirs = reference_cams(method, case.tapped, x, targets)
    assert theirs.max() > 0.99  # a real map, not a constant one
    if method in ("eigencam", "eigengradcam"):
        # The singular vector's sign is arbitrary: the other sign is also pytorch-grad-cam's.
        deviation = np.abs(ours - theirs).max()
        if deviation > TOLERANCE:
            inputs = torch_activations_and_gradients(case.tapped, x, targets)
            other = negated_eigen_reference(method, x, *inputs)
            if np.abs(ours - other).max() < deviation:
                theirs = other
    check(name, method, ours, theirs)


@pytest.mark.parametrize("name", MODELS)
def test_ablation_cam_matches_pytorch_grad_cam(zoo, name: str) -> None:
    case = zoo[name]
    with torch.no_grad():
        activations = case.tapped.features(case.x)
    size = tuple(activations.shape[-2:])
    ours, _ = case.onnx_model.cams(
        case.x.numpy(), method="ablationcam", targets=case.targets, size=size
    )
    head = TappedHead(case.tapped.head)
    head.weights = case.tapped.weights
    # Hardswish and ReLU outputs: pytorch-grad-cam's ablation value depends on the sign.
    kwargs = {"batch_size": 1} if float(activations.min()) < 0 else {}
    theirs = reference_cams("ablationcam", head.eval(), activations, case.targets, **kwargs)
    check(name, "ablationcam", ours, theirs)


@pytest.mark.parametrize("name", MODELS)
def test_random_cam_follows_numpys_seed_like_pytorch_grad_cam(zoo, name: str) -> None:
    case = zoo[name]
    np.random.seed(17)
    ours, _ = case.onnx_model.cams(case.x.numpy(), method="randomcam", targets=case.targets)
    np.random.seed(17)
    theirs = reference_cams("randomcam", case.tapped, case.x, case.targets)
    check(name, "randomcam", ours, theirs)
    other, _ = case.onnx_model.cams(case.x.numpy(), method="randomcam", targets=case.targets)
    assert np.abs(other - ours).max() > 0.1  # new weights: another map


@pytest.mark.parametrize("name", MODELS)
def test_finercam_matches_pytorch_grad_cam(zoo, name: str) -> None:
    case = zoo[name]
    ours, _ = case.onnx_model.cams(case.x.numpy(), method="finercam")
    finer = FinerCAM(case.tapped, target_layers=[case.tapped.tap])
    try:
        theirs = finer(case.x, targets=None)
    finally:
        finer.base_cam.activations_and_grads.release()
    check(name, "finercam", ours, theirs)


@pytest.mark.parametrize("name", MODELS)
def test_fullgrad_matches_pytorch_grad_cam(zoo, name: str) -> None:
    case = zoo[name]
    ours, _ = case.onnx_model.cams(case.x.numpy(), method="fullgrad", targets=case.targets)
    theirs = reference_fullgrad(case.model, case.x, case.targets)
    assert theirs.max() > 0.99
    check(name, "fullgrad", ours, theirs)


@pytest.mark.parametrize("name", MODELS)
def test_guided_methods_match_pytorch_grad_cam(zoo, name: str) -> None:
    case = zoo[name]
    # pytorch-grad-cam swaps the ReLU modules of the model it is given: give it a copy.
    guided = reference_guided(copy.deepcopy(case.model), case.x, case.targets)
    gradients, _ = cam.guided_backprop(case.onnx_model, case.x.numpy(), case.targets)
    scale = float(np.abs(guided).max())
    assert scale > 0
    check(name, "guided gradients", gradients, guided, scale)
    raw, _ = case.onnx_model.cams(
        case.x.numpy(), method="guidedbackprop", targets=case.targets, raw=True
    )
    check(name, "guidedbackprop", raw, np.abs(guided).max(axis=1), scale)
    mask = reference_gradcam_mask(case.model, case.x, case.targets, case.layer)
    recipe = np.abs(mask[:, None] * guided).max(axis=1)
    raw, _ = case.onnx_model.cams(
        case.x.numpy(), method="guidedgradcam", targets=case.targets, raw=True
    )
    check(name, "guidedgradcam", raw, recipe, float(recipe.max()))


@pytest.mark.parametrize("name", MODELS)
def test_dff_matches_pytorch_grad_cam(zoo, name: str) -> None:
    case = zoo[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NMF's ConvergenceWarning, the same on both sides
        raw, _ = case.onnx_model.cams(case.x.numpy(), method="dff", targets=case.targets, raw=True)
        with torch.no_grad():
            activations = case.tapped.features(case.x).numpy()
            for index, target in enumerate(case.targets):
                concepts, explanations = dff(activations[index : index + 1].copy(), 5)
                # The classifier on the concept embeddings, as pytorch-grad-cam's examples
                # run DeepFeatureFactorization (computation_on_concepts).
                embeddings = torch.from_numpy(concepts.T.astype(np.float32))
                outputs = case.classifier(embeddings).numpy()
                expected = explanations[0, int(np.argmax(outputs[:, target]))]
                check(name, "dff", raw[index], expected, float(expected.max()))


@pytest.mark.parametrize("name", MODELS)
def test_reciprocam_matches_its_definition(zoo, name: str) -> None:
    case = zoo[name]
    ours, _ = case.onnx_model.cams(
        case.x.numpy(), method="reciprocam", targets=case.targets, size=(3, 3)
    )
    theirs = reciprocam_by_definition(case.tapped.features, case.tapped.head, case.x, case.targets)
    check(name, "reciprocam", ours, theirs)


def test_sobel_cam_is_opencvs_sobel_filter(zoo) -> None:
    case = zoo["mobilenet_v3_small"]
    ours, _ = case.onnx_model.cams(case.x.numpy(), method="sobelcam")
    expected = []
    for image in case.x.numpy().transpose(0, 2, 3, 1):
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float64)
        along_x = cv2.Sobel(gray, cv2.CV_64F, 1, 0, ksize=3)
        along_y = cv2.Sobel(gray, cv2.CV_64F, 0, 1, ksize=3)
        expected.append(0.5 * np.abs(along_x) + 0.5 * np.abs(along_y))
    check("any", "sobelcam", ours, scale_cam_image(np.stack(expected)))
