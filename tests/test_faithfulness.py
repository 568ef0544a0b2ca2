"""Faithfulness metrics against pytorch-grad-cam, direct loops and known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from sp2ps_onnx import faithfulness as fa
from sp2ps_onnx.errors import InputDataError

torch = pytest.importorskip("torch")
road_module = pytest.importorskip("pytorch_grad_cam.metrics.road")
from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange  # noqa: E402
from pytorch_grad_cam.utils.model_targets import (  # noqa: E402
    ClassifierOutputSoftmaxTarget,
    ClassifierOutputTarget,
)

N, C, H, W, CLASSES = 5, 3, 12, 12, 4


class TinyCNN(torch.nn.Module):
    """Random-weight CNN whose flatten + linear head makes the score depend on position."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(C, 6, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(6, 4, 3, padding=1)
        self.head = torch.nn.Linear(4 * H * W, CLASSES)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.head(x.flatten(1))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = TinyCNN().eval()
    with torch.no_grad():
        net.head.weight.mul_(8.0)  # spread the softmax so perturbations move it
    return net


def numpy_score_fn(net, layout="NCHW"):
    def score_fn(images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images))
        if layout == "NHWC":
            x = x.permute(0, 3, 1, 2)
        with torch.no_grad():
            return net(x).numpy()

    return score_fn


@pytest.fixture(scope="module")
def data(model):
    rng = np.random.default_rng(1)
    images = rng.normal(size=(N, C, H, W)).astype(np.float32)
    raw = ndimage.gaussian_filter(rng.random((N, H, W)), sigma=(0, 1.5, 1.5))
    low = raw.min(axis=(1, 2), keepdims=True)
    cams = ((raw - low) / (raw.max(axis=(1, 2), keepdims=True) - low)).astype(np.float32)
    with torch.no_grad():
        targets = model(torch.from_numpy(images)).argmax(1).numpy()
    return images, cams, targets


def _grad_cam_targets(targets, class_score):
    cls = ClassifierOutputSoftmaxTarget if class_score == "softmax" else ClassifierOutputTarget
    return [cls(int(t)) for t in targets]


@pytest.fixture
def noiseless_road(monkeypatch):
    """pytorch-grad-cam's ROAD draws torch noise that NumPy cannot reproduce: compare with
    the noise off on both sides (the noise itself is tested separately)."""
    defaults = road_module.NoisyLinearImputer.__init__.__defaults__
    monkeypatch.setattr(
        road_module.NoisyLinearImputer.__init__, "__defaults__", (0.0, *defaults[1:])
    )


# --------------------------------------------------------------------------- pytorch-grad-cam


@pytest.mark.parametrize("class_score", ["softmax", "raw"])
def test_cam_mult_equals_pytorch_grad_cam(model, data, class_score):
    images, cams, targets = data
    expected = CamMultImageConfidenceChange()(
        torch.from_numpy(images), cams, _grad_cam_targets(targets, class_score), model
    )
    options = fa.FaithfulnessOptions(class_score=class_score, batch_size=2)
    ours = fa.cam_mult_image_confidence_change(
        images, cams, targets, numpy_score_fn(model), options
    )
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)
    assert np.abs(expected).max() > 1e-2  # the check is not vacuous


def test_noisy_linear_impute_equals_pytorch_grad_cam(data):
    images, cams, _ = data
    imputer = road_module.NoisyLinearImputer(noise=0.0)
    for image, cam in zip(images, cams, strict=True):
        keep = cam < np.percentile(cam, 60)
        expected = imputer(torch.from_numpy(image), torch.from_numpy(keep.astype(np.float32)))
        ours = fa.noisy_linear_impute(image, keep)
        np.testing.assert_allclose(ours, expected.numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("class_score", ["softmax", "raw"])
@pytest.mark.parametrize("percentile", [10, 50, 80, 90])
def test_road_morf_lerf_equal_pytorch_grad_cam(
    model, data, noiseless_road, class_score, percentile
):
    images, cams, targets = data
    tensor = torch.from_numpy(images)
    gc_targets = _grad_cam_targets(targets, class_score)
    score_fn = numpy_score_fn(model)
    options = fa.FaithfulnessOptions(road_noise=0.0, class_score=class_score)
    morf = road_module.ROADMostRelevantFirst(percentile)(tensor, cams, gc_targets, model)
    lerf = road_module.ROADLeastRelevantFirst(percentile)(tensor, cams, gc_targets, model)
    np.testing.assert_allclose(
        fa.road_most_relevant_first(
            images, cams, targets, score_fn, options, percentile=percentile
        ),
        morf,
        atol=1e-4,
    )
    np.testing.assert_allclose(
        fa.road_least_relevant_first(
            images, cams, targets, score_fn, options, percentile=percentile
        ),
        lerf,
        atol=1e-4,
    )
    assert np.abs(morf).max() > 1e-3


def test_road_averages_and_combined_equal_pytorch_grad_cam(model, data, noiseless_road):
    images, cams, targets = data
    tensor = torch.from_numpy(images)
    gc_targets = _grad_cam_targets(targets, "softmax")
    score_fn = numpy_score_fn(model)
    percentiles = [20, 40, 60, 80]
    morf = road_module.ROADMostRelevantFirstAverage(percentiles)(tensor, cams, gc_targets, model)
    lerf = road_module.ROADLeastRelevantFirstAverage(percentiles)(tensor, cams, gc_targets, model)
    combined = road_module.ROADCombined(percentiles)(tensor, cams, gc_targets, model)
    noiseless = fa.FaithfulnessOptions(road_noise=0)
    np.testing.assert_allclose(
        fa.road_most_relevant_first(
            images, cams, targets, score_fn, noiseless, percentile=percentiles
        ),
        morf,
        atol=1e-4,
    )
    np.testing.assert_allclose(
        fa.road_least_relevant_first(
            images, cams, targets, score_fn, noiseless, percentile=percentiles
        ),
        lerf,
        atol=1e-4,
    )
    ours = fa.road_combined(
        images,
        cams,
        targets,
        score_fn,
        fa.FaithfulnessOptions(road_percentiles=tuple(percentiles), road_noise=0),
    )
    np.testing.assert_allclose(ours, combined, atol=1e-4)
    result = fa.evaluate_faithfulness(
        images,
        cams,
        targets,
        score_fn,
        fa.FaithfulnessOptions(road_percentiles=(20, 40, 60, 80), road_noise=0),
    )
    np.testing.assert_allclose(result.road_combined, combined, atol=1e-4)
    np.testing.assert_allclose(result.road_morf, morf, atol=1e-4)


def test_road_nhwc_equals_nchw(model, data):
    images, cams, targets = data
    nhwc = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
    a = fa.road_combined(
        images, cams, targets, numpy_score_fn(model), fa.FaithfulnessOptions(seed=3)
    )
    b = fa.road_combined(
        nhwc,
        cams,
        targets,
        numpy_score_fn(model, "NHWC"),
        fa.FaithfulnessOptions(layout="NHWC", seed=3),
    )
    np.testing.assert_allclose(a, b, atol=1e-9)


# --------------------------------------------------------------------------- ROAD imputation


def test_imputation_solves_the_neighbour_mean_equations():
    rng = np.random.default_rng(2)
    image = rng.normal(size=(2, 9, 11))
    keep = rng.random((9, 11)) < 0.4
    keep[0, 0] = True
    out = fa.noisy_linear_impute(image, keep)
    np.testing.assert_array_equal(out[:, keep], image[:, keep])
    for r, c in zip(*np.nonzero(~keep), strict=True):
        total, weight = np.zeros(2), 0.0
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                if (dr, dc) == (0, 0) or not (0 <= r + dr < 9 and 0 <= c + dc < 11):
                    continue
                w = 1 / 12 if dr and dc else 1 / 6
                total += w * out[:, r + dr, c + dc]
                weight += w
        np.testing.assert_allclose(out[:, r, c], total / weight, atol=1e-10)


def test_imputation_noise_has_the_requested_spread():
    rng = np.random.default_rng(4)
    image = rng.normal(size=(1, 64, 64))
    keep = rng.random((64, 64)) < 0.5
    clean = fa.noisy_linear_impute(image, keep)
    noisy = fa.noisy_linear_impute(image, keep, noise=0.05, rng=np.random.default_rng(5))
    np.testing.assert_array_equal(noisy[:, keep], image[:, keep])
    residual = (noisy - clean)[:, ~keep]
    assert residual.std() == pytest.approx(0.05, rel=0.05)
    assert abs(residual.mean()) < 0.005


def test_road_on_constant_cam_is_nan(model, data):
    images, cams, targets = data
    flat = cams.copy()
    flat[1] = 0.5
    morf = fa.road_most_relevant_first(images, flat, targets, numpy_score_fn(model))
    assert math.isnan(morf[1]) and np.isfinite(np.delete(morf, 1)).all()
    with pytest.raises(InputDataError, match="nothing to impute from"):
        fa.noisy_linear_impute(images[0], np.zeros((H, W), bool))


# --------------------------------------------------------------------------- deletion/insertion


def _direct_curve(net, image, cam, target, steps, start, end, class_score):
    """Deletion/insertion the slow, obvious way: one image at a time, a Python sort."""
    height, width = cam.shape
    order = sorted(range(height * width), key=lambda i: (-float(cam.flat[i]), i))
    scores = []
    for k in range(steps + 1):
        count = math.floor(k * height * width / steps + 0.5)
        x = start.copy()
        for pixel in order[:count]:
            r, c = divmod(pixel, width)
            x[:, r, c] = end[:, r, c]
        with torch.no_grad():
            out = net(torch.from_numpy(x[None]).float())[0].double()
        value = torch.softmax(out, 0)[target] if class_score == "softmax" else out[target]
        scores.append(float(value))
    auc = sum((scores[k] + scores[k + 1]) / 2 / steps for k in range(steps))
    return np.array(scores), auc


@pytest.mark.parametrize("class_score", ["softmax", "raw"])
@pytest.mark.parametrize("steps", [16, 7])
def test_deletion_equals_direct_loop(model, data, class_score, steps):
    images, cams, targets = data
    baseline = np.float32(-0.25)
    options = fa.FaithfulnessOptions(steps=steps, class_score=class_score, batch_size=5)
    curve = fa.deletion(images, cams, targets, numpy_score_fn(model), options, baseline=baseline)
    assert curve.fractions[0] == 0 and curve.fractions[-1] == 1
    for i in range(N):
        end = np.full_like(images[i], baseline)
        scores, auc = _direct_curve(
            model, images[i], cams[i], targets[i], steps, images[i], end, class_score
        )
        if steps == 16:  # 144 pixels split evenly: the fractions are exactly k / 16
            np.testing.assert_allclose(curve.auc[i], auc, atol=1e-6)
        np.testing.assert_allclose(curve.scores[i], scores, atol=1e-6)


def test_insertion_equals_direct_loop_from_blur(model, data):
    images, cams, targets = data
    options = fa.FaithfulnessOptions(steps=16, blur_sigma=2.0)
    curve = fa.insertion(images, cams, targets, numpy_score_fn(model), options)
    for i in range(N):
        start = np.stack(
            [ndimage.gaussian_filter(ch, 2.0, mode="nearest") for ch in images[i]]
        ).astype(np.float32)
        scores, auc = _direct_curve(
            model, images[i], cams[i], targets[i], 16, start, images[i], "softmax"
        )
        np.testing.assert_allclose(curve.scores[i], scores, atol=1e-6)
        np.testing.assert_allclose(curve.auc[i], auc, atol=1e-6)


def test_shared_original_scores_and_layouts_agree(model, data):
    images, cams, targets = data
    score_fn = numpy_score_fn(model)
    nhwc = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
    nhwc_fn = numpy_score_fn(model, "NHWC")
    nhwc_options = fa.FaithfulnessOptions(layout="NHWC")
    result = fa.evaluate_faithfulness(images, cams, targets, score_fn)
    alone = fa.deletion(images, cams, targets, score_fn)
    np.testing.assert_allclose(result.deletion_auc, alone.auc, atol=1e-12)
    np.testing.assert_allclose(
        result.insertion_auc, fa.insertion(images, cams, targets, score_fn).auc, atol=1e-12
    )
    np.testing.assert_allclose(
        result.deletion_auc,
        fa.deletion(nhwc, cams, targets, nhwc_fn, nhwc_options).auc,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        result.insertion_auc,
        fa.insertion(nhwc, cams, targets, nhwc_fn, nhwc_options).auc,
        atol=1e-6,
    )
    with torch.no_grad():
        probabilities = torch.softmax(model(torch.from_numpy(images)).double(), 1).numpy()
    expected = probabilities[np.arange(N), targets]
    np.testing.assert_allclose(fa.class_scores(images, targets, score_fn), expected, atol=1e-6)
    np.testing.assert_allclose(result.original_score, expected, atol=1e-6)
    means = result.means()
    assert set(means) >= {"deletion_auc", "insertion_auc", "road_combined", "cam_mult_change"}
    assert 0 <= means["deletion_auc"] <= 1 and 0 <= means["insertion_auc"] <= 1


def test_passes_are_batched(model, data):
    images, cams, targets = data
    calls = []

    def counting(x):
        calls.append(len(x))
        return numpy_score_fn(model)(x)

    fa.deletion(images, cams, targets, counting, fa.FaithfulnessOptions(steps=16, batch_size=32))
    assert sum(calls) == N * 17 and max(calls) == 32


# --------------------------------------------------------------------------- known answers


def _linear_two_class(weights):
    """Logits (w . x, 0): the softmax of class 0 rises strictly with w . x."""

    def score_fn(x):
        evidence = (x.astype(np.float64) * weights).sum(axis=(1, 2, 3))
        return np.stack([evidence, np.zeros_like(evidence)], axis=1)

    return score_fn


def test_true_evidence_gives_the_lowest_deletion_and_highest_insertion():
    rng = np.random.default_rng(7)
    size = 10
    weights = rng.random((1, size, size)) * 0.2
    image = rng.random((1, 1, size, size)) + 0.1
    score_fn = _linear_two_class(weights)
    target = np.array([0])

    def normalised(values):
        values = values - values.min()
        return values / values.max()

    evidence = normalised(weights[0] * image[0, 0])[None]
    random_cams = rng.random((200, size, size))
    reps = np.repeat(image, len(random_cams), axis=0)
    targets = np.zeros(len(random_cams), dtype=int)
    large_batches = fa.FaithfulnessOptions(batch_size=512)
    true_deletion = fa.deletion(image, evidence, target, score_fn).auc[0]
    random_deletion = fa.deletion(reps, random_cams, targets, score_fn, large_batches).auc
    reverse = fa.deletion(image, 1 - evidence, target, score_fn).auc[0]
    assert true_deletion < random_deletion.min()
    assert true_deletion < reverse
    assert reverse > random_deletion.max()

    blur = fa.blurred(image)
    gain = normalised(weights[0] * (image - blur)[0, 0])[None]
    true_insertion = fa.insertion(image, gain, target, score_fn).auc[0]
    random_insertion = fa.insertion(reps, random_cams, targets, score_fn, large_batches).auc
    assert true_insertion > random_insertion.max()

    # A CAM that is the evidence keeps the image almost whole on the pixels that matter
    # (score change small), a reversed one throws them away.
    change_true = fa.cam_mult_image_confidence_change(image, evidence, target, score_fn)
    change_reverse = fa.cam_mult_image_confidence_change(image, 1 - evidence, target, score_fn)
    assert change_true[0] > change_reverse[0]


@pytest.mark.parametrize("ties", ["threshold", "rank"])
def test_road_morf_drops_more_for_true_evidence(ties):
    rng = np.random.default_rng(8)
    size = 16
    weights = np.zeros((1, size, size))
    weights[0, 4:8, 9:13] = 1.0  # the class lives in one block
    image = rng.random((1, 1, size, size))
    image[0, 0, 4:8, 9:13] += 2.0
    score_fn = _linear_two_class(weights - 0.5 * weights.mean())

    def normalised(maps):
        low = maps.min(axis=(1, 2), keepdims=True)
        return (maps - low) / (maps.max(axis=(1, 2), keepdims=True) - low)

    # A little texture so that no two pixels tie (the threshold rule imputes ties).
    evidence = normalised(
        ndimage.gaussian_filter(weights, (0, 1, 1)) + 1e-3 * rng.random((1, size, size))
    )
    random_cams = normalised(ndimage.gaussian_filter(rng.random((50, size, size)), (0, 1, 1)))
    reps = np.repeat(image, len(random_cams), axis=0)
    zeros = np.zeros(len(random_cams), dtype=int)
    opts = fa.FaithfulnessOptions(class_score="raw", road_noise=0.0, road_ties=ties)
    true_morf = fa.road_most_relevant_first(image, evidence, [0], score_fn, opts)[0]
    rand_morf = fa.road_most_relevant_first(reps, random_cams, zeros, score_fn, opts)
    assert true_morf < rand_morf.min()
    true_combined = fa.road_combined(image, evidence, [0], score_fn, opts)[0]
    assert true_combined > fa.road_combined(reps, random_cams, zeros, score_fn, opts).max()


def test_road_rank_rule_imputes_exactly_the_stated_share(data):
    images, cams, _ = data
    tied = cams.copy()
    tied[:, :, : W // 2] = 0  # half of every map tied at zero
    imputed_shares = []

    def spy(x):
        imputed_shares.append(
            [np.mean(np.any(row != images[0], axis=0)) for row in x]  # pixels that changed
        )
        return np.zeros((len(x), 2))

    rank = fa.FaithfulnessOptions(road_ties="rank", road_noise=0.0)
    fa.road_most_relevant_first(images[:1], tied[:1], [0], spy, rank, percentile=[20, 70])
    fa.road_least_relevant_first(images[:1], tied[:1], [0], spy, rank, percentile=[20, 70])
    # the first call of each scores the original image
    assert imputed_shares[1] == pytest.approx([0.8, 0.3], abs=1 / (H * W))
    assert imputed_shares[3] == pytest.approx([0.8, 0.3], abs=1 / (H * W))


def test_road_average_skips_undefined_percentiles(model, data):
    images, cams, targets = data
    tied = cams.copy()
    tied[:, : H // 4] = 0  # a quarter of every map tied at the minimum
    tied[:, H // 4 :] = np.maximum(tied[:, H // 4 :], 1e-3)
    score_fn = numpy_score_fn(model)
    noiseless = fa.FaithfulnessOptions(road_noise=0.0)
    per_percentile = np.stack(
        [
            fa.road_most_relevant_first(images, tied, targets, score_fn, noiseless, percentile=p)
            for p in (10, 20, 50, 80)
        ],
        axis=1,
    )
    assert np.isnan(per_percentile[:, :2]).all() and np.isfinite(per_percentile[:, 2:]).all()
    averaged = fa.road_most_relevant_first(
        images, tied, targets, score_fn, noiseless, percentile=[10, 20, 50, 80]
    )
    np.testing.assert_allclose(averaged, per_percentile[:, 2:].mean(axis=1), atol=1e-6)


# --------------------------------------------------------------------------- errors


def test_clear_errors(model, data):
    images, cams, targets = data
    score_fn = numpy_score_fn(model)
    with pytest.raises(InputDataError, match=r"cams have shape .* need \(5, 12, 12\)"):
        fa.deletion(images, cams[:, :6], targets, score_fn)
    with pytest.raises(InputDataError, match="layout"):
        fa.deletion(images, cams, targets, score_fn, fa.FaithfulnessOptions(layout="CHW"))
    with pytest.raises(InputDataError, match="cams have shape"):
        nhwc = fa.FaithfulnessOptions(layout="NHWC")  # wrong layout named
        fa.deletion(images, cams, targets, score_fn, nhwc)
    with pytest.raises(InputDataError, match=r"in \[0, 1\]"):
        fa.deletion(images, cams * 2, targets, score_fn)
    with pytest.raises(InputDataError, match="targets have shape"):
        fa.deletion(images, cams, targets[:3], score_fn)
    with pytest.raises(InputDataError, match="out of range"):
        fa.deletion(images, cams, targets + CLASSES, score_fn)
    with pytest.raises(InputDataError, match="score_fn returned shape"):
        fa.deletion(images, cams, targets, lambda x: score_fn(x)[:, 0])
    with pytest.raises(InputDataError, match="steps"):
        fa.deletion(images, cams, targets, score_fn, fa.FaithfulnessOptions(steps=0))
    with pytest.raises(InputDataError, match="baseline has shape"):
        fa.deletion(images, cams, targets, score_fn, baseline=np.zeros((2, 2)))
    with pytest.raises(InputDataError, match="class_score"):
        probability = fa.FaithfulnessOptions(class_score="probability")
        fa.insertion(images, cams, targets, score_fn, probability)
    with pytest.raises(InputDataError, match="percentiles"):
        fa.road_most_relevant_first(images, cams, targets, score_fn, percentile=120)
    with pytest.raises(InputDataError, match="original_scores have shape"):
        fa.road_combined(images, cams, targets, score_fn, original_scores=np.zeros(2))
    with pytest.raises(InputDataError, match="original_scores have shape"):
        fa.insertion(images, cams, targets, score_fn, original_scores=np.zeros((N, 1)))
    with pytest.raises(InputDataError, match="images have shape"):
        fa.deletion(images[0], cams, targets, score_fn)
