"""Sp2PS metric: properties that must hold, and agreement with independent references
(scikit-image SSIM, full-spectrum NumPy FFT, np.corrcoef, plain loops)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage
from skimage.metrics import structural_similarity

from sp2ps_onnx import Sp2PSError
from sp2ps_onnx import metric as m

SIZE = 96


def blob(center=(48.0, 48.0), sigma=8.0, size=(SIZE, SIZE)) -> np.ndarray:
    rows, cols = np.mgrid[0 : size[0], 0 : size[1]].astype(np.float64)
    return np.exp(-((rows - center[0]) ** 2 + (cols - center[1]) ** 2) / (2 * sigma**2))


def smooth_maps(rng, n, shape, smoothing=3.0) -> np.ndarray:
    raw = ndimage.gaussian_filter(rng.random((n, *shape)), (0, smoothing, smoothing))
    return m.normalize_maps(raw)


def skimage_ssim(p, q, sigma=1.5) -> float:
    return structural_similarity(
        p, q, data_range=1.0, gaussian_weights=True, sigma=sigma, use_sample_covariance=False
    )


def numpy_tv(p, q) -> float:
    """The definition, written directly on the full FFT2 of one pair."""
    mp = np.abs(np.fft.fft2(p))
    mq = np.abs(np.fft.fft2(q))
    mp[0, 0] = 0.0
    mq[0, 0] = 0.0
    if mp.sum() == 0 and mq.sum() == 0:
        return 1.0
    if mp.sum() == 0 or mq.sum() == 0:
        return 0.0
    return 1.0 - 0.5 * np.abs(mp / mp.sum() - mq / mq.sum()).sum()


COMBOS = [(s, f) for s in m.SPATIAL for f in m.SPECTRAL]


# --------------------------------------------------------------------------- references


@pytest.mark.parametrize(
    "shape", [(28, 28), (11, 11), (12, 40), (37, 61), (64, 48), (224, 224)]
)
def test_ssim_matches_skimage(shape):
    rng = np.random.default_rng(sum(shape))
    n = 2 if shape == (224, 224) else 5
    P = smooth_maps(rng, n, shape, smoothing=2.0)
    Q = smooth_maps(rng, n, shape, smoothing=2.0)
    expected = np.array([skimage_ssim(p, q) for p, q in zip(P, Q, strict=True)])
    np.testing.assert_allclose(m.ssim_batch(P, Q), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(m.ssim_batch(P, Q, workers=2), expected, rtol=0, atol=1e-6)


def test_ssim_matches_skimage_other_sigma_and_float32_input():
    rng = np.random.default_rng(1)
    P = smooth_maps(rng, 3, (40, 33)).astype(np.float32)
    Q = smooth_maps(rng, 3, (40, 33)).astype(np.float32)
    P64, Q64 = P.astype(np.float64), Q.astype(np.float64)
    for sigma in (1.0, 2.0):
        expected = [skimage_ssim(p, q, sigma=sigma) for p, q in zip(P64, Q64, strict=True)]
        np.testing.assert_allclose(m.ssim_batch(P, Q, sigma=sigma), expected, atol=1e-6)


def test_ssim_batch_chunks_do_not_mix_samples():
    # Many samples span several chunks; each result must only depend on its own pair.
    rng = np.random.default_rng(2)
    P = smooth_maps(rng, 40, (64, 64))
    Q = smooth_maps(rng, 40, (64, 64))
    together = m.ssim_batch(P, Q)
    alone = np.array([m.ssim_batch(P[i], Q[i])[0] for i in (0, 17, 39)])
    np.testing.assert_allclose(together[[0, 17, 39]], alone, rtol=0, atol=1e-12)


def test_ssim_rejects_maps_smaller_than_window():
    with pytest.raises(m.MetricInputError, match="smaller than the 11x11"):
        m.ssim_batch(np.zeros((10, 30)), np.zeros((10, 30)))
    with pytest.raises(m.MetricInputError, match="smaller than the 11x11"):
        m.sp2ps(np.zeros((3, 30, 10)), np.zeros((3, 30, 10)))


@pytest.mark.parametrize("shape", [(28, 28), (31, 20), (20, 31)])
def test_spectral_tv_matches_full_fft_definition(shape):
    rng = np.random.default_rng(3)
    P = smooth_maps(rng, 4, shape)
    Q = smooth_maps(rng, 4, shape)
    expected = [numpy_tv(p, q) for p, q in zip(P, Q, strict=True)]
    np.testing.assert_allclose(m.spectral_tv(P, Q), expected, rtol=0, atol=1e-12)


def test_spectral_cosine_matches_full_fft():
    rng = np.random.default_rng(4)
    P = smooth_maps(rng, 4, (30, 27))
    Q = smooth_maps(rng, 4, (30, 27))
    expected = []
    for p, q in zip(P, Q, strict=True):
        a = np.abs(np.fft.fft2(p)).ravel()[1:]
        b = np.abs(np.fft.fft2(q)).ravel()[1:]
        expected.append(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    np.testing.assert_allclose(m.spectral_cosine(P, Q), expected, rtol=0, atol=1e-12)


def test_pearson_matches_corrcoef_clipped():
    rng = np.random.default_rng(5)
    P = smooth_maps(rng, 6, (24, 24))
    Q = np.concatenate([smooth_maps(rng, 3, (24, 24)), 1.0 - P[3:]])
    expected = [
        max(0.0, np.corrcoef(p.ravel(), q.ravel())[0, 1]) for p, q in zip(P, Q, strict=True)
    ]
    got = m.pearson_similarity(P, Q)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert np.all(got[3:] == 0.0)  # anti-correlated maps share no attention


def test_topk_iou_matches_sorted_masks():
    rng = np.random.default_rng(6)
    P = smooth_maps(rng, 5, (20, 30))
    Q = smooth_maps(rng, 5, (20, 30))
    for fraction in (0.1, 0.25):
        k = math.ceil(fraction * 600)
        expected = []
        for p, q in zip(P, Q, strict=True):
            top_p = set(np.argsort(p.ravel())[::-1][:k].tolist())
            top_q = set(np.argsort(q.ravel())[::-1][:k].tolist())
            expected.append(len(top_p & top_q) / len(top_p | top_q))
        np.testing.assert_allclose(m.topk_iou(P, Q, fraction=fraction), expected, atol=1e-12)


def test_harmonic_definition():
    s = np.array([0.0, 0.0, 1.0, 0.3, 0.8])
    f = np.array([0.0, 0.5, 1.0, 0.6, 0.2])
    expected = [0.0, 0.0, 1.0, 2 * 0.3 * 0.6 / 0.9, 2 * 0.8 * 0.2 / 1.0]
    np.testing.assert_allclose(m.harmonic(s, f), expected, rtol=1e-15)


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize(("spatial", "spectral"), COMBOS)
def test_identical_maps_score_one(spatial, spectral):
    rng = np.random.default_rng(7)
    P = smooth_maps(rng, 3, (32, 40))
    P[2] = 0.0  # two empty maps are identical too
    per = m.sp2ps(P, P.copy(), spatial, spectral)
    np.testing.assert_allclose(per.spatial, 1.0, atol=1e-12)
    np.testing.assert_allclose(per.spectral, 1.0, atol=1e-12)
    np.testing.assert_allclose(per.h, 1.0, atol=1e-12)


@pytest.mark.parametrize(("spatial", "spectral"), COMBOS)
def test_symmetric_and_in_unit_range(spatial, spectral):
    rng = np.random.default_rng(8)
    P = smooth_maps(rng, 6, (33, 33), smoothing=1.0)
    Q = smooth_maps(rng, 6, (33, 33), smoothing=1.0)
    Q[0] = 1.0 - P[0]  # strongly negative SSIM and correlation, clipped to 0
    forward = m.sp2ps(P, Q, spatial, spectral)
    backward = m.sp2ps(Q, P, spatial, spectral)
    for name in ("spatial", "spectral", "h"):
        a = getattr(forward, name)
        np.testing.assert_allclose(a, getattr(backward, name), rtol=0, atol=1e-12)
        assert a.shape == (6,) and a.dtype == np.float64
        assert np.all((a >= 0.0) & (a <= 1.0))
    if spatial in ("ssim", "pearson"):
        assert forward.spatial[0] == 0.0


@pytest.mark.parametrize(("spatial", "spectral"), COMBOS)
def test_sp2ps_equals_its_public_parts(spatial, spectral):
    # sp2ps() runs the built-in components chunk by chunk on threads; it must give what
    # normalising and calling the registered functions on the whole batch gives.
    rng = np.random.default_rng(22)
    raw_p = (ndimage.gaussian_filter(rng.random((9, 30, 26)), (0, 2, 2)) * 5).astype(np.float32)
    raw_q = ndimage.gaussian_filter(rng.random((9, 30, 26)), (0, 2, 2)) - 3.0
    raw_p[4] = 2.0
    raw_q[6] = 0.0
    P, Q = m.normalize_maps(raw_p), m.normalize_maps(raw_q)
    s = m.SPATIAL[spatial](P, Q)
    f = m.SPECTRAL[spectral](P, Q)
    per = m.sp2ps(raw_p, raw_q, spatial, spectral)
    np.testing.assert_allclose(per.spatial, s, rtol=0, atol=1e-12)
    np.testing.assert_allclose(per.spectral, f, rtol=0, atol=1e-12)
    np.testing.assert_allclose(per.h, m.harmonic(s, f), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("spatial", "spectral"), [*COMBOS, ("half", "tv")])
def test_one_original_against_many_equals_each_pair(monkeypatch, spatial, spectral):
    # sp2ps_many() does the original's share of the work once per chunk; every pruned
    # model must get what its own sp2ps() call gives, with maps of mixed dtypes, constant
    # maps, several chunks and threads, and a user-registered component ("half").
    monkeypatch.setitem(m.SPATIAL, "half", lambda P, Q: np.full(np.asarray(P).shape[0], 0.5))
    monkeypatch.setattr(m, "_CHUNK_PIXELS", 3 * 30 * 26)  # 3 samples per chunk
    rng = np.random.default_rng(23)
    raw_p = (ndimage.gaussian_filter(rng.random((10, 30, 26)), (0, 2, 2)) * 5).astype(np.float32)
    raw_p[4] = 2.0
    raw_qs = []
    for j in range(4):
        q = ndimage.gaussian_filter(rng.random((10, 30, 26)), (0, 2, 2)) - j
        q[(j + 3) % 10] = 0.0
        raw_qs.append(q.astype(np.float32) if j % 2 else q)
    raw_qs.append(raw_p.copy())
    many = m.sp2ps_many(raw_p, raw_qs, spatial, spectral, workers=3)
    assert len(many) == len(raw_qs)
    for q, got in zip(raw_qs, many, strict=True):
        alone = m.sp2ps(raw_p, q, spatial, spectral, workers=1)
        for field in ("spatial", "spectral", "h"):
            np.testing.assert_array_equal(getattr(got, field), getattr(alone, field))
    if spatial != "half":  # a map against itself
        np.testing.assert_allclose(many[-1].h, 1.0, rtol=0, atol=1e-12)
    assert m.sp2ps_many(raw_p, [], spatial, spectral) == []


def test_one_original_against_many_checks_every_batch():
    P = np.random.default_rng(0).random((3, 16, 16))
    with pytest.raises(m.MetricInputError, match="differ in shape"):
        m.sp2ps_many(P, [P, P[:2]])
    bad = P.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(m.MetricInputError, match=r"Q \(pruned CAMs\)\[1\]"):
        m.sp2ps_many(P, [P, bad])


def test_shift_drops_spatial_but_keeps_spectral():
    reference = blob()
    previous = 1.0
    for shift in (4, 12, 24):
        moved = blob(center=(48.0, 48.0 + shift))
        per = m.sp2ps(reference, moved)
        assert per.spatial[0] < previous - 0.02
        assert per.spectral[0] >= 0.95
        previous = per.spatial[0]
    assert previous < 0.7


def test_rescaling_blob_drops_spectral():
    reference = blob(sigma=8.0)
    previous = 1.0
    for sigma in (10.0, 14.0, 20.0):
        per = m.sp2ps(reference, blob(sigma=sigma))
        assert per.spectral[0] < previous - 0.02
        previous = per.spectral[0]
    assert previous < 0.7


def test_noise_drops_both():
    rng = np.random.default_rng(9)
    reference = blob()
    noise = rng.standard_normal(reference.shape)
    previous = m.sp2ps(reference, reference)
    for level in (0.05, 0.2, 0.5):
        per = m.sp2ps(reference, reference + level * noise)
        assert per.spatial[0] < previous.spatial[0] - 0.02
        assert per.spectral[0] < previous.spectral[0] - 0.02
        previous = per
    assert previous.h[0] < 0.5


@pytest.mark.parametrize(("spatial", "spectral"), COMBOS)
def test_empty_versus_nonempty_map_scores_zero(spatial, spectral):
    rng = np.random.default_rng(10)
    P = smooth_maps(rng, 3, (32, 32))
    empty = np.zeros_like(P)
    empty[1] = 0.7  # a constant map is as empty as an all-zero one
    for a, b in ((P, empty), (empty, P)):
        per = m.sp2ps(a, b, spatial, spectral)
        assert np.all(per.h == 0.0)
        assert np.all(per.spectral == 0.0)


def test_positive_factor_before_normalisation_changes_nothing():
    rng = np.random.default_rng(11)
    raw_p = ndimage.gaussian_filter(rng.random((4, 40, 40)), (0, 3, 3)) * 7.0 - 1.0
    raw_q = ndimage.gaussian_filter(rng.random((4, 40, 40)), (0, 3, 3)) * 0.01
    raw_p[3] = 2.5  # a constant map stays all zeros at any scale
    base = m.sp2ps(raw_p, raw_q)
    for factor in (1e-6, 0.37, 3.0, 1e5):
        np.testing.assert_allclose(
            m.normalize_maps(factor * raw_p), m.normalize_maps(raw_p), rtol=0, atol=1e-12
        )
        scaled = m.sp2ps(factor * raw_p, 2.0 * factor * raw_q)
        for name in ("spatial", "spectral", "h"):
            np.testing.assert_allclose(
                getattr(scaled, name), getattr(base, name), rtol=0, atol=1e-10
            )


def test_normalize_maps_range_and_constant_maps():
    rng = np.random.default_rng(12)
    maps = rng.normal(size=(3, 9, 7)) * 5
    maps[1] = 0.0
    maps[2] = -3.0
    out = m.normalize_maps(maps)
    assert out[0].min() == 0.0 and out[0].max() == 1.0
    assert np.all(out[1:] == 0.0)
    single = m.normalize_maps(maps[0])
    assert single.shape == (9, 7)
    np.testing.assert_array_equal(single, out[0])
    # Rounding noise on a flat float32 CAM is not blown up to a full-range pattern.
    flat = np.full((8, 8), 0.3, dtype=np.float32)
    flat[0, 0] = np.nextafter(np.float32(0.3), np.float32(1.0))
    assert np.all(m.normalize_maps(flat) == 0.0)


def test_empty_batch_gives_empty_results():
    for spatial, spectral in COMBOS:
        per = m.sp2ps(np.zeros((0, 20, 20)), np.zeros((0, 20, 20)), spatial, spectral)
        assert per.spatial.shape == per.spectral.shape == per.h.shape == (0,)


def test_input_errors_are_clear():
    with pytest.raises(m.MetricInputError, match="differ in shape"):
        m.sp2ps(np.zeros((2, 20, 20)), np.zeros((2, 20, 21)))
    bad = np.zeros((2, 20, 20))
    bad[1, 3, 3] = np.nan
    with pytest.raises(m.MetricInputError, match=r"\[1\] contains NaN"):
        m.sp2ps(bad, np.zeros((2, 20, 20)))
    with pytest.raises(Sp2PSError):
        m.sp2ps(np.zeros((2, 1, 20, 20)), np.zeros((2, 1, 20, 20)))


# --------------------------------------------------------------------------- registries


def test_unknown_names_list_valid_ones():
    for kwargs, valid in (
        ({"spatial": "ssim2"}, m.SPATIAL),
        ({"spectral": "l2"}, m.SPECTRAL),
        ({"aggregation": "median"}, m.AGGREGATIONS),
    ):
        with pytest.raises(ValueError) as info:
            m.Sp2PSAccumulator(**kwargs)
        for name in valid:
            assert repr(name) in str(info.value)
    with pytest.raises(ValueError, match="'ssim', 'pearson', 'iou'"):
        m.sp2ps(np.zeros((20, 20)), np.zeros((20, 20)), spatial="nope")


def test_adding_a_component_is_one_registry_entry(monkeypatch):
    def always_half(P, Q):
        return np.full(np.asarray(P).shape[0], 0.5)

    monkeypatch.setitem(m.SPATIAL, "half", always_half)
    rng = np.random.default_rng(13)
    P = smooth_maps(rng, 4, (24, 24))
    acc = m.Sp2PSAccumulator(spatial="half")
    acc.update(P, P)
    result = acc.result()
    assert result.mean_spatial == 0.5
    assert result.sp2ps == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert result.config["spatial"] == "half"


# --------------------------------------------------------------------------- accumulator


def make_batch(rng, n, k=5, shape=(24, 24)):
    P = smooth_maps(rng, n, shape, smoothing=2.0)
    Q = np.clip(P + 0.3 * smooth_maps(rng, n, shape, smoothing=1.0), 0, None)
    labels = rng.integers(0, 3, n)
    orig = rng.normal(size=(n, k)) * 2
    pruned = orig + rng.normal(size=(n, k))
    targets = orig.argmax(axis=1)
    return P, Q, labels, targets, orig, pruned


def assert_results_equal(a: m.Sp2PSResult, b: m.Sp2PSResult):
    da, db = a.to_dict(), b.to_dict()
    assert da.keys() == db.keys()
    for key in da:
        if key in ("config", "n", "ci95", "per_sample", "median_h", "p05_h"):
            assert da[key] == db[key], key
        elif isinstance(da[key], dict):
            assert da[key].keys() == db[key].keys()
            np.testing.assert_allclose(list(da[key].values()), list(db[key].values()), 1e-12)
        elif da[key] is None:
            assert db[key] is None, key
        else:
            assert da[key] == pytest.approx(db[key], rel=1e-12, abs=1e-14), key


@pytest.mark.parametrize("aggregation", list(m.AGGREGATIONS))
def test_streaming_equals_one_shot(aggregation):
    rng = np.random.default_rng(14)
    batches = [make_batch(rng, n) for n in (7, 1, 12)]
    streamed = m.Sp2PSAccumulator(aggregation=aggregation, n_bootstrap=200, seed=3)
    for P, Q, labels, targets, orig, pruned in batches:
        streamed.update(
            P, Q, labels, targets=targets, original_scores=orig, pruned_scores=pruned
        )
    joined = [np.concatenate(parts) for parts in zip(*batches, strict=True)]
    P, Q, labels, targets, orig, pruned = joined
    one_shot = m.Sp2PSAccumulator(aggregation=aggregation, n_bootstrap=200, seed=3)
    one_shot.update(P, Q, labels, targets=targets, original_scores=orig, pruned_scores=pruned)
    assert_results_equal(streamed.result(), one_shot.result())


def test_result_statistics_and_companions_match_direct_numpy():
    rng = np.random.default_rng(15)
    P, Q, labels, targets, orig, pruned = make_batch(rng, 30)
    targets = targets.copy()
    targets[::4] = 1  # explain a class other than the top-1 for some samples
    acc = m.Sp2PSAccumulator(n_bootstrap=0)
    acc.update(P, Q, labels, targets=targets, original_scores=orig, pruned_scores=pruned)
    result = acc.result()

    per = m.sp2ps(P, Q)
    h = per.h
    assert result.n == 30
    assert result.sp2ps == pytest.approx(h.mean(), rel=1e-12)
    assert result.mean_spatial == pytest.approx(per.spatial.mean(), rel=1e-12)
    assert result.mean_spectral == pytest.approx(per.spectral.mean(), rel=1e-12)
    assert result.median_h == pytest.approx(np.median(h), abs=1e-6)
    assert result.p05_h == pytest.approx(np.percentile(h, 5), abs=1e-6)
    assert result.attention_lost == np.mean(h < 0.5)
    s_bar, f_bar = per.spatial.mean(), per.spectral.mean()
    assert result.harmonic_of_means == pytest.approx(2 * s_bar * f_bar / (s_bar + f_bar))
    assert result.ci95 is None

    per_class = {c: h[labels == c].mean() for c in np.unique(labels).tolist()}
    assert result.per_class_h.keys() == per_class.keys()
    for c, value in per_class.items():
        assert result.per_class_h[c] == pytest.approx(value, rel=1e-12)
    assert result.class_weighted_h == pytest.approx(np.mean(list(per_class.values())))
    # Weighting the per-class means by class frequency gives back the plain mean.
    frequency = {c: np.mean(labels == c) for c in per_class}
    assert sum(frequency[c] * v for c, v in per_class.items()) == pytest.approx(result.sp2ps)

    top_o, top_p = orig.argmax(1), pruned.argmax(1)
    assert result.top1_agreement == np.mean(top_o == top_p)
    assert result.accuracy_original == np.mean(top_o == labels)
    assert result.accuracy_pruned == np.mean(top_p == labels)
    changes = []
    for i in range(30):
        so = np.exp(orig[i]) / np.exp(orig[i]).sum()
        sp = np.exp(pruned[i]) / np.exp(pruned[i]).sum()
        changes.append(abs(so[targets[i]] - sp[targets[i]]))
    assert result.mean_abs_confidence_change == pytest.approx(np.mean(changes), rel=1e-12)

    table = result.per_sample
    np.testing.assert_allclose(table["h"], h, rtol=1e-6)
    assert table["h"].dtype == np.float32
    np.testing.assert_array_equal(table["class"], labels)


def test_confidence_change_defaults_to_original_top1_and_groups_by_targets():
    rng = np.random.default_rng(16)
    P, Q, _, targets, orig, pruned = make_batch(rng, 10)
    acc = m.Sp2PSAccumulator(n_bootstrap=0)
    acc.update(P, Q, original_scores=orig, pruned_scores=pruned)
    result = acc.result()
    with_targets = m.Sp2PSAccumulator(n_bootstrap=0)
    with_targets.update(P, Q, targets=targets, original_scores=orig, pruned_scores=pruned)
    other = with_targets.result()
    assert result.mean_abs_confidence_change == pytest.approx(other.mean_abs_confidence_change)
    assert result.accuracy_original is None and result.accuracy_pruned is None
    assert result.per_class_h == {} and result.class_weighted_h is None
    assert set(other.per_class_h) == set(np.unique(targets).tolist())


def test_without_scores_companions_are_none_and_class_weighted_needs_classes():
    rng = np.random.default_rng(17)
    P, Q, labels, *_ = make_batch(rng, 6)
    acc = m.Sp2PSAccumulator(keep_per_sample=False)
    acc.update(P, Q, labels)
    result = acc.result()
    assert result.top1_agreement is None and result.mean_abs_confidence_change is None
    assert result.median_h is None and result.ci95 is None and result.per_sample is None
    assert result.sp2ps == pytest.approx(m.sp2ps(P, Q).h.mean())
    with pytest.raises(ValueError, match="needs the class"):
        m.Sp2PSAccumulator(aggregation="class-weighted").update(P, Q)
    with pytest.raises(ValueError, match="no CAM pairs"):
        m.Sp2PSAccumulator().result()


def test_class_weighted_aggregation_balances_classes():
    rng = np.random.default_rng(18)
    P, Q, *_ = make_batch(rng, 20)
    labels = np.array([0] * 17 + [1] * 3)
    acc = m.Sp2PSAccumulator(aggregation="class-weighted", n_bootstrap=100)
    acc.update(P, Q, labels)
    result = acc.result()
    h = m.sp2ps(P, Q).h
    balanced = 0.5 * (h[:17].mean() + h[17:].mean())
    assert result.sp2ps == pytest.approx(balanced, rel=1e-12)
    assert result.class_weighted_h == pytest.approx(balanced, rel=1e-12)
    assert result.ci95[0] <= result.sp2ps <= result.ci95[1]


def test_bootstrap_ci_contains_mean_and_is_reproducible():
    rng = np.random.default_rng(19)
    P, Q, labels, *_ = make_batch(rng, 40)

    def run(seed):
        acc = m.Sp2PSAccumulator(n_bootstrap=500, seed=seed)
        acc.update(P, Q, labels)
        return acc.result()

    first, again, other = run(0), run(0), run(1)
    low, high = first.ci95
    assert low < first.sp2ps < high
    assert first.ci95 == again.ci95
    assert first.ci95 != other.ci95
    # A percentile bootstrap of the mean is about +-1.96 standard errors wide.
    h = m.sp2ps(P, Q).h
    standard_error = h.std() / np.sqrt(h.size)
    assert 0.7 * 3.92 * standard_error < high - low < 1.3 * 3.92 * standard_error


def test_to_dict_is_json_serialisable():
    rng = np.random.default_rng(20)
    P, Q, labels, targets, orig, pruned = make_batch(rng, 5)
    acc = m.Sp2PSAccumulator(n_bootstrap=50)
    acc.update(P, Q, labels, targets=targets, original_scores=orig, pruned_scores=pruned)
    data = json.loads(json.dumps(acc.result().to_dict()))
    assert data["n"] == 5
    assert isinstance(data["ci95"], list) and len(data["ci95"]) == 2
    assert all(isinstance(key, str) for key in data["per_class_h"])
    assert len(data["per_sample"]["h"]) == 5
    assert data["config"]["definition"] == "Sp2PS v1"


def test_update_rejects_bad_labels_and_scores():
    rng = np.random.default_rng(21)
    P, Q, labels, _, orig, pruned = make_batch(rng, 4)
    acc = m.Sp2PSAccumulator()
    with pytest.raises(m.MetricInputError, match="4 integer class indices"):
        acc.update(P, Q, labels[:3])
    with pytest.raises(m.MetricInputError, match="differ in shape"):
        acc.update(P, Q, original_scores=orig, pruned_scores=pruned[:, :3])
    with pytest.raises(m.MetricInputError, match="class indices >= 5"):
        acc.update(P, Q, labels + 5, original_scores=orig)
