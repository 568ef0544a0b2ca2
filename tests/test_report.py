"""Report rendering: colours vs matplotlib's jet, self-contained HTML, tables, atomic output."""

from __future__ import annotations

import csv
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from sp2ps_onnx.errors import InputDataError
from sp2ps_onnx.metric import Sp2PSAccumulator
from sp2ps_onnx.report import (
    atomic_directory,
    colorize,
    example_grid,
    format_table,
    overlay,
    render_html,
    scatter_png,
    scatter_svg,
    write_report,
)
from sp2ps_onnx.scoring import Example, ModelInfo, ModelScore, ScoreReport


def test_colorize_matches_matplotlib_jet() -> None:
    from matplotlib import colormaps

    values = np.linspace(0, 1, 1001)
    expected = colormaps["jet"](values)[:, :3] * 255
    # matplotlib samples its map into 256 entries, hence ~1 step of tolerance.
    assert np.abs(colorize(values).astype(float) - expected).max() <= 6


def test_overlay_blends_image_and_heat() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (8, 8, 1), dtype=np.uint8)
    cam = rng.random((4, 4))
    np.testing.assert_array_equal(overlay(image, cam, alpha=0.0), np.repeat(image, 3, axis=2))
    from skimage.transform import resize

    heat = colorize(resize(cam, (8, 8), order=1, preserve_range=True))
    np.testing.assert_array_equal(overlay(image, cam, alpha=1.0), heat)


def _fake_report(n_models: int = 2, with_labels: bool = True) -> ScoreReport:
    rng = np.random.default_rng(1)
    P = rng.random((12, 16, 16))
    labels = rng.integers(0, 3, 12) if with_labels else None
    scores_o = rng.normal(size=(12, 3))
    models = []
    for k in range(n_models):
        Q = np.clip(P + rng.normal(scale=0.2 * (k + 1), size=P.shape), 0, 1)
        acc = Sp2PSAccumulator(n_bootstrap=30)
        per = acc.update(P, Q, labels, original_scores=scores_o,
                         pruned_scores=scores_o + rng.normal(size=(12, 3)))
        examples = [
            Example(f"img{i}.png", i, float(per.h[i]), float(per.spatial[i]),
                    float(per.spectral[i]), None if labels is None else int(labels[i]), 0, 1, 0,
                    1, rng.integers(0, 256, (16, 16, 1), dtype=np.uint8), P[i], Q[i])
            for i in range(3)
        ]
        rows = [{"model": f"m{k}", "index": i, "id": f"img{i}.png",
                 "label": None if labels is None else int(labels[i]), "target_original": 0,
                 "target_pruned": 0, "pred_original": 0, "pred_pruned": 0,
                 "spatial": float(per.spatial[i]), "spectral": float(per.spectral[i]),
                 "h": float(per.h[i])} for i in range(12)]
        info = ModelInfo(f"m{k}", f"/x/m{k}.onnx", "ab" * 32, 1000 + k, 500, 400, 100 * k)
        models.append(ModelScore(info, acc.result(), examples[:2], examples[1:], rows))
    original = ModelInfo("orig", "/x/orig.onnx", "cd" * 32, 2000, 500, 400, 0)
    config = {"method": "gradcam", "target": "label", "spatial": "ssim", "spectral": "tv",
              "aggregation": "mean", "versions": {"onnx": "1"}}
    return ScoreReport(original, models, config, 12, ["a", "b", "c"],
                       models[0].result.accuracy_original)


def test_html_is_self_contained_and_complete(tmp_path: Path) -> None:
    report = _fake_report()
    page = render_html(report)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    references = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert references and all(r.startswith(("data:image/png;base64,", "#")) for r in references)
    assert "<script" not in page and "<link" not in page
    images = page.count('<img src="data:image/png')
    assert images == 2 * (2 + 2) * 3 + 1  # 2 models x (2 worst + 2 best) x 3 panels + legend
    assert page.count("<svg") == 1
    ranked = [m.info.name for m in report.ranked()]
    assert page.index(f">{ranked[0]}</a>") < page.index(f">{ranked[1]}</a>")
    ET.fromstring(scatter_svg(report))  # well-formed XML


def test_write_report_files(tmp_path: Path) -> None:
    report = _fake_report()
    write_report(report, tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["models"][0]["result"]["sp2ps"] == pytest.approx(report.models[0].sp2ps)
    assert data["original"]["sha256"] == "cd" * 32
    rows = list(csv.DictReader((tmp_path / "per_sample.csv").open()))
    assert len(rows) == 24 and rows[0]["label_name"] in {"a", "b", "c"}
    assert iio.imread(tmp_path / "figures" / "m0_worst.png").shape == (2 * 112 + 6, 3 * 112 + 12, 3)
    assert iio.imread(tmp_path / "figures" / "sp2ps_vs_accuracy.png").ndim == 3
    ET.parse(tmp_path / "figures" / "sp2ps_vs_accuracy.svg")


def test_example_grid_panels() -> None:
    report = _fake_report(1)
    example = report.models[0].worst[0]
    grid = example_grid([example], cell=32, gap=2)
    assert grid.shape == (32, 100, 3)
    np.testing.assert_array_equal(grid[:, :32], np.repeat(np.repeat(
        np.repeat(example.image, 2, 0), 2, 1), 3, axis=2))


def test_plot_without_labels_uses_top1_agreement() -> None:
    report = _fake_report(with_labels=False)
    assert report.accuracy_original is None
    assert "top-1 agreement" in scatter_svg(report)
    assert scatter_png(report).shape == (420, 640, 3)


@pytest.mark.parametrize("fmt", ["table", "markdown", "csv", "json"])
def test_table_formats_agree(fmt: str) -> None:
    report = _fake_report()
    text = format_table(report, fmt)
    best = report.ranked()[0]
    if fmt == "json":
        assert json.loads(text)["models"][0]["sp2ps"] == pytest.approx(best.sp2ps)
    elif fmt == "csv":
        row = next(csv.DictReader(text.splitlines()))
        assert row["model"] == best.info.name and float(row["sp2ps"]) == pytest.approx(best.sp2ps)
    else:
        assert f"{best.sp2ps:.3f}" in text and "orig (original)" in text
    with pytest.raises(InputDataError):
        format_table(report, "xml")


def test_atomic_directory_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as directory:
            (directory / "results.json").write_text("{}")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(target) as directory:
        (directory / "results.json").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_directory(target, force=True) as directory:
            raise RuntimeError("again")
    assert (target / "results.json").read_text() == "1"  # the earlier output survives
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
