"""The one registry style (sp2ps_onnx.registry.Registry) and its users: graph VJP rules,
CAM methods and metric components."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from sp2ps_onnx import cam, errors
from sp2ps_onnx import metric as m
from sp2ps_onnx.graph.rules import VJP_RULES, VJPRule
from sp2ps_onnx.registry import Registry


def test_registry_is_a_mapping_in_registration_order():
    registry: Registry = Registry("colour")

    @registry.register("red", "crimson")
    def red():
        return "r"

    registry["blue"] = lambda: "b"
    assert red() == "r"  # the decorator returns the function unchanged
    assert registry.names() == ("red", "crimson", "blue") == tuple(registry)
    assert len(registry) == 3 and "crimson" in registry and "green" not in registry
    assert registry["crimson"] is red and registry.get("red") is red
    assert [] not in registry  # an unhashable name is simply absent
    assert registry.get("green", None) is None
    del registry["blue"]
    assert registry.names() == ("red", "crimson")


def test_unknown_name_raises_the_registry_error_listing_valid_names():
    registry: Registry = Registry("spice", error=errors.UnknownComponentError)
    registry["salt"] = 1
    registry["pepper"] = 2
    with pytest.raises(errors.UnknownComponentError, match="unknown spice 'sugar'; choose one "
                       "of: 'salt', 'pepper'"):
        registry.get("sugar")
    with pytest.raises(ValueError, match="unknown spice"):
        registry.get(["not", "hashable"])


def test_registering_a_name_twice_is_refused_but_assignment_replaces():
    registry: Registry = Registry("thing")
    registry.register("a")(len)
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("a")(abs)
    registry["a"] = abs
    assert registry["a"] is abs


def test_entries_are_built_by_the_entry_function():
    registry: Registry = Registry("pair", entry=lambda name, obj, scale=1: (name, obj, scale))
    registry.register("x", scale=3)(str)
    registry["y"] = int
    assert registry["x"] == ("x", str, 3)
    assert registry["y"] == ("y", int, 1)


def test_every_vjp_rule_is_an_entry_for_its_op():
    assert len(VJP_RULES) > 0
    for op_type, rule in VJP_RULES.items():
        assert isinstance(rule, VJPRule) and rule.op_type == op_type


def test_cam_method_lists_are_derived_from_the_registry():
    assert cam.METHODS == cam.CAM_METHODS.names()
    needs = {name: cam.CAM_METHODS[name].needs for name in cam.METHODS}
    assert cam.GRADIENT_METHODS == tuple(n for n in cam.METHODS if needs[n] == "gradient")
    assert cam.EIGEN_METHODS == tuple(n for n in cam.METHODS if needs[n] == "activations")
    assert cam.PERTURBATION_METHODS == tuple(
        n for n in cam.METHODS if needs[n] == "perturbation"
    )
    assert cam.INPUT_METHODS == tuple(n for n in cam.METHODS if needs[n] == "input")
    assert set(cam.METHODS) == (
        set(cam.GRADIENT_METHODS)
        | set(cam.EIGEN_METHODS)
        | set(cam.PERTURBATION_METHODS)
        | set(cam.INPUT_METHODS)
    )
    assert cam.EIGEN_SMOOTH_METHODS == tuple(
        n for n in cam.METHODS if cam.CAM_METHODS[n].eigen_smooth
    )
    assert cam.AUG_SMOOTH_METHODS == tuple(n for n in cam.METHODS if cam.CAM_METHODS[n].aug_smooth)
    for name in cam.METHODS:  # each method documents its formula
        assert cam.CAM_METHODS[name].compute.__doc__


def test_gradient_function_refuses_non_gradient_methods_clearly():
    acts = np.ones((1, 2, 3, 3), np.float32)
    with pytest.raises(errors.UnknownMethodError, match="'eigencam' does not use gradients"):
        cam.gradient_weighted_cam("eigencam", acts, acts)
    with pytest.raises(TypeError, match="needs must be"):
        cam.CamMethod.of("mine", lambda a: a, needs="everything")


def test_exceptions_keep_their_old_homes():
    assert m.MetricInputError is errors.MetricInputError
    assert m.UnknownComponentError is errors.UnknownComponentError
    assert cam.UnknownMethodError is errors.UnknownMethodError
    for error in (errors.MetricInputError, errors.UnknownComponentError,
                  errors.UnknownMethodError):
        assert issubclass(error, errors.Sp2PSError) and issubclass(error, ValueError)


def test_a_registered_split_component_is_used_and_equals_its_whole_batch_function(
    monkeypatch,
):
    # A user component with prepare/pair: sp2ps_many must run the split (chunk by chunk,
    # the original's part once) and give what the plain function gives on whole batches.
    calls = {"prepare": 0}

    def prepare(x):
        calls["prepare"] += 1
        return x.mean(axis=(1, 2))

    def pair(mean_x, x, y):
        return 1.0 - np.abs(mean_x - y.mean(axis=(1, 2)))

    def mean_similarity(P, Q):
        P, Q = np.asarray(P, dtype=np.float64), np.asarray(Q, dtype=np.float64)
        return 1.0 - np.abs(P.mean(axis=(1, 2)) - Q.mean(axis=(1, 2)))

    monkeypatch.setattr(m, "_CHUNK_PIXELS", 2 * 20 * 20)  # 2 samples per chunk
    split = m.Component.of("means", mean_similarity, prepare=prepare, pair=pair)
    monkeypatch.setitem(m.SPATIAL, "means", split)
    monkeypatch.setitem(m.SPATIAL, "means-whole", mean_similarity)
    rng = np.random.default_rng(4)
    P = ndimage.gaussian_filter(rng.random((6, 20, 20)), (0, 2, 2))
    Qs = [ndimage.gaussian_filter(rng.random((6, 20, 20)), (0, 2, 2)) for _ in range(3)]
    with_split = m.sp2ps_many(P, Qs, "means", "tv", workers=1)
    assert calls["prepare"] == 3  # once per chunk of the original, not once per model
    whole = m.sp2ps_many(P, Qs, "means-whole", "tv", workers=1)
    assert calls["prepare"] == 3
    for a, b in zip(with_split, whole, strict=True):
        np.testing.assert_allclose(a.spatial, b.spatial, rtol=0, atol=1e-12)
        np.testing.assert_allclose(a.h, b.h, rtol=0, atol=1e-12)
    with pytest.raises(TypeError, match="both prepare and pair"):
        m.Component.of("half", mean_similarity, prepare=prepare)


def test_accumulator_and_summarize_agree_on_the_same_samples():
    # Two routes to one aggregation: the streaming accumulator (batches, logits) and the
    # per-sample table of score_models (predictions and confidences computed by hand).
    rng = np.random.default_rng(8)
    P = ndimage.gaussian_filter(rng.random((25, 24, 24)), (0, 2, 2))
    Q = np.clip(P + 0.2 * rng.normal(size=P.shape), 0, None)
    labels = rng.integers(0, 4, 25)
    logits_o = rng.normal(size=(25, 4))
    logits_p = logits_o + rng.normal(size=(25, 4))
    acc = m.Sp2PSAccumulator(aggregation="class-weighted", n_bootstrap=200, seed=5)
    for rows in (slice(0, 9), slice(9, 25)):
        acc.update(P[rows], Q[rows], labels[rows], original_scores=logits_o[rows],
                   pruned_scores=logits_p[rows])
    streamed = acc.result()

    per = m.sp2ps(P, Q)
    pred_o, pred_p = logits_o.argmax(1), logits_p.argmax(1)
    softmax_o = np.exp(logits_o) / np.exp(logits_o).sum(1, keepdims=True)
    softmax_p = np.exp(logits_p) / np.exp(logits_p).sum(1, keepdims=True)
    rows = np.arange(25)
    table = m.summarize(
        m.SampleTable.of_rows(
            per.spatial, per.spectral, per.h, labels=labels, pred_original=pred_o,
            pred_pruned=pred_p, confidence_original=softmax_o[rows, pred_o],
            confidence_pruned=softmax_p[rows, pred_o],
            js_divergence=m.output_divergence(logits_o, logits_p),
        ),
        aggregation="class-weighted", n_bootstrap=200, seed=5,
    )
    for name in ("sp2ps", "mean_spatial", "mean_spectral", "attention_lost",
                 "harmonic_of_means", "class_weighted_h", "top1_agreement",
                 "accuracy_original", "accuracy_pruned", "mean_abs_confidence_change",
                 "mean_js_divergence", "same_answer_sp2ps", "different_answer_sp2ps",
                 "same_answer_gap_share"):
        assert getattr(streamed, name) == pytest.approx(getattr(table, name), rel=1e-12), name
    assert streamed.per_class_h.keys() == table.per_class_h.keys()
    # The accumulator keeps float32 per-sample values: order statistics agree to that.
    assert streamed.median_h == pytest.approx(table.median_h, abs=1e-6)
    assert streamed.ci95 == pytest.approx(table.ci95, abs=1e-6)
