"""The decision/attention split and the output divergence, against direct computations:
the split's groups partition the samples and their count-weighted mean h is Sp2PS, and the
Jensen-Shannon divergence equals its definition from the two softmax distributions."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sp2ps_onnx import metric as m


def _table(seed: int, n: int, k: int = 5, agree: float = 0.7):
    rng = np.random.default_rng(seed)
    h = rng.uniform(0, 1, n)
    s = np.clip(h + rng.normal(0, 0.05, n), 0, 1)
    pred_o = rng.integers(0, k, n)
    pred_p = np.where(rng.uniform(size=n) < agree, pred_o, (pred_o + 1) % k)
    pred_p[rng.uniform(size=n) < 0.05] = -1  # no finite scores: never agrees
    logits_o, logits_p = rng.normal(size=(n, k)) * 3, rng.normal(size=(n, k)) * 3
    return h, s, pred_o, pred_p, logits_o, logits_p


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 300),
       agree=st.sampled_from([0.0, 0.3, 0.9, 1.0]))
def test_split_partitions_the_samples_and_its_weighted_mean_is_sp2ps(seed, n, agree) -> None:
    h, s, pred_o, pred_p, _, _ = _table(seed, n, agree=agree)
    result = m.summarize(m.SampleTable.of_rows(s, s, h, pred_original=pred_o, pred_pruned=pred_p),
                         n_bootstrap=0)
    same = (pred_o == pred_p) & (pred_o >= 0)
    assert result.same_answer_n + result.different_answer_n == n
    assert result.same_answer_n == int(same.sum())
    parts = [(result.same_answer_n, result.same_answer_sp2ps),
             (result.different_answer_n, result.different_answer_sp2ps)]
    weighted = sum(count * value for count, value in parts if count) / n
    assert weighted == pytest.approx(result.sp2ps, abs=1e-9)
    if same.any():
        assert result.same_answer_sp2ps == pytest.approx(h[same].mean(), abs=1e-12)
    else:
        assert result.same_answer_sp2ps is None
    gap = np.sum(1 - h)
    if gap > 0:
        assert result.same_answer_gap_share == pytest.approx(np.sum(1 - h[same]) / gap, abs=1e-9)


def test_js_divergence_is_its_definition() -> None:
    _, _, _, _, logits_o, logits_p = _table(3, 64)
    p = np.exp(logits_o) / np.exp(logits_o).sum(1, keepdims=True)
    q = np.exp(logits_p) / np.exp(logits_p).sum(1, keepdims=True)
    mid = (p + q) / 2
    kl = lambda a, b: np.sum(a * np.log2(a / b), axis=1)  # noqa: E731
    expected = (kl(p, mid) + kl(q, mid)) / 2
    np.testing.assert_allclose(m.output_divergence(logits_o, logits_p), expected, atol=1e-10)
    same = m.output_divergence(logits_o, logits_o)
    np.testing.assert_allclose(same, 0.0, atol=1e-12)
    disjoint = m.output_divergence(np.array([[50.0, -50.0]]), np.array([[-50.0, 50.0]]))
    assert disjoint[0] == pytest.approx(1.0, abs=1e-9)


def test_streaming_and_table_give_the_same_split() -> None:
    rng = np.random.default_rng(1)
    P, Q = rng.uniform(size=(30, 12, 12)), rng.uniform(size=(30, 12, 12))
    logits_o, logits_p = rng.normal(size=(30, 4)), rng.normal(size=(30, 4))
    acc = m.Sp2PSAccumulator(n_bootstrap=0)
    for rows in (slice(0, 11), slice(11, 30)):
        acc.update(P[rows], Q[rows], original_scores=logits_o[rows],
                   pruned_scores=logits_p[rows])
    streamed = acc.result()
    per = m.sp2ps(P, Q)
    pred_o, pred_p = logits_o.argmax(1), logits_p.argmax(1)
    table = m.summarize(m.SampleTable.of_rows(
        per.spatial, per.spectral, per.h, targets=pred_o, pred_original=pred_o,
        pred_pruned=pred_p, js_divergence=m.output_divergence(logits_o, logits_p),
    ), n_bootstrap=0)
    for name in ("same_answer_n", "same_answer_sp2ps", "different_answer_sp2ps",
                 "same_answer_gap_share", "mean_js_divergence"):
        assert getattr(streamed, name) == pytest.approx(getattr(table, name), rel=1e-12), name
