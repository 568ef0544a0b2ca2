"""Array-level tests of sp2ps_onnx.cam against pytorch-grad-cam's own implementation.

pytorch-grad-cam is the independent truth: its CAM classes are instantiated on a tiny torch
model and their ``get_cam_image`` / ``get_cam_weights`` are called on the same NumPy arrays,
its ``scale_cam_image`` (OpenCV resize) is the reference for the post-processing, and its
full ``__call__`` (torch autograd, torch forward passes) is the reference for Score-CAM,
Ablation-CAM and :func:`sp2ps_onnx.cam.explain`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from references.gradcam import REFERENCE_CLASSES
from sp2ps_onnx import cam
from sp2ps_onnx.errors import InputDataError, Sp2PSError

torch.set_num_threads(2)

NON_EIGEN_GRADIENT_METHODS = tuple(m for m in cam.GRADIENT_METHODS if m != "eigengradcam")
ARRAY_LEVEL_METHODS = cam.GRADIENT_METHODS + cam.EIGEN_METHODS
# Every method with a pytorch-grad-cam BaseCAM class (the others have their own tests).
BASE_CAM_METHODS = tuple(m for m in cam.METHODS if m in REFERENCE_CLASSES)


def array_level_raw_maps(method: str, activations: np.ndarray, gradients: np.ndarray):
    """Raw maps of a gradient or activations-only method (RandomCAM's draws seeded)."""
    if method in cam.EIGEN_METHODS:
        np.random.seed(0)
        return cam.CAM_METHODS[method].compute(activations)
    return cam.gradient_weighted_cam(method, activations, gradients)


class TinyNet(nn.Module):
    """Conv features -> tap (the CAM target layer) -> global average pool -> linear."""

    def __init__(self, relu_before_tap: bool, channels: int = 12, classes: int = 5) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, channels, 3, stride=2, padding=1),
        ]
        if relu_before_tap:
            layers.append(nn.ReLU())
        self.features = nn.Sequential(*layers)
        self.tap = nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, classes)

    def head(self, activations: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(activations), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.tap(self.features(x)))


def make_tiny_net(relu_before_tap: bool, seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(relu_before_tap).eval()


class TorchCamModel:
    """A stand-in for CamModel backed by torch autograd (no ONNX involved)."""

    layout = "NCHW"

    def __init__(self, net: TinyNet, input_size: tuple[int, int]) -> None:
        self.net = net
        self.input_spatial_size = input_size
        self.run_batch_sizes: list[int] = []

    def run(self, x: np.ndarray, targets=None):
        self.run_batch_sizes.append(int(x.shape[0]))
        features = self.net.features(torch.from_numpy(np.ascontiguousarray(x)))
        features = features.detach().requires_grad_(True)
        logits = self.net.head(features)
        if targets is None:
            chosen = logits.argmax(dim=1)
        else:
            chosen = torch.as_tensor(np.asarray(targets), dtype=torch.int64)
        (gradients,) = torch.autograd.grad(logits.gather(1, chosen[:, None]).sum(), features)

        class Result:
            pass

        result = Result()
        result.score = logits.detach().numpy()
        result.activations = features.detach().numpy()
        result.gradients = gradients.numpy()
        result.targets = chosen.numpy()
        return result

    def scores(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.net(torch.from_numpy(np.ascontiguousarray(x))).numpy()

    def head_scores(self, activations: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.net.head(torch.from_numpy(np.ascontiguousarray(activations))).numpy()


def random_feature_maps(
    seed: int, shape=(4, 16, 7, 7), signed: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Activations (ReLU-like with exact zeros, or signed) and gradients with exact zeros."""
    rng = np.random.default_rng(seed)
    activations = rng.standard_normal(shape).astype(np.float32)
    if not signed:
        activations = np.maximum(activations, 0)
    gradients = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    gradients[rng.random(shape) < 0.2] = 0
    return activations, gradients


def reference_raw_map(method: str, activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam's own get_cam_image on NumPy arrays (before ReLU and scaling)."""
    net = make_tiny_net(relu_before_tap=True)
    reference = REFERENCE_CLASSES[method](net, target_layers=[net.tap])
    try:
        return reference.get_cam_image(
            None, net.tap, None, activations.copy(), gradients.copy(), eigen_smooth=False
        )
    finally:
        reference.activations_and_grads.release()


def reference_postprocess(raw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """BaseCAM's path: ReLU, scale_cam_image to (W, H) with cv2, one-layer aggregation."""
    height, width = size
    per_layer = scale_cam_image(np.maximum(raw, 0), (width, height))[:, None]
    return scale_cam_image(np.maximum(per_layer, 0).mean(axis=1))


def assert_close_relative(actual: np.ndarray, expected: np.ndarray, tolerance: float) -> float:
    """Max deviation relative to the reference's scale; fails above ``tolerance``."""
    scale = max(1.0, float(np.abs(expected).max()))
    deviation = float(np.abs(actual.astype(np.float64) - expected).max()) / scale
    assert deviation <= tolerance, f"deviation {deviation:.3g} > {tolerance:g}"
    return deviation


@pytest.mark.parametrize("signed", [False, True], ids=["relu", "signed"])
@pytest.mark.parametrize("method", NON_EIGEN_GRADIENT_METHODS)
def test_gradient_methods_match_pytorch_grad_cam(method: str, signed: bool) -> None:
    activations, gradients = random_feature_maps(seed=1, signed=signed)
    ours = cam.gradient_weighted_cam(method, activations, gradients)
    theirs = reference_raw_map(method, activations, gradients)
    assert ours.shape == theirs.shape == activations.shape[:1] + activations.shape[2:]
    assert ours.dtype == np.float32
    assert_close_relative(ours, theirs, 1e-5)


@pytest.mark.parametrize("method", ["eigencam", "eigengradcam"])
@pytest.mark.parametrize("shape", [(4, 16, 7, 7), (3, 40, 2, 3), (2, 5, 6, 6)])
def test_eigen_methods_match_pytorch_grad_cam_up_to_sign(method: str, shape) -> None:
    activations, gradients = random_feature_maps(seed=2, shape=shape, signed=True)
    if method == "eigencam":
        ours = cam.eigen_cam(activations)
    else:
        ours = cam.gradient_weighted_cam(method, activations, gradients)
    theirs = reference_raw_map(method, activations, gradients)
    for image_ours, image_theirs in zip(ours, theirs, strict=True):
        scale = max(1.0, float(np.abs(image_theirs).max()))
        deviation = min(
            np.abs(image_ours - image_theirs).max(), np.abs(image_ours + image_theirs).max()
        )
        assert deviation / scale <= 1e-5


def test_eigencam_magnitude_does_not_depend_on_sign_of_the_activations() -> None:
    activations, _ = random_feature_maps(seed=3, signed=True)
    positive = cam.eigen_cam(activations)
    negative = cam.eigen_cam(-activations)
    np.testing.assert_allclose(np.abs(positive), np.abs(negative), atol=1e-5)


@pytest.mark.parametrize(
    "feature_size, output_size",
    [
        ((7, 7), (224, 224)),
        ((2, 2), (64, 64)),
        ((7, 5), (30, 41)),
        ((8, 8), (4, 4)),
        ((3, 3), (3, 3)),
    ],
)
def test_postprocess_matches_scale_cam_image(feature_size, output_size) -> None:
    rng = np.random.default_rng(4)
    raw = rng.standard_normal((3, *feature_size)).astype(np.float32) * 5
    ours = cam.postprocess(raw, output_size)
    theirs = reference_postprocess(raw, output_size)
    assert ours.shape == theirs.shape == (3, *output_size)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    assert ours.min() >= 0 and ours.max() <= 1


def test_postprocess_without_size_keeps_feature_resolution() -> None:
    raw = np.random.default_rng(5).standard_normal((2, 6, 4))
    ours = cam.postprocess(raw, None)
    theirs = scale_cam_image(scale_cam_image(np.maximum(raw, 0)))
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("value", [0.0, 3.5, -2.0])
def test_constant_maps_become_zeros(value: float) -> None:
    raw = np.full((2, 7, 7), value, dtype=np.float32)
    processed = cam.postprocess(raw, (32, 32))
    assert not np.isnan(processed).any()
    np.testing.assert_array_equal(processed, np.zeros((2, 32, 32), np.float32))


@pytest.mark.parametrize("method", ARRAY_LEVEL_METHODS)
def test_zero_and_constant_inputs_give_zero_maps_without_nan(method: str) -> None:
    zeros = np.zeros((2, 8, 5, 5), np.float32)
    constant = np.full((2, 8, 5, 5), 0.7, np.float32)
    for activations, gradients in [(zeros, zeros), (constant, zeros), (zeros, constant)]:
        raw = array_level_raw_maps(method, activations, gradients)
        assert not np.isnan(raw).any()
        processed = cam.postprocess(raw, (20, 20))
        assert not np.isnan(processed).any()
        np.testing.assert_array_equal(processed, 0)


@pytest.mark.parametrize("method", ARRAY_LEVEL_METHODS)
def test_maps_do_not_depend_on_the_batch(method: str) -> None:
    activations, gradients = random_feature_maps(seed=6, shape=(32, 24, 7, 7), signed=True)

    together = array_level_raw_maps(method, activations, gradients)
    np.random.seed(0)  # one stream of RandomCAM's draws for the 32 single images
    one_by_one = np.concatenate(
        [
            cam.CAM_METHODS[method].compute(activations[i : i + 1])
            if method in cam.EIGEN_METHODS
            else cam.gradient_weighted_cam(method, activations[i : i + 1], gradients[i : i + 1])
            for i in range(32)
        ]
    )
    np.testing.assert_allclose(together, one_by_one, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(
        cam.postprocess(together, (28, 28)), cam.postprocess(one_by_one, (28, 28)), atol=1e-6
    )


def gap_linear_head(seed: int, channels: int, classes: int):
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((classes, channels))
    bias = rng.standard_normal(classes)

    def head(activations: np.ndarray) -> np.ndarray:
        return activations.mean(axis=(2, 3)) @ weights.T + bias

    return weights, head


def test_gap_linear_head_invariants() -> None:
    """With GAP -> Linear, Grad-CAM is the original CAM, and HiResCAM and XGrad-CAM agree."""
    rng = np.random.default_rng(7)
    activations = np.maximum(rng.standard_normal((5, 10, 6, 6)), 0).astype(np.float32) + 0.01
    weights, head = gap_linear_head(seed=8, channels=10, classes=4)
    targets = head(activations).argmax(axis=1)
    spatial = activations.shape[2] * activations.shape[3]
    # d(mean_hw A_c . W[t, c]) / dA_c = W[t, c] / hw everywhere.
    gradients = np.broadcast_to(
        (weights[targets] / spatial)[:, :, None, None], activations.shape
    ).astype(np.float32)
    class_activation_map = np.einsum("nc,nchw->nhw", weights[targets], activations)

    gradcam = cam.gradient_weighted_cam("gradcam", activations, gradients)
    np.testing.assert_allclose(gradcam * spatial, class_activation_map, rtol=1e-5, atol=1e-5)
    hirescam = cam.gradient_weighted_cam("hirescam", activations, gradients)
    np.testing.assert_allclose(hirescam, gradcam, rtol=1e-5, atol=1e-6)
    xgradcam = cam.gradient_weighted_cam("xgradcam", activations, gradients)
    np.testing.assert_allclose(
        cam.postprocess(xgradcam, None), cam.postprocess(gradcam, None), atol=1e-5
    )
    np.testing.assert_allclose(
        cam.postprocess(gradcam, (24, 24)),
        cam.postprocess(class_activation_map, (24, 24)),
        atol=1e-5,
    )


def test_ablation_with_gap_linear_head_is_weight_times_channel_mean() -> None:
    """Zeroing channel c of a GAP -> Linear head lowers the score by W[t, c] * mean(A_c)."""
    rng = np.random.default_rng(9)
    activations = np.maximum(rng.standard_normal((3, 6, 4, 4)), 0).astype(np.float32)
    activations[:, :, 0, 0] = 0  # the minimum is 0, so ablation zeroes the channel
    weights, head = gap_linear_head(seed=10, channels=6, classes=3)
    targets = np.array([0, 2, 1])
    original = head(activations)[np.arange(3), targets]
    drops = weights[targets] * activations.mean(axis=(2, 3))
    expected = np.einsum("nc,nchw->nhw", drops / original[:, None], activations)
    ours = cam.ablation_cam(activations, targets, head, batch_size=5)
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)


def test_perturbation_methods_do_not_depend_on_their_batch_size() -> None:
    rng = np.random.default_rng(11)
    activations = rng.standard_normal((3, 6, 4, 4)).astype(np.float32)
    images = rng.standard_normal((3, 2, 8, 8)).astype(np.float32)
    weights, head = gap_linear_head(seed=12, channels=6, classes=3)
    projection = rng.standard_normal((6, 2))

    def forward(batch: np.ndarray) -> np.ndarray:
        pooled = batch.mean(axis=(2, 3)) @ projection.T
        return pooled @ weights.T

    targets = np.array([2, 0, 1])
    score_maps = [
        cam.score_cam(images, activations, targets, forward, batch_size=b) for b in (1, 7, 64)
    ]
    ablation_maps = [cam.ablation_cam(activations, targets, head, batch_size=b) for b in (1, 7, 64)]
    for maps in (score_maps, ablation_maps):
        for other in maps[1:]:
            np.testing.assert_allclose(other, maps[0], rtol=1e-5, atol=1e-6)


def test_score_cam_handles_channels_last_inputs() -> None:
    rng = np.random.default_rng(13)
    activations = np.maximum(rng.standard_normal((2, 5, 3, 3)), 0).astype(np.float32)
    images = rng.standard_normal((2, 3, 12, 10)).astype(np.float32)
    mixing = rng.standard_normal((4, 3 * 12 * 10))

    def forward_nchw(batch: np.ndarray) -> np.ndarray:
        return batch.reshape(batch.shape[0], -1) @ mixing.T

    def forward_nhwc(batch: np.ndarray) -> np.ndarray:
        return forward_nchw(batch.transpose(0, 3, 1, 2))

    targets = np.array([1, 3])
    first = cam.score_cam(images, activations, targets, forward_nchw)
    second = cam.score_cam(
        images.transpose(0, 2, 3, 1), activations, targets, forward_nhwc, input_layout="NHWC"
    )
    np.testing.assert_allclose(second, first, rtol=1e-5, atol=1e-6)


def tiny_setup(relu_before_tap: bool, count: int = 3, seed: int = 0):
    net = make_tiny_net(relu_before_tap, seed=seed)
    generator = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(count, 3, 16, 16, generator=generator)
    with torch.no_grad():
        targets = net(x).argsort(dim=1)[:, -2].numpy()  # not the top class: a harder target
    return net, x, targets


def reference_maps(method: str, net: nn.Module, x: torch.Tensor, targets, **kwargs) -> np.ndarray:
    reference = REFERENCE_CLASSES[method](net, target_layers=[net.tap], **kwargs)
    try:
        return reference(x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    finally:
        reference.activations_and_grads.release()


@pytest.mark.parametrize("relu_before_tap", [True, False], ids=["min-zero", "signed"])
def test_score_cam_matches_pytorch_grad_cam(relu_before_tap: bool) -> None:
    net, x, targets = tiny_setup(relu_before_tap)
    model = TorchCamModel(net, (16, 16))
    activations = model.run(x.numpy(), targets).activations
    raw = cam.score_cam(x.numpy(), activations, targets, model.scores, batch_size=5)
    ours = cam.postprocess(raw, (16, 16))
    theirs = reference_maps("scorecam", net, x, targets)
    np.testing.assert_allclose(ours, theirs, atol=1e-2, rtol=0)


@pytest.mark.parametrize("relu_before_tap", [True, False], ids=["min-zero", "signed"])
def test_ablation_cam_matches_pytorch_grad_cam(relu_before_tap: bool) -> None:
    net, x, targets = tiny_setup(relu_before_tap)
    model = TorchCamModel(net, (16, 16))
    activations = model.run(x.numpy(), targets).activations
    minimum_is_zero = [float(a.min()) == 0.0 for a in activations]
    assert all(minimum_is_zero) if relu_before_tap else not any(minimum_is_zero)
    raw = cam.ablation_cam(activations, targets, model.head_scores, batch_size=7)
    ours = cam.postprocess(raw, (16, 16))
    # With negative activations pytorch-grad-cam's AblationLayer subtracts 1e7 once more for
    # every earlier row of its batch; batch_size=1 is its plain "min - 1e7" ablation.
    reference_batch = 32 if relu_before_tap else 1
    theirs = reference_maps("ablationcam", net, x, targets, batch_size=reference_batch)
    np.testing.assert_allclose(ours, theirs, atol=1e-2, rtol=0)


@pytest.mark.parametrize("method", BASE_CAM_METHODS)
def test_explain_matches_pytorch_grad_cam_end_to_end(method: str) -> None:
    net, x, targets = tiny_setup(relu_before_tap=False, count=5, seed=1)
    model = TorchCamModel(net, (16, 16))
    # RandomCAM: both draw from NumPy's global generator, ours in batches of 2, 2 and 1 of
    # the same stream of uniform numbers as pytorch-grad-cam's one (5, C) draw.
    np.random.seed(3)
    ours, used = cam.explain(model, x.numpy(), method=method, targets=targets, batch_size=2)
    assert model.run_batch_sizes == [2, 2, 1]
    np.testing.assert_array_equal(used, targets)
    kwargs = {"batch_size": 1} if method == "ablationcam" else {}
    np.random.seed(3)
    theirs = reference_maps(method, net, x, targets, **kwargs)
    tolerance = 1e-2 if method in cam.PERTURBATION_METHODS else 1e-5
    if method in ("eigencam", "eigengradcam"):
        # Same SVD routine on (nearly) the same arrays: the same sign is expected.
        tolerance = 1e-4
    if method == "kpcacam":
        # scikit-learn builds and decomposes the kernel matrix in float32, we in float64.
        tolerance = 1e-4
    np.testing.assert_allclose(ours, theirs, atol=tolerance, rtol=0)


def test_explain_defaults_to_the_top_class_and_the_model_input_size() -> None:
    net, x, _ = tiny_setup(relu_before_tap=True, count=4)
    model = TorchCamModel(net, (16, 16))
    maps, used = cam.explain(model, x.numpy(), method="gradcam")
    np.testing.assert_array_equal(used, model.scores(x.numpy()).argmax(axis=1))
    assert maps.shape == (4, 16, 16) and maps.dtype == np.float32
    theirs = reference_maps("gradcam", net, x, used)
    np.testing.assert_allclose(maps, theirs, atol=1e-5, rtol=0)
    raw, _ = cam.explain(model, x.numpy(), method="gradcam", raw=True)
    assert raw.shape == (4, 8, 8)
    resized, _ = cam.explain(model, x.numpy(), method="gradcam", size=(20, 12), targets=3)
    assert resized.shape == (4, 20, 12)
    np.testing.assert_allclose(
        resized, cam.postprocess(cam.explain(model, x.numpy(), targets=3, raw=True)[0], (20, 12))
    )


def test_bad_inputs_raise_clear_errors() -> None:
    activations, gradients = random_feature_maps(seed=14)
    with pytest.raises(Sp2PSError, match=r"unknown CAM method 'gradcam\+'"):
        cam.gradient_weighted_cam("gradcam+", activations, gradients)
    with pytest.raises(InputDataError, match="same shape"):
        cam.gradient_weighted_cam("gradcam", activations, gradients[:, :3])
    with pytest.raises(InputDataError, match=r"\(N, C, h, w\)"):
        cam.eigen_cam(activations[0])
    net, x, _ = tiny_setup(relu_before_tap=True, count=2)
    with pytest.raises(InputDataError, match="2 targets for 3"):
        cam.explain(
            TorchCamModel(net, (16, 16)), np.zeros((3, 3, 16, 16), np.float32), targets=[1, 2]
        )


@pytest.mark.parametrize(
    "source, target", [((7, 7), (64, 64)), ((3, 5), (17, 40)), ((1, 4), (9, 9))]
)
def test_score_cam_upsampling_is_torch_bilinear_with_aligned_corners(source, target) -> None:
    maps = np.random.default_rng(15).standard_normal((4, *source)).astype(np.float32)
    ours = cam._upsample_align_corners(maps, target)
    theirs = nn.UpsamplingBilinear2d(size=target)(torch.from_numpy(maps)[:, None])[:, 0]
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-5, rtol=0)
