"""Report rendering: overlays vs pytorch-grad-cam, matplotlib figures, jinja2 HTML, tables,
atomic output."""

from __future__ import annotations

import csv
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from sp2ps_onnx.errors import InputDataError
from sp2ps_onnx.figures import (
    cam_figure,
    colorize,
    examples_figure,
    overlay,
    per_class_figure,
    scatter_figure,
    sp2ps_bar_figure,
)
from sp2ps_onnx.metric import Sp2PSAccumulator
from sp2ps_onnx.report import (
    atomic_directory,
    format_table,
    notebook_html,
    render_html,
    write_report,
)
from sp2ps_onnx.scoring import Example, ModelInfo, ModelScore, ScoreReport


def test_overlay_matches_pytorch_grad_cam_show_cam_on_image() -> None:
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    cam = rng.random((32, 32))
    # A white pixel under the most intense red makes the blend reach 1, so
    # show_cam_on_image's division by the maximum is a no-op and the blends are comparable.
    image[0, 0], cam[0, 0] = 255, 0.89
    expected = show_cam_on_image(image / 255.0, cam, use_rgb=True, image_weight=0.5)
    ours = overlay(image, cam, alpha=0.5, cmap="jet")
    # OpenCV's and matplotlib's jet tables differ by up to 33 levels (5.3 on average) and
    # the blend halves that; swapped channels would be ~70 off on average.
    difference = np.abs(ours.astype(int) - expected.astype(int))
    assert difference.max() <= 17 and difference.mean() < 3.5
    swapped = np.abs(ours[..., ::-1].astype(int) - expected.astype(int))
    assert swapped.mean() > 20


def test_overlay_blends_image_and_heat_and_takes_any_cmap() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (8, 8, 1), dtype=np.uint8)
    cam = rng.random((4, 4))
    np.testing.assert_array_equal(overlay(image, cam, alpha=0.0), np.repeat(image, 3, axis=2))
    from skimage.transform import resize

    up = resize(cam, (8, 8), order=1, preserve_range=True)
    np.testing.assert_array_equal(overlay(image, cam, alpha=1.0, cmap="viridis"),
                                  colorize(up, "viridis"))
    # viridis runs from dark violet (low) to yellow (high); jet from blue to dark red.
    low, high = colorize(np.array([0.0, 1.0]), "viridis")
    assert low[2] > low[1] and high[0] > 200 and high[1] > 200 and high[2] < 80
    with pytest.raises(InputDataError, match="unknown colour map 'nope'"):
        colorize(cam, "nope")


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


def _scatter_points(figure) -> dict[str, tuple[float, float, float, float]]:
    """name -> (x, y, ci low, ci high) as drawn: read back from the matplotlib artists."""
    axis = figure.axes[0]
    drawn = {}
    for container in axis.containers:
        (line, _caps, (bars,)) = container.lines
        x, y = (float(v[0]) for v in line.get_data())
        segment = bars.get_segments()[0]
        drawn[container.get_label()] = (x, y, float(segment[:, 1].min()), float(segment[:, 1].max()))
    return drawn


def test_scatter_draws_each_model_at_its_accuracy_with_its_ci() -> None:
    report = _fake_report(3)
    drawn = _scatter_points(scatter_figure(report))
    assert set(drawn) == {m.info.name for m in report.models}
    for model in report.models:
        x, y, low, high = drawn[model.info.name]
        assert x == pytest.approx(100 * model.result.accuracy_pruned)
        assert y == pytest.approx(model.sp2ps)
        assert (low, high) == pytest.approx(tuple(model.result.ci95))
    axis = scatter_figure(report).axes[0]
    assert "accuracy" in axis.get_xlabel()
    reference = [line for line in axis.lines if line.get_linestyle() == "--"]
    assert reference and reference[0].get_xdata()[0] == pytest.approx(100 * report.accuracy_original)


def test_plot_without_labels_uses_top1_agreement() -> None:
    report = _fake_report(with_labels=False)
    assert report.accuracy_original is None
    figure = scatter_figure(report)
    assert "top-1 agreement" in figure.axes[0].get_xlabel()
    for model in report.models:
        assert _scatter_points(figure)[model.info.name][0] == pytest.approx(
            100 * model.result.top1_agreement)


def test_bar_chart_and_per_class_heat_map_show_the_numbers() -> None:
    report = _fake_report(2)
    ranked = report.ranked()
    bars = sp2ps_bar_figure(report).axes[0].patches
    widths = [b.get_width() for b in sorted(bars, key=lambda b: -b.get_y())]
    assert widths == pytest.approx([m.sp2ps for m in ranked])
    image = per_class_figure(report).axes[0].images[0].get_array()
    for row, model in enumerate(ranked):
        per_class = model.result.per_class_h
        for column, key in enumerate(sorted(int(k) for k in per_class)):
            assert image[row, column] == pytest.approx(per_class[key])


def test_cam_and_example_figures_show_input_cam_and_overlay() -> None:
    report = _fake_report(1)
    example = report.models[0].worst[0]
    figure = cam_figure(example.image, example.original_map, cmap="turbo")
    panels = [axis.images[0].get_array() for axis in figure.axes if axis.images]
    np.testing.assert_array_equal(panels[0], np.repeat(example.image, 3, axis=2))
    np.testing.assert_allclose(panels[1], example.original_map)
    np.testing.assert_array_equal(panels[2], overlay(example.image, example.original_map,
                                                     cmap="turbo"))
    grid = examples_figure(report.models[0].worst, report.class_names)
    assert len([a for a in grid.axes if a.images]) == 3 * len(report.models[0].worst)


def test_html_is_self_contained_and_complete() -> None:
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
    svg = page[page.index("<svg") : page.index("</svg>") + len("</svg>")]
    ET.fromstring(svg)  # well-formed XML


def test_html_escapes_names() -> None:
    report = _fake_report()
    report.models[0].info.name = "<b>evil</b> & co"
    report.class_names = ["<i>a</i>", "b", "c"]
    page = render_html(report)
    assert "<b>evil</b>" not in page and "&lt;b&gt;evil&lt;/b&gt; &amp; co" in page
    assert "<i>a</i>" not in page


def test_notebook_view_is_ranking_and_scatter() -> None:
    report = _fake_report()
    fragment = report._repr_html_()
    again = notebook_html(report)
    assert fragment[: fragment.index("<svg")] == again[: again.index("<svg")]
    assert "<html" not in fragment and fragment.count("<svg") == 1
    best = report.ranked()[0]
    assert fragment.index(best.info.name) < fragment.index(report.ranked()[1].info.name)
    assert f"{best.sp2ps:.3f}" in fragment
    # Two reports in one notebook: the ids their SVGs refer to (clip paths, markers) differ.
    def referenced(html: str) -> set[str]:
        return set(re.findall(r'(?:href="|url\()#([^")]+)', html))

    assert referenced(fragment) and not referenced(fragment) & referenced(notebook_html(report))


def test_write_report_files(tmp_path: Path) -> None:
    import imageio.v3 as iio

    report = _fake_report()
    write_report(report, tmp_path, formats=("png", "svg", "pdf"), cmap="viridis")
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["models"][0]["result"]["sp2ps"] == pytest.approx(report.models[0].sp2ps)
    assert data["original"]["sha256"] == "cd" * 32
    rows = list(csv.DictReader((tmp_path / "per_sample.csv").open()))
    assert len(rows) == 24 and rows[0]["label_name"] in {"a", "b", "c"}
    figures = tmp_path / "figures"
    stems = ["sp2ps_vs_accuracy", "sp2ps_by_model", "per_class_h", "m0_worst", "m0_best",
             "m1_worst", "m1_best"]
    for stem in stems:
        assert iio.imread(figures / f"{stem}.png").ndim == 3
        ET.parse(figures / f"{stem}.svg")
        assert (figures / f"{stem}.pdf").read_bytes().startswith(b"%PDF-")
    assert len(list(figures.iterdir())) == 3 * len(stems)
    assert "CAM colours (viridis)" in (tmp_path / "report.html").read_text()
    with pytest.raises(InputDataError, match="figure format 'gif'"):
        write_report(report, tmp_path / "again", formats=("gif",))


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


def test_missing_report_packages_name_the_extra_before_any_work(monkeypatch, tmp_path) -> None:
    from click.testing import CliRunner

    from sp2ps_onnx import report as report_module
    from sp2ps_onnx.cli import cli

    real = report_module.importlib.util.find_spec
    monkeypatch.setattr(report_module.importlib.util, "find_spec",
                        lambda name: None if name == "matplotlib" else real(name))
    models = Path(__file__).resolve().parent.parent / "models"
    args = ["score", str(models / "fmnist_cnn.onnx"), str(models / "pruned" / "fmnist_cnn_mag50.onnx"),
            "--data", str(models / "samples" / "fmnist_test.npz"), "--preset", "unit",
            "--out", str(tmp_path / "r")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip() == (
        "sp2ps: error: the report and figures need matplotlib, which is not installed; install "
        "the 'report' extra: pip install 'sp2ps-onnx[report]' (or pass --no-report for the "
        "table only)")
    assert list(tmp_path.iterdir()) == []
    # The numbers need no report packages.
    result = CliRunner().invoke(cli, [*args, "--no-report", "--limit", "8", "-q"])
    assert result.exit_code == 0 and "fmnist_cnn_mag50" in result.stdout
