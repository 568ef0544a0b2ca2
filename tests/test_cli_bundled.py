"""``sp2ps score`` on the bundled Fashion-MNIST models, checked against the Python API."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from sp2ps_onnx import CamModel
from sp2ps_onnx.cli import cli
from sp2ps_onnx.metric import Sp2PSAccumulator

MODELS = Path(__file__).resolve().parent.parent / "models"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def direct_metric(original: Path, pruned: Path, x_uint8: np.ndarray, labels: np.ndarray):
    """Sp2PS through the Python API only: CamModel + x/255 in each model's layout."""
    o, p = CamModel(str(original)), CamModel(str(pruned))

    def prepare(model: CamModel) -> np.ndarray:
        x = x_uint8.astype(np.float32) / 255.0
        return x[:, None] if model.layout == "NCHW" else x[..., None]

    xo, xp = prepare(o), prepare(p)
    maps_o, t_o = o.cams(xo, targets=labels)
    maps_p, _ = p.cams(xp, targets=t_o)
    acc = Sp2PSAccumulator(n_bootstrap=50, seed=0)
    acc.update(maps_o, maps_p, labels, targets=t_o, original_scores=o.scores(xo),
               pruned_scores=p.scores(xp))
    return acc.result()


def test_bundled_models_score_matches_the_python_api(tmp_path: Path) -> None:
    original = MODELS / "fmnist_cnn.onnx"
    pruned = [MODELS / "pruned" / "fmnist_cnn_mag80.onnx",
              MODELS / "keras" / "fmnist_keras_mag70.onnx", original]
    out = tmp_path / "bundled"
    result = invoke("score", original, *pruned, "--data", MODELS / "samples" / "fmnist_test.npz",
                    "--preset", "unit", "--limit", 40, "--bootstrap", 50, "--out", out,
                    "--classes", MODELS / "samples" / "classes.txt", "-q")
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    archive = np.load(MODELS / "samples" / "fmnist_test.npz")
    x, y = archive["x"][:40], archive["y"][:40]
    by_name = {m["name"]: m["result"] for m in data["models"]}
    for model in pruned[:2]:  # NCHW PyTorch and NHWC Keras, each with its own layout
        expected = direct_metric(original, model, x, y)
        for key in ("sp2ps", "mean_spatial", "mean_spectral", "p05_h", "top1_agreement",
                    "accuracy_pruned"):
            got = by_name[model.stem][key]
            assert got == pytest.approx(getattr(expected, key), abs=2e-5), (model.stem, key)
    assert by_name["fmnist_cnn-2"]["sp2ps"] == pytest.approx(1.0, abs=1e-6)
    assert data["original"]["accuracy"] == pytest.approx(expected.accuracy_original)
    assert data["class_names"] == (MODELS / "samples" / "classes.txt").read_text().split()
    assert "fmnist_keras_mag70" in (out / "report.html").read_text()


def test_bundled_png_folder_labels_follow_classes_txt(tmp_path: Path) -> None:
    folder = MODELS / "samples" / "fmnist_png"
    classes = MODELS / "samples" / "classes.txt"
    names = classes.read_text().split()
    common = ["score", MODELS / "fmnist_cnn.onnx", MODELS / "keras" / "fmnist_keras.onnx",
              "--data", folder, "--preset", "unit", "--limit", 40, "--bootstrap", 0,
              "--format", "json", "-q"]
    with_classes = invoke(*common, "--classes", classes, "--out", tmp_path / "a")
    assert with_classes.exit_code == 0, with_classes.output
    rows = [r for r in csv.DictReader((tmp_path / "a" / "per_sample.csv").open())
            if r["role"] == "pruned"]
    assert len(rows) == 40
    for row in rows:
        assert names[int(row["label"])] == row["id"].split("/")[0] == row["label_name"]
    # A trained model agrees with labels in classes.txt order, not with sorted folder names.
    accuracy = json.loads(with_classes.stdout)["original"]["accuracy"]
    sorted_order = invoke(*common, "--out", tmp_path / "b")
    assert accuracy > 0.7 > json.loads(sorted_order.stdout)["original"]["accuracy"]
