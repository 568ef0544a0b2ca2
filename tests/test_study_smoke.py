"""The pruning study (experiments/) end to end on a tiny subset, as CI runs it.

The study runs in a subprocess, as users run it (``python -m experiments.study --smoke``).
The checks are properties that must hold whatever the (barely trained) smoke models learn:
the pruning really removes channels or zeroes weights, the two frameworks' pruned twins have
the same size, every model is scored or carries the engine's error, the int8 artifacts sit
far above the random floor, the committed-data export is complete, and results.md is exactly
what the report renders from that data.
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
    from experiments.analysis import read_table

    root = tmp_path_factory.mktemp("study")
    out, cache = root / "out", root / "cache"
    run = subprocess.run(
        [sys.executable, "-m", "experiments.study", "--smoke", "--out", str(out),
         "--cache", str(cache)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    data = cache / "data"
    return {
        "out": out,
        "data": data,
        "manifest": {e["name"]: e for e in json.loads((cache / "manifest.json").read_text())},
        "models": {r["name"]: r for r in read_table(data / "models.csv")},
        "results": (out / "results.md").read_text(),
    }


def test_every_model_is_scored_or_carries_an_error(smoke) -> None:
    models = smoke["models"]
    for name, entry in smoke["manifest"].items():
        if entry["kind"] == "original":
            continue
        row = models[name]
        if row["error"]:
            assert row["sp2ps"] is None, name
            continue
        assert 0.0 <= row["ci_low"] <= row["sp2ps"] <= row["ci_high"] <= 1.0, row
        assert 0.0 <= row["accuracy"] <= 1.0 and row["n"] == 200, row
    # Each base model has its floor and the other seed as its independent retrain.
    for base in ("torch-vgg-s0", "torch-vgg-s1", "keras-vgg-s0", "keras-vgg-s1"):
        other = base[:-1] + ("1" if base.endswith("0") else "0")
        assert models[f"{base}-floor"]["kind"] == "floor"
        assert models[f"{other}-vs-{base}"]["kind"] == "reference"


def test_pruning_removes_channels_and_zeroes_weights(smoke) -> None:
    models = smoke["models"]
    for arch in ("torch-vgg", "keras-vgg"):
        base = models[f"{arch}-s0-ort-qdq-int8"]["parameters"]  # the original's weights
        assert models[f"{arch}-s0-l1-filter50"]["parameters"] < 0.5 * base
        for name in (f"{arch}-s0-magnitude50", f"{arch}-s0-magnitude50-ft"):
            # 50 % of all Conv/Linear weights; BatchNorm folding keeps zeros, and the
            # recovery (recalibration and fine-tuning) must keep the masks.
            assert math.isclose(models[name]["sparsity"], 50.0, abs_tol=0.05), name
    for method in ("l1-filter50", "random-filter50"):
        assert (models[f"torch-vgg-s0-{method}"]["parameters"]
                == models[f"keras-vgg-s0-{method}"]["parameters"])


def test_reference_points_are_ordered(smoke) -> None:
    models = smoke["models"]
    for base in ("torch-vgg-s0", "keras-vgg-s0"):
        floor = models[f"{base}-floor"]["sp2ps"]
        int8 = models[f"{base}-ort-qdq-int8"]["sp2ps"]
        assert int8 > 0.9 and int8 > floor + 0.3, (base, int8, floor)


def test_recovery_is_recorded(smoke) -> None:
    models = smoke["models"]
    for name, row in models.items():
        if row["kind"] == "pruned" and row["finetuned"]:
            assert row["accuracy_recalibrated"] is not None, name


def test_results_md_is_rendered_from_the_exported_data(smoke) -> None:
    from experiments.report import render_markdown

    results = smoke["results"]
    assert results == render_markdown(smoke["data"])
    for section in ("## The answer", "## Base models", "## Recovery after pruning",
                    "## The scale", "## Matched-accuracy pairs", "## Real photos",
                    "## Every scored model", "## How these numbers were produced"):
        assert section in results
    for name in smoke["models"]:
        assert f"| `{name}` |" in results, f"{name} has no row in results.md"
    for figure in ("sp2ps_vs_outputs.png", "photos.png"):
        assert (smoke["out"] / "figures" / "study" / figure).stat().st_size > 1000
    photos = (smoke["data"] / "photo_models.csv").read_text()
    assert "lite0-ort-qdq-int8" in photos and "lite0-random-floor" in photos
