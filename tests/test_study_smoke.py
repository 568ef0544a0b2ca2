"""The pruning study (experiments/) end to end on a tiny subset, as CI runs it.

The study runs in a subprocess, as users run it (``python -m experiments.study --smoke``).
The checks are properties that must hold whatever the (barely trained) smoke models learn:
the pruning really removes channels or zeroes weights, the two frameworks' pruned twins
have the same size, every model is scored or carries the engine's error, the noise ceiling
sits above the all-random model, and results.md shows every scored model.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytest.importorskip("torch_pruning", reason="the study needs the 'study' extra (torch-pruning)")
pytest.importorskip("tf2onnx")
pytest.importorskip("efficientnet_lite_pytorch")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict:
    if not Path(os.environ.get("FMNIST_DIR", "/usr/share/datasets/fashion-mnist")).is_dir():
        missing = "Fashion-MNIST (Debian package dataset-fashion-mnist) is not installed"
        if os.environ.get("SP2PS_REQUIRE_DATA"):  # CI installs it: a skip there is a failure
            pytest.fail(missing)
        pytest.skip(missing)
    root = tmp_path_factory.mktemp("study")
    out, cache = root / "out", root / "cache"
    run = subprocess.run(
        [sys.executable, "-m", "experiments.study", "--smoke", "--out", str(out),
         "--cache", str(cache)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return {
        "out": out,
        "manifest": {e["name"]: e for e in json.loads((cache / "manifest.json").read_text())},
        "scores": json.loads((cache / "scores.json").read_text()),
        "photos": json.loads((cache / "photos.json").read_text()),
        "results": (out / "results.md").read_text(),
    }


def test_every_model_is_scored_or_carries_an_error(smoke) -> None:
    for name, entry in smoke["manifest"].items():
        if entry["kind"] == "original":
            continue
        for method in ("gradcam", "gradcam++"):
            record = smoke["scores"][name][method]
            if record.get("error"):
                assert record.get("sp2ps") is None, name
                continue
            value, (low, high) = record["sp2ps"], record["ci95"]
            assert 0.0 <= low <= value <= high <= 1.0, (name, method, record)
            assert 0.0 <= record["accuracy"] <= 1.0 and record["n"] == 128


def test_pruning_removes_channels_and_zeroes_weights(smoke) -> None:
    scores = smoke["scores"]
    for arch in ("torch-vgg", "keras-vgg"):
        original = scores[arch]["gradcam"]["parameters"]
        assert scores[f"{arch}-l1-filter50"]["gradcam"]["parameters"] < 0.5 * original
        assert scores[f"{arch}-magnitude50"]["gradcam"]["parameters"] == original
        # Global magnitude pruning at 50 % of all Conv/Linear weights: BatchNorm folding
        # scales a conv's weights but keeps zeros, so the exported sparsity is 50 %.
        assert math.isclose(scores[f"{arch}-magnitude50"]["gradcam"]["sparsity"], 50.0,
                            abs_tol=0.05)
        assert math.isclose(scores[f"{arch}-magnitude50-ft"]["gradcam"]["sparsity"], 50.0,
                            abs_tol=0.05), "fine-tuning must keep the pruning masks"
    # Torch-Pruning and the hand-written Keras filter pruning give the same architecture.
    for method in ("l1-filter50", "random-filter50"):
        assert (scores[f"torch-vgg-{method}"]["gradcam"]["parameters"]
                == scores[f"keras-vgg-{method}"]["gradcam"]["parameters"])


def test_reference_points_are_ordered(smoke) -> None:
    for arch in ("torch-vgg", "keras-vgg"):
        for method in ("gradcam", "gradcam++"):
            ceiling = smoke["scores"][f"{arch}-ceiling"][method]["sp2ps"]
            random = smoke["scores"][f"{arch}-cascade-all"][method]["sp2ps"]
            assert ceiling > 0.9 and ceiling > random + 0.3, (arch, method, ceiling, random)


def test_results_md_and_figures(smoke) -> None:
    results = smoke["results"]
    for section in ("## Findings", "## Base models and reference points",
                    "## Cross-framework check", "## Deployment artifacts",
                    "## Real photos", "## Every scored model", "## How these numbers were produced"):
        assert section in results
    for name, entry in smoke["manifest"].items():
        if entry["kind"] != "original":
            assert f"| `{name}` |" in results, f"{name} has no row in results.md"
    for figure in ("rate_gradcam.png", "rate_gradcampp.png", "accuracy_gradcam.png",
                   "photos_gradcam.png"):
        assert (smoke["out"] / "figures" / "study" / figure).stat().st_size > 1000
    models = smoke["photos"]["models"]
    assert "lite0-ort-qdq-int8" in models
    for model in models.values():
        for record in model["methods"].values():
            assert 0.0 <= record["sp2ps"] <= 1.0
            assert len(record["per_photo"]) == 7
