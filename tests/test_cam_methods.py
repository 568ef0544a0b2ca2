"""The CAM methods and options added for issue 20, against independent references.

* KPCA-CAM, FEM, RandomCAM, Deep Feature Factorization and the ``eigen_smooth`` and
  ``aug_smooth`` options: pytorch-grad-cam 1.5's own code (``get_2d_projection_kernel``,
  ``FEM.get_cam_image``, ``dff``, ``DeepFeatureFactorization``, ``BaseCAM.__call__``) on the
  same arrays or the same torch model. RandomCAM draws random weights: its distribution, its
  shape and its seed behaviour are tested, and with the same seed it equals pytorch-grad-cam
  (both draw from NumPy's global generator).
* SobelCAM: OpenCV's own Sobel filter in floating point, and pytorch-grad-cam's ``sobel_cam``
  on a uint8 picture, which rounds to integers (so 0.5 of a grey level apart at most).
* FinerCAM: pytorch-grad-cam's ``FinerCAM`` (its seed ``dT/dz`` also against torch autograd
  of its ``FinerWeightedTarget``).
* ReciproCAM: its definition (Byun & Lee 2022; OpenVINO-XAI's CNN variant, one position of
  the feature map kept per mosaic, logits, min-max scaling) written out in torch, one
  position at a time.

Models: the tiny CNN of tests/test_cam.py through a torch-backed stand-in for CamModel, and
torchvision resnet18 (random weights, 64x64) exported to ONNX and run by CamModel.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from pytorch_grad_cam import DeepFeatureFactorization, FinerCAM
from pytorch_grad_cam.feature_factorization.deep_feature_factorization import dff
from pytorch_grad_cam.sobel_cam import sobel_cam as reference_sobel_cam
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget, FinerWeightedTarget
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_kernel
from scipy import stats

from references.gradcam import REFERENCE_CLASSES
from sp2ps_onnx import CamModel, cam
from sp2ps_onnx.cli import cli
from sp2ps_onnx.errors import InputDataError, UnsupportedModelError
from sp2ps_onnx.graph.rewrite import BackwardOptions
from tests.test_cam import (
    TorchCamModel,
    make_tiny_net,
    random_feature_maps,
    reference_raw_map,
    tiny_setup,
)
from tests.test_cam_reference import torchvision_case

#: pytorch-grad-cam allows eigen_smooth on these; they are all of ours that take it.
EXPECTED_EIGEN_SMOOTH = (
    "gradcam",
    "gradcam++",
    "xgradcam",
    "hirescam",
    "gradcam-elementwise",
    "layercam",
    "scorecam",
    "ablationcam",
    "randomcam",
    "finercam",
    "shapleycam",
)
#: Maps in [0, 1] of the tiny net, whose activations both sides take from the same torch model.
TINY_TOLERANCE = 1e-5


def max_deviation(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(ours.astype(np.float64) - theirs).max())


def call_reference(method: str, net, x: torch.Tensor, targets, constructor=None, **options):
    """pytorch-grad-cam's full ``__call__`` (hooks, autograd, its post-processing)."""
    reference = REFERENCE_CLASSES[method](net, target_layers=[net.tap], **(constructor or {}))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return reference(
                x, targets=[ClassifierOutputTarget(int(t)) for t in targets], **options
            )
    finally:
        reference.activations_and_grads.release()


# --- KPCA-CAM and FEM ------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", cam.KPCA_KERNELS)
@pytest.mark.parametrize("shape", [(3, 16, 7, 7), (2, 40, 3, 5), (1, 24, 15, 15)])
def test_kernel_pca_matches_pytorch_grad_cam(kernel: str, shape) -> None:
    # 15 x 15 = 225 positions: scikit-learn switches to its ARPACK solver above 200.
    activations, _ = random_feature_maps(seed=21, shape=shape, signed=True)
    ours = cam.kernel_pca_projection(activations, kernel=kernel)
    theirs = get_2d_projection_kernel(activations, kernel=kernel)
    assert ours.shape == theirs.shape and ours.dtype == np.float32
    scale = max(1.0, float(np.abs(theirs).max()))
    assert max_deviation(ours, theirs) / scale <= 1e-4


def test_kernel_pca_gamma_and_bad_kernel() -> None:
    activations, _ = random_feature_maps(seed=22, signed=True)
    ours = cam.kernel_pca_projection(activations, kernel="rbf", gamma=0.3)
    theirs = get_2d_projection_kernel(activations, kernel="rbf", gamma=0.3)
    assert max_deviation(ours, theirs) <= 1e-4 * max(1.0, float(np.abs(theirs).max()))
    with pytest.raises(InputDataError, match="unknown KPCA kernel 'gaussian'"):
        cam.kernel_pca_projection(activations, kernel="gaussian")


@pytest.mark.parametrize("signed", [False, True], ids=["relu", "signed"])
@pytest.mark.parametrize("method", ["fem", "kpcacam"])
def test_activation_methods_match_pytorch_grad_cam(method: str, signed: bool) -> None:
    activations, gradients = random_feature_maps(seed=23, signed=signed)
    ours = cam.CAM_METHODS[method].compute(activations)
    theirs = reference_raw_map(method, activations, gradients)
    scale = max(1.0, float(np.abs(theirs).max()))
    assert max_deviation(ours, theirs) / scale <= 1e-4


def test_fem_weights_are_the_share_of_outlying_positions() -> None:
    """One channel with a single peak: k-sigma keeps it; a flat channel gets weight 0."""
    activations = np.zeros((1, 2, 5, 5), np.float32)
    activations[0, 0, 2, 3] = 4.0  # mean 0.16, std 0.78: 4 > mean + 2 std
    activations[0, 1] = 1.0
    maps = cam.CAM_METHODS["fem"].compute(activations)
    expected = np.zeros((1, 5, 5), np.float32)
    expected[0, 2, 3] = 4.0 / 25
    np.testing.assert_allclose(maps, expected, rtol=1e-6)


# --- RandomCAM --------------------------------------------------------------------------------


def random_weights(count: int, channels: int) -> np.ndarray:
    """RandomCAM's weights read back: channel c is one at position c and zero elsewhere."""
    activations = np.zeros((count, channels, 1, channels), np.float32)
    activations[:, np.arange(channels), 0, np.arange(channels)] = 1
    return cam.CAM_METHODS["randomcam"].compute(activations)[:, 0, :]


def test_random_cam_weights_are_uniform_on_minus_one_one() -> None:
    np.random.seed(31)
    weights = random_weights(64, 50)
    assert weights.shape == (64, 50)
    assert weights.min() >= -1 and weights.max() < 1
    assert stats.kstest(weights.ravel(), stats.uniform(loc=-1, scale=2).cdf).pvalue > 1e-3
    # Independent draws: no correlation between neighbouring channels.
    assert abs(np.corrcoef(weights[:, :-1].ravel(), weights[:, 1:].ravel())[0, 1]) < 0.1


def test_random_cam_repeats_with_numpy_seed_like_pytorch_grad_cam() -> None:
    activations, gradients = random_feature_maps(seed=32, signed=True)
    np.random.seed(5)
    first = cam.CAM_METHODS["randomcam"].compute(activations)
    np.random.seed(5)
    again = cam.CAM_METHODS["randomcam"].compute(activations)
    other = cam.CAM_METHODS["randomcam"].compute(activations)
    np.testing.assert_array_equal(first, again)
    assert max_deviation(first, other) > 1e-3
    np.random.seed(5)
    theirs = reference_raw_map("randomcam", activations, gradients)
    np.testing.assert_allclose(first, theirs, rtol=1e-5, atol=1e-5)


# --- eigen_smooth -----------------------------------------------------------------------------


def test_eigen_smooth_applies_where_pytorch_grad_cam_applies_it() -> None:
    assert set(cam.EIGEN_SMOOTH_METHODS) == set(EXPECTED_EIGEN_SMOOTH)


@pytest.mark.parametrize("method", [m for m in EXPECTED_EIGEN_SMOOTH if m in cam.GRADIENT_METHODS])
def test_eigen_smooth_raw_maps_match_pytorch_grad_cam_up_to_sign(method: str) -> None:
    activations, gradients = random_feature_maps(seed=41, signed=True)
    ours = cam.gradient_weighted_cam(method, activations, gradients, eigen_smooth=True)
    net = make_tiny_net(relu_before_tap=True)
    reference = REFERENCE_CLASSES[method](net, target_layers=[net.tap])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = reference.get_cam_image(
                None, net.tap, None, activations.copy(), gradients.copy(), eigen_smooth=True
            )
    finally:
        reference.activations_and_grads.release()
    for image_ours, image_theirs in zip(ours, theirs, strict=True):
        scale = max(1.0, float(np.abs(image_theirs).max()))
        same = np.abs(image_ours - image_theirs).max()
        flipped = np.abs(image_ours + image_theirs).max()
        assert min(same, flipped) / scale <= 1e-5


@pytest.mark.parametrize("method", [m for m in EXPECTED_EIGEN_SMOOTH if m in REFERENCE_CLASSES])
def test_eigen_smooth_end_to_end_matches_pytorch_grad_cam(method: str) -> None:
    net, x, targets = tiny_setup(relu_before_tap=True, count=3, seed=2)
    model = TorchCamModel(net, (16, 16))
    np.random.seed(4)
    ours, _ = cam.explain(model, x.numpy(), method=method, targets=targets, eigen_smooth=True)
    np.random.seed(4)
    raw, _ = cam.explain(model, x.numpy(), method, targets, raw=True, eigen_smooth=True)
    constructor = {"batch_size": 1} if method == "ablationcam" else {}
    np.random.seed(4)
    theirs = call_reference(method, net, x, targets, constructor, eigen_smooth=True)
    # The torch-backed stand-in gives pytorch-grad-cam's own activations and scores, so
    # even the perturbation methods agree to float32 rounding.
    assert_equal_up_to_projection_sign(ours, raw, theirs, TINY_TOLERANCE)


def assert_equal_up_to_projection_sign(ours, raw, theirs, tolerance: float) -> None:
    """Per image, ours or the post-processing of our negated projection equals theirs: the
    sign of a singular vector is arbitrary, and LAPACK may pick the other one for weights
    that differ from pytorch-grad-cam's in the last bit (before the ReLU it is one map)."""
    other_sign = cam.postprocess(-raw, ours.shape[1:])
    for image, flipped, reference in zip(ours, other_sign, theirs, strict=True):
        deviation = min(max_deviation(image, reference), max_deviation(flipped, reference))
        assert deviation <= tolerance


def test_options_refuse_methods_they_do_not_apply_to() -> None:
    net, x, targets = tiny_setup(relu_before_tap=True, count=2)
    model = TorchCamModel(net, (16, 16))
    with pytest.raises(InputDataError, match="eigen_smooth does not apply to CAM method 'fem'"):
        cam.explain(model, x.numpy(), method="fem", eigen_smooth=True)
    with pytest.raises(InputDataError, match="aug_smooth does not apply to CAM method 'dff'"):
        cam.explain(model, x.numpy(), method="dff", aug_smooth=True)
    with pytest.raises(InputDataError, match="raw=True"):
        cam.explain(model, x.numpy(), aug_smooth=True, raw=True)
    activations, gradients = random_feature_maps(seed=42)
    with pytest.raises(InputDataError, match="eigen_smooth does not apply"):
        cam.gradient_weighted_cam("eigengradcam", activations, gradients, eigen_smooth=True)
    assert model.run_batch_sizes == []  # refused before any model run


# --- aug_smooth -------------------------------------------------------------------------------

AUG_METHODS = tuple(m for m in cam.AUG_SMOOTH_METHODS if m in REFERENCE_CLASSES)


@pytest.mark.parametrize("method", [m for m in AUG_METHODS if m != "randomcam"])
def test_aug_smooth_matches_pytorch_grad_cam(method: str) -> None:
    net, x, targets = tiny_setup(relu_before_tap=False, count=3, seed=3)
    model = TorchCamModel(net, (16, 16))
    ours, used = cam.explain(model, x.numpy(), method=method, targets=targets, aug_smooth=True)
    np.testing.assert_array_equal(used, targets)
    assert model.run_batch_sizes == [3] * 6  # x, then five flipped or scaled copies
    constructor = {"batch_size": 1} if method == "ablationcam" else {}
    theirs = call_reference(method, net, x, targets, constructor, aug_smooth=True)
    tolerance = 1e-4 if method == "kpcacam" else TINY_TOLERANCE  # KernelPCA: float32 there
    assert ours.shape == theirs.shape and ours.dtype == np.float32
    assert max_deviation(ours, theirs) <= tolerance


def test_aug_smooth_with_eigen_smooth_and_a_flipped_map_size() -> None:
    net, x, targets = tiny_setup(relu_before_tap=True, count=2, seed=4)
    model = TorchCamModel(net, (16, 16))
    ours, _ = cam.explain(
        model, x.numpy(), "gradcam", targets, aug_smooth=True, eigen_smooth=True
    )
    theirs = call_reference("gradcam", net, x, targets, aug_smooth=True, eigen_smooth=True)
    assert max_deviation(ours, theirs) <= 1e-4
    # A horizontally mirrored input gives the mirrored smoothed map (the six inputs are
    # closed under flips), at any output size.
    mirrored = np.ascontiguousarray(x.numpy()[:, :, :, ::-1])
    direct, _ = cam.explain(model, x.numpy(), "layercam", targets, size=(9, 13), aug_smooth=True)
    flipped, _ = cam.explain(model, mirrored, "layercam", targets, size=(9, 13), aug_smooth=True)
    np.testing.assert_allclose(flipped[:, :, ::-1], direct, atol=1e-5)


# --- SobelCAM ---------------------------------------------------------------------------------


def test_sobel_cam_is_opencvs_sobel_filter_in_floating_point() -> None:
    rng = np.random.default_rng(51)
    rgb = rng.uniform(-2, 3, size=(2, 23, 17, 3)).astype(np.float32)
    ours = cam.sobel_cam(rgb.transpose(0, 3, 1, 2))
    for image, mine in zip(rgb, ours, strict=True):
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float64)
        along_x = cv2.Sobel(gray, cv2.CV_64F, 1, 0, ksize=3)
        along_y = cv2.Sobel(gray, cv2.CV_64F, 0, 1, ksize=3)
        np.testing.assert_allclose(mine, 0.5 * np.abs(along_x) + 0.5 * np.abs(along_y), atol=1e-4)
    np.testing.assert_allclose(cam.sobel_cam(rgb, "NHWC"), ours, atol=1e-6)
    np.testing.assert_allclose(
        cam.sobel_cam(rgb[..., :1].transpose(0, 3, 1, 2)),
        cam.sobel_cam(np.repeat(rgb[..., :1], 3, axis=-1), "NHWC"),
        atol=1e-5,
    )


def test_sobel_cam_matches_pytorch_grad_cams_uint8_sobel_cam() -> None:
    # Grey levels 0..60: the uint8 reference neither saturates (|gradient| <= 240) nor
    # rounds the grey conversion (R = G = B); it rounds the final mean to an integer.
    rng = np.random.default_rng(52)
    levels = rng.integers(0, 61, size=(32, 40), dtype=np.uint8)
    picture = np.repeat(levels[:, :, None], 3, axis=2)
    theirs = reference_sobel_cam(picture).astype(np.float64)
    ours = cam.sobel_cam(picture[None].transpose(0, 3, 1, 2).astype(np.float32))[0]
    assert max_deviation(ours, theirs) <= 0.5


def test_sobel_cam_through_explain_and_its_refusals() -> None:
    net, x, targets = tiny_setup(relu_before_tap=True, count=2)
    model = TorchCamModel(net, (16, 16))
    maps, used = cam.explain(model, x.numpy(), method="sobelcam", targets=targets)
    np.testing.assert_array_equal(used, targets)
    np.testing.assert_allclose(maps, cam.postprocess(cam.sobel_cam(x.numpy()), (16, 16)))
    with pytest.raises(InputDataError, match="4 channels"):
        cam.sobel_cam(np.zeros((1, 4, 8, 8), np.float32))


# --- Deep Feature Factorization ------------------------------------------------------------


def test_deep_feature_factorization_matches_pytorch_grad_cam() -> None:
    activations, _ = random_feature_maps(seed=61, shape=(3, 20, 6, 6), signed=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NMF's ConvergenceWarning, the same on both sides
        concepts, explanations = cam.deep_feature_factorization(activations, n_components=4)
        their_concepts, their_explanations = dff(activations.copy(), n_components=4)
    assert concepts.shape == (20, 4) and explanations.shape == (3, 4, 6, 6)
    np.testing.assert_allclose(concepts, their_concepts, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(explanations, their_explanations, rtol=1e-4, atol=1e-4)


def reference_dff_maps(net, x: torch.Tensor, targets) -> tuple[np.ndarray, np.ndarray]:
    """pytorch-grad-cam's DeepFeatureFactorization per image, the classifier on the concepts
    (as its examples run it): the chosen concept's raw map and its processed explanation."""
    factorization = DeepFeatureFactorization(net, net.tap, computation_on_concepts=net.fc)
    raw, processed = [], []
    try:
        for image, target in zip(x, targets, strict=True):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _, explanations, outputs = factorization(image[None], n_components=5)
                with torch.no_grad():
                    activations = net.features(image[None]).numpy()
                _, raw_maps = dff(activations, n_components=5)
            best = int(np.argmax(outputs[:, int(target)]))
            raw.append(raw_maps[0, best])
            processed.append(explanations[0][best])
    finally:
        factorization.activations_and_grads.release()
    return np.stack(raw), np.stack(processed)


def test_dff_through_explain_matches_pytorch_grad_cam() -> None:
    net, x, targets = tiny_setup(relu_before_tap=True, count=3, seed=5)
    model = TorchCamModel(net, (16, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw, used = cam.explain(model, x.numpy(), method="dff", targets=targets, raw=True)
        maps, _ = cam.explain(model, x.numpy(), method="dff", targets=targets)
    np.testing.assert_array_equal(used, targets)
    their_raw, their_processed = reference_dff_maps(net, x, targets)
    scale = float(np.abs(their_raw).max())
    assert max_deviation(raw, their_raw) <= 1e-3 * scale
    # Theirs is min-max scaled and resized; ours is min-max scaled once more after resizing.
    assert max_deviation(maps, scale_cam_image(their_processed)) <= 1e-3


# --- ReciproCAM -------------------------------------------------------------------------------


def reciprocam_by_definition(features, head, x: torch.Tensor, targets) -> np.ndarray:
    """Byun & Lee's Recipro-CAM, OpenVINO-XAI's CNN variant: for each position (i, j) the
    head scores the feature map with every other position zeroed; the target's logits over
    the positions, min-max scaled, are the map."""
    maps = []
    with torch.no_grad():
        for image, target in zip(x, targets, strict=True):
            feature_map = features(image[None])
            _, _, height, width = feature_map.shape
            scores = torch.empty(height, width, dtype=torch.float64)
            for i in range(height):
                for j in range(width):
                    mosaic = torch.zeros_like(feature_map)
                    mosaic[:, :, i, j] = feature_map[:, :, i, j]
                    scores[i, j] = head(mosaic)[0, int(target)].double()
            scores -= scores.min()
            maps.append((scores / scores.max()).numpy())
    return np.stack(maps)


def test_reciprocam_matches_its_definition_on_the_tiny_net() -> None:
    net, x, targets = tiny_setup(relu_before_tap=False, count=3, seed=6)
    model = TorchCamModel(net, (16, 16))
    ours, used = cam.explain(model, x.numpy(), method="reciprocam", size=(8, 8), batch_size=5)
    theirs = reciprocam_by_definition(net.features, net.head, x, used)
    assert max_deviation(ours, theirs) <= 1e-4
    # The mosaics of one image may be split over head calls, and mixed with another's.
    per_head_call = [
        cam.recipro_cam(model.run(x.numpy()).activations, used, model.head_scores, batch_size=b)
        for b in (1, 7, 500)
    ]
    for other in per_head_call[1:]:
        np.testing.assert_allclose(other, per_head_call[0], atol=1e-5)


# --- resnet18 through ONNX --------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18():
    path, tapped, x = torchvision_case("resnet18", count=3)
    return CamModel(str(path)), tapped, x


@pytest.mark.parametrize("method", ["kpcacam", "fem", "randomcam"])
def test_activation_methods_on_resnet18_match_pytorch_grad_cam(resnet18, method) -> None:
    cam_model, tapped, x = resnet18
    np.random.seed(7)
    ours, targets = cam_model.cams(x.numpy(), method=method)
    np.random.seed(7)
    theirs = call_reference(method, tapped, x, targets)
    assert max_deviation(ours, theirs) <= 1e-3


@pytest.mark.parametrize(
    "method, options",
    [
        ("gradcam", {"eigen_smooth": True}),
        ("layercam", {"eigen_smooth": True}),
        ("gradcam", {"aug_smooth": True}),
        ("kpcacam", {"aug_smooth": True}),
    ],
)
def test_options_on_resnet18_match_pytorch_grad_cam(resnet18, method, options) -> None:
    # Score-CAM and Ablation-CAM with the options: tested on the tiny net (C passes each).
    cam_model, tapped, x = resnet18
    targets = np.array([3, 1, 7])
    ours, _ = cam.explain(cam_model, x.numpy(), method, targets, batch_size=64, **options)
    theirs = call_reference(method, tapped, x, targets, **options)
    if "eigen_smooth" in options:
        raw, _ = cam.explain(cam_model, x.numpy(), method, targets, raw=True, **options)
        assert_equal_up_to_projection_sign(ours, raw, theirs, 1e-3)
    else:
        assert max_deviation(ours, theirs) <= 1e-3


def test_dff_on_resnet18_matches_pytorch_grad_cam(resnet18) -> None:
    cam_model, tapped, x = resnet18
    model = tapped.weights.model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw, targets = cam_model.cams(x.numpy(), method="dff", raw=True)
        with torch.no_grad():
            activations = tapped.features(x).numpy()
            for index, target in enumerate(targets):
                concepts, explanations = dff(activations[index : index + 1].copy(), 5)
                outputs = model.fc(torch.from_numpy(concepts.T.astype(np.float32))).numpy()
                expected = explanations[0, int(np.argmax(outputs[:, target]))]
                assert max_deviation(raw[index], expected) <= 1e-3 * float(expected.max())


def test_reciprocam_on_resnet18_matches_its_definition(resnet18) -> None:
    cam_model, tapped, x = resnet18
    ours, targets = cam_model.cams(x.numpy(), method="reciprocam", size=(2, 2))
    theirs = reciprocam_by_definition(tapped.features, tapped.head, x, targets)
    assert max_deviation(ours, theirs) <= 1e-3


class ChannelsLast:
    """The tiny net's stand-in fed channels-last images (layout NHWC)."""

    layout = "NHWC"

    def __init__(self, inner: TorchCamModel) -> None:
        self.inner = inner
        self.input_spatial_size = inner.input_spatial_size

    def run(self, x: np.ndarray, targets=None):
        return self.inner.run(np.ascontiguousarray(x.transpose(0, 3, 1, 2)), targets)

    def scores(self, x: np.ndarray) -> np.ndarray:
        return self.inner.scores(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

    def head_scores(self, activations: np.ndarray) -> np.ndarray:
        return self.inner.head_scores(activations)


@pytest.mark.parametrize("method", ["gradcam", "scorecam", "sobelcam", "reciprocam"])
def test_channels_last_inputs_give_the_same_maps(method: str) -> None:
    net, x, targets = tiny_setup(relu_before_tap=False, count=2, seed=8)
    model = TorchCamModel(net, (16, 16))
    channels_last = np.ascontiguousarray(x.numpy().transpose(0, 2, 3, 1))
    options = {} if method == "sobelcam" else {"aug_smooth": True}
    first, _ = cam.explain(model, x.numpy(), method, targets, **options)
    second, _ = cam.explain(ChannelsLast(model), channels_last, method, targets, **options)
    np.testing.assert_allclose(second, first, atol=1e-5)


def test_reciprocam_gives_a_token_layers_head_its_class_tokens_and_images() -> None:
    """Each mosaic keeps its own image's class tokens and image (OpenVINO-XAI's ViT form
    with ``cls_token=True`` keeps the class token as it is)."""
    rng = np.random.default_rng(71)
    activations = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    class_tokens = rng.standard_normal((2, 4, 1)).astype(np.float32)
    images = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    mixing = rng.standard_normal((5, 4))
    token_mixing = rng.standard_normal((5, 4))

    def head(batch, extra_tokens, images):
        pooled = np.tanh(batch.reshape(len(batch), 4, -1)).mean(axis=2) @ mixing.T
        return pooled + extra_tokens[:, :, 0] @ token_mixing.T + images.mean(axis=(1, 2, 3))[:, None]

    targets = np.array([1, 4])
    ours = cam.recipro_cam(
        activations, targets, head, batch_size=4, extra_tokens=class_tokens, images=images
    )
    for n in range(2):
        expected = np.empty((3, 3))
        for i in range(3):
            for j in range(3):
                mosaic = np.zeros_like(activations[n : n + 1])
                mosaic[..., i, j] = activations[n, :, i, j]
                logits = head(mosaic, class_tokens[n : n + 1], images[n : n + 1])
                expected[i, j] = logits[0, targets[n]]
        np.testing.assert_allclose(ours[n], expected - expected.min(), rtol=1e-5, atol=1e-5)


def test_dff_refuses_a_head_that_needs_more_than_the_activations() -> None:
    net, x, targets = tiny_setup(relu_before_tap=True, count=1)
    model = TorchCamModel(net, (16, 16))
    model.head_inputs = ("extra_tokens",)
    model.layer = "blocks.11"
    with pytest.raises(UnsupportedModelError, match="also needs extra_tokens"):
        cam.explain(model, x.numpy(), method="dff")


# --- the command line on the bundled Fashion-MNIST model -----------------------------------


@pytest.mark.parametrize("method", ["kpcacam", "fem", "sobelcam", "dff", "reciprocam"])
def test_sp2ps_cam_writes_the_apis_maps_for_the_new_methods(method: str, tmp_path) -> None:
    root = Path(__file__).resolve().parents[1]
    model_path, data = root / "models" / "fmnist_cnn.onnx", root / "models" / "samples"
    out = tmp_path / "cams"
    arguments = ["cam", model_path, data / "fmnist_test.npz", "-o", out, "--preset", "unit"]
    arguments += ["--limit", 3, "--method", method, "-q"]
    result = CliRunner().invoke(cli, [str(a) for a in arguments], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    archive = np.load(data / "fmnist_test.npz")
    x = archive["x"][:3].astype(np.float32)[:, None] / 255
    maps, targets = CamModel(str(model_path)).cams(x, method=method, targets=archive["y"][:3])
    rows = list(csv.DictReader((out / "cams.csv").open()))
    assert [int(row["target"]) for row in rows] == targets.tolist()
    for index, row in enumerate(rows):
        saved = np.load(out / f"{Path(row['file']).stem}.npy")
        np.testing.assert_allclose(saved, maps[index], atol=1e-5)


# --- FinerCAM ---------------------------------------------------------------------------------


def test_finer_weights_are_the_gradient_of_finercams_target_score() -> None:
    rng = np.random.default_rng(81)
    scores = (3 * rng.standard_normal((4, 12))).astype(np.float32)
    scores[3] *= 8  # a confident image: the compared classes have tiny probabilities
    targets = np.array([0, 5, 11, int(scores[3].argmax())])
    for alpha in (1.0, 0.6):
        weights, compared = cam.finer_weights(scores, targets, alpha=alpha)
        for row, (target, classes) in enumerate(zip(targets, compared, strict=True)):
            logits = torch.tensor(scores[row], dtype=torch.float64, requires_grad=True)
            score = FinerWeightedTarget(int(target), [int(c) for c in classes], alpha)(logits)
            (expected,) = torch.autograd.grad(score, logits)
            np.testing.assert_allclose(weights[row], expected.numpy(), rtol=1e-9, atol=1e-12)


def reference_finercam(net, x: torch.Tensor, target_idx=None, eigen_smooth=False) -> np.ndarray:
    finer = FinerCAM(net, target_layers=[net.tap])
    try:
        return finer(x, targets=None, target_idx=target_idx, eigen_smooth=eigen_smooth)
    finally:
        finer.base_cam.activations_and_grads.release()


def test_finercam_matches_pytorch_grad_cam_on_the_tiny_net() -> None:
    net, x, _ = tiny_setup(relu_before_tap=False, count=4, seed=9)
    model = TorchCamModel(net, (16, 16))
    ours, used = cam.explain(model, x.numpy(), method="finercam")
    np.testing.assert_array_equal(used, model.scores(x.numpy()).argmax(axis=1))
    assert model.run_batch_sizes == [4] * 4  # the target's run, then the three compared
    assert max_deviation(ours, reference_finercam(net, x)) <= TINY_TOLERANCE
    # A given class: pytorch-grad-cam's target_idx (one class for the whole batch).
    given, _ = cam.explain(model, x.numpy(), method="finercam", targets=2)
    assert max_deviation(given, reference_finercam(net, x, target_idx=2)) <= TINY_TOLERANCE


def test_finercam_on_resnet18_matches_pytorch_grad_cam(resnet18) -> None:
    cam_model, tapped, x = resnet18
    ours, _ = cam_model.cams(x.numpy(), method="finercam")
    assert max_deviation(ours, reference_finercam(tapped, x)) <= 1e-3


def test_finercam_with_eigen_smooth_matches_pytorch_grad_cam() -> None:
    net, x, _ = tiny_setup(relu_before_tap=True, count=3, seed=10)
    model = TorchCamModel(net, (16, 16))
    ours, _ = cam.explain(model, x.numpy(), method="finercam", eigen_smooth=True)
    raw, _ = cam.explain(model, x.numpy(), method="finercam", eigen_smooth=True, raw=True)
    theirs = reference_finercam(net, x, eigen_smooth=True)
    assert_equal_up_to_projection_sign(ours, raw, theirs, TINY_TOLERANCE)
    with pytest.raises(InputDataError, match="aug_smooth does not apply"):
        cam.explain(model, x.numpy(), method="finercam", aug_smooth=True)


def test_finercam_with_a_weighted_seed_takes_one_more_run(resnet18) -> None:
    cam_model, tapped, x = resnet18
    seeded = CamModel(str(cam_model.path), backward=BackwardOptions(weighted_seed=True))
    calls = []
    run = seeded.run
    seeded.run = lambda *args, **kwargs: calls.append(kwargs) or run(*args, **kwargs)
    ours, _ = seeded.cams(x.numpy(), method="finercam")
    assert len(calls) == 2 and "target_weights" in calls[1]
    assert max_deviation(ours, reference_finercam(tapped, x)) <= 1e-3
    four_runs, _ = cam_model.cams(x.numpy(), method="finercam")
    assert max_deviation(ours, four_runs) <= 1e-4
