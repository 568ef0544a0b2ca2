"""The worked examples of docs/compression_loops.md, at smoke scale."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime
import pytest

from examples import prune_loop, quantize_sweep
from examples.data import ORIGINAL, model_input, split
from sp2ps_onnx.scoring import DataOptions, MetricOptions, score_models

pytest.importorskip("torch_pruning")


def test_bundled_cnn_in_torch_computes_what_the_onnx_file_computes():
    import torch

    x = model_input(split("test", 16)[0])
    session = onnxruntime.InferenceSession(str(ORIGINAL), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input": x})[0]
    with torch.no_grad():
        got = prune_loop.bundled_cnn()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_prune_loop_stops_at_the_largest_rate_above_the_floor(tmp_path):
    out = tmp_path / "loop"
    summary = prune_loop.main(["--n", "48", "--steps", "2", "--max-rate", "0.5",
                               "--floor", "0.5", "--bootstrap", "50", "--out", str(out)])
    curve = summary["curve"]
    # Step 0 is the unpruned model re-exported from PyTorch: the same attention and answers.
    assert curve[0]["rate"] == 0 and curve[0]["sp2ps"] > 0.999
    assert curve[0]["top1_agreement"] == 1.0
    assert curve[0]["accuracy"] == summary["accuracy_original"]
    assert [p["parameters"] for p in curve] == sorted((p["parameters"] for p in curve),
                                                      reverse=True)
    # The stop rule: every kept step is at or above the floor, the one that stopped is below.
    assert all(p["sp2ps"] >= 0.5 for p in curve[:-1])
    assert summary["stopped"] == (curve[-1]["sp2ps"] < 0.5)
    kept = curve[-2] if summary["stopped"] else curve[-1]
    assert summary["kept"] == kept
    # The kept model, written to disk and scored from scratch, gives the loop's number.
    data = out / "eval.npz"
    again = score_models(ORIGINAL, [out / "kept.onnx"], data,
                         data_options=DataOptions(preset="unit"),
                         metric=MetricOptions(n_bootstrap=50)).models[0]
    assert again.sp2ps == kept["sp2ps"] and again.info.parameters == kept["parameters"]
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "curve.json").read_text())["curve"] == curve


def test_quantize_sweep_ranks_by_sp2ps_what_score_models_measures(tmp_path):
    out = tmp_path / "sweep"
    rows = quantize_sweep.main(["--n", "32", "--calibration", "4,16", "--bootstrap", "50",
                                "--out", str(out)])
    assert len(rows) == 2 * 2 * 2
    assert [r["sp2ps"] for r in rows] == sorted((r["sp2ps"] for r in rows), reverse=True)
    assert {(r["format"], r["granularity"], r["calibration"]) for r in rows} == {
        (f, g, c) for f in ("qdq", "qoperator") for g in ("per-channel", "per-tensor")
        for c in (4, 16)}
    x, y = split("test", 32)
    np.savez(tmp_path / "eval.npz", x=x, y=y)
    for row in (rows[0], rows[-1]):
        expected = score_models(ORIGINAL, [row["path"]], tmp_path / "eval.npz",
                                data_options=DataOptions(preset="unit"),
                                metric=MetricOptions(n_bootstrap=50)).models[0]
        assert row["sp2ps"] == expected.sp2ps
        assert row["accuracy"] == expected.result.accuracy_pruned
    assert json.loads((out / "ranking.json").read_text())["models"] == rows
