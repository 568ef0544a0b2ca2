"""Report rendering: overlays vs pytorch-grad-cam, matplotlib figures, jinja2 HTML, tables,
atomic output."""

from __future__ import annotations

import csv
import html
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
from sp2ps_onnx.scoring.band import BANDS, band_of, rank_correlations


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


def _js_divergence(scores_o: np.ndarray, scores_p: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence (base 2) of two softmax outputs, from its definition:
    the entropy of the mixture minus the mean entropy of the two."""
    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def entropy(p: np.ndarray) -> np.ndarray:
        return -(p * np.log2(np.where(p > 0, p, 1.0))).sum(axis=1)

    p, q = softmax(scores_o), softmax(scores_p)
    return entropy((p + q) / 2) - (entropy(p) + entropy(q)) / 2


def _model_score(name: str, P, Q, labels, scores_o, scores_p, rng, role: str = "pruned",
                 size: int = 0) -> ModelScore:
    """A ModelScore of real numbers: the accumulator's result over (P, Q), per-sample rows
    as ``sp2ps score`` writes them, and kept examples (the moved ones with equal answers)."""
    acc = Sp2PSAccumulator(n_bootstrap=30)
    per = acc.update(P, Q, labels, original_scores=scores_o, pruned_scores=scores_p)
    pred_o, pred_p = scores_o.argmax(axis=1), scores_p.argmax(axis=1)
    js = _js_divergence(scores_o, scores_p)
    n = len(P)

    def example(i: int, pruned_prediction: int) -> Example:
        return Example(f"img{i}.png", i, float(per.h[i]), float(per.spatial[i]),
                       float(per.spectral[i]), None if labels is None else int(labels[i]), 0, 1,
                       0, pruned_prediction, rng.integers(0, 256, (16, 16, 1), dtype=np.uint8),
                       P[i], Q[i])

    examples = [example(i, 1) for i in range(3)]
    moved = [example(i, 0) for i in range(3, 5)]
    rows = [{"model": name, "index": i, "id": f"img{i}.png",
             "label": None if labels is None else int(labels[i]), "target_original": 0,
             "target_pruned": 0, "pred_original": int(pred_o[i]), "pred_pruned": int(pred_p[i]),
             "spatial": float(per.spatial[i]), "spectral": float(per.spectral[i]),
             "h": float(per.h[i]), "js_divergence": float(js[i])} for i in range(n)]
    info = ModelInfo(name, f"/x/{name}.onnx", "ab" * 32, 1000 + size, 500, 400, 100 * size)
    return ModelScore(info, acc.result(), examples[:2], examples[1:], rows, moved=moved,
                      role=role)


def _fake_report(n_models: int = 2, with_labels: bool = True) -> ScoreReport:
    rng = np.random.default_rng(1)
    P = rng.random((12, 16, 16))
    labels = rng.integers(0, 3, 12) if with_labels else None
    scores_o = rng.normal(size=(12, 3))
    models = []
    for k in range(n_models):
        Q = np.clip(P + rng.normal(scale=0.2 * (k + 1), size=P.shape), 0, 1)
        models.append(_model_score(f"m{k}", P, Q, labels, scores_o,
                                   scores_o + rng.normal(size=(12, 3)), rng, size=k))
    original = ModelInfo("orig", "/x/orig.onnx", "cd" * 32, 2000, 500, 400, 0)
    config = {"method": "gradcam", "target": "label", "spatial": "ssim", "spectral": "tv",
              "aggregation": "mean", "versions": {"onnx": "1"}}
    return ScoreReport(original, models, config, 12, ["a", "b", "c"],
                       models[0].result.accuracy_original)


FAITHFULNESS = ("deletion_auc", "insertion_auc", "cam_mult_change", "road_morf", "road_lerf",
                "road_combined")


def _banded_report(n_models: int = 4, n_references: int = 2,
                   faithfulness: bool = True) -> ScoreReport:
    """A report with a random floor, reference models, bands, rank correlations and (with
    ``faithfulness``) faithfulness figures, set as ``score_models`` sets them."""
    report = _fake_report(n_models)
    rng = np.random.default_rng(7)
    P = np.random.default_rng(1).random((12, 16, 16))
    labels = np.array([r["label"] for r in report.models[0].rows])
    scores_o = rng.normal(size=(12, 3))
    # The floor: maps and outputs unrelated to the original's; references: moderately noisy.
    report.references.append(_model_score("random-floor", P, rng.random(P.shape), labels,
                                          scores_o, rng.normal(size=(12, 3)), rng, "floor"))
    for k in range(n_references):
        Q = np.clip(P + rng.normal(scale=0.3 + 0.1 * k, size=P.shape), 0, 1)
        report.references.append(_model_score(f"ref{k}", P, Q, labels, scores_o,
                                              scores_o + rng.normal(size=(12, 3)), rng,
                                              "reference"))
    floor = report.floor.sp2ps
    levels = [m.sp2ps for m in report.references if m.role == "reference"]
    for model in report.models:
        model.band = band_of(model.sp2ps, floor, levels)
    report.correlations = rank_correlations(report.models)
    if faithfulness:
        for model in [*report.models, *report.references]:
            model.faithfulness = dict(zip(FAITHFULNESS, rng.random(6), strict=True))
        report.original_faithfulness = dict(zip(FAITHFULNESS, rng.random(6), strict=True))
    return report


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
    worst = report.models[0].worst
    grid = examples_figure(worst, report.class_names, compared="reference")
    rows = [axis for axis in grid.axes if axis.images]
    assert len(rows) == len(worst)
    for axis, example in zip(rows, worst, strict=True):
        strip = np.asarray(axis.images[0].get_array())
        expected = (np.repeat(example.image, 3, axis=2), overlay(example.image, example.original_map),
                    overlay(example.image, example.pruned_map))
        width = example.image.shape[1]
        gap = (strip.shape[1] - 3 * width) // 2
        for k, panel in enumerate(expected):
            np.testing.assert_array_equal(strip[:, k * (width + gap) : k * (width + gap) + width],
                                          panel)
        assert (strip[:, width : width + gap] == 255).all()  # white between the panels
        captions = [text.get_text() for text in axis.texts]
        assert captions[0].startswith(example.sample_id)
        assert f"reference · h={example.h:.2f}" in captions


def test_html_is_self_contained_and_complete() -> None:
    report = _fake_report()
    page = render_html(report)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    references = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert references and all(r.startswith(("data:image/png;base64,", "#")) for r in references)
    assert "<script" not in page and "<link" not in page
    images = page.count('<img src="data:image/png')
    # 2 models x (2 worst + 2 best + 2 same answer, attention moved) x 3 panels + legend
    assert images == 2 * (2 + 2 + 2) * 3 + 1
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
             "m0_moved", "m1_worst", "m1_best", "m1_moved"]
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


def test_the_cli_imports_and_scores_where_matplotlib_cannot_be_imported(tmp_path) -> None:
    import subprocess
    import sys

    models = Path(__file__).resolve().parent.parent / "models"
    script = (
        "import sys; sys.modules['matplotlib'] = None; sys.modules['jinja2'] = None\n"
        "from sp2ps_onnx.cli import main\n"
        f"main(['score', {str(models / 'fmnist_cnn.onnx')!r}, "
        f"{str(models / 'pruned' / 'fmnist_cnn_mag50.onnx')!r}, '--data', "
        f"{str(models / 'samples' / 'fmnist_test.npz')!r}, '--preset', 'unit', '--limit', '8', "
        "'--no-report', '--format', 'csv', '-q'])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "fmnist_cnn_mag50" in done.stdout


# --------------------------------------------------------------------------------------
# The band, the decision/attention split, faithfulness (issue 18)


def _all_bands_report() -> ScoreReport:
    """A banded report whose four pruned models fall in the four bands: the floor and the
    references are moved (their results replaced) to bracket the models' scores."""
    import dataclasses

    report = _banded_report(4, 2)
    first, second, third, fourth = (m.sp2ps for m in report.ranked())
    levels = {"random-floor": fourth + 0.01, "ref0": (second + first) / 2 - 1e-3,
              "ref1": (second + third) / 2}
    for model in report.references:
        model.result = dataclasses.replace(model.result, sp2ps=levels[model.info.name])
    for model in report.models:
        model.band = band_of(model.sp2ps, levels["random-floor"], [levels["ref0"],
                                                                    levels["ref1"]])
    assert {m.band for m in report.models} == set(BANDS)
    return report


def _expected_band(report: ScoreReport, model: ModelScore) -> str | None:
    references = [m.sp2ps for m in report.references if m.role == "reference"]
    return band_of(model.sp2ps, report.floor.sp2ps if report.floor else None, references)


def test_every_band_has_a_distinct_short_label() -> None:
    from sp2ps_onnx.formatting import BAND_LABELS, band_label

    assert set(BAND_LABELS) == set(BANDS)
    assert len(set(BAND_LABELS.values())) == len(BANDS)
    assert band_label(BANDS[1], has_references=False) == "> floor"
    assert band_label(None) == ""


NEW_FIELDS = ("mean_js_divergence", "same_answer_n", "same_answer_sp2ps", "different_answer_n",
              "different_answer_sp2ps", "same_answer_gap_share")


def _assert_row_numbers(row: dict, model: ModelScore, parse=lambda v: v) -> None:
    """Every number of a table row (JSON values or CSV strings) against the model."""
    for name in NEW_FIELDS:
        expected = getattr(model.result, name)
        got = parse(row[name])
        if expected is None:
            assert got in (None, ""), name
        else:
            assert float(got) == pytest.approx(float(expected), abs=1e-12), name
    for key, value in (model.faithfulness or {}).items():
        assert float(parse(row[key])) == pytest.approx(value, abs=1e-12), key
    assert float(parse(row["sp2ps"])) == pytest.approx(model.sp2ps, abs=1e-12)


def test_json_table_has_references_unranked_bands_split_and_faithfulness() -> None:
    report = _all_bands_report()
    data = json.loads(format_table(report, "json"))
    ranked = report.ranked()
    assert [m["model"] for m in data["models"]] == [m.info.name for m in ranked]
    assert [m["rank"] for m in data["models"]] == list(range(1, len(ranked) + 1))
    assert [(r["model"], r["role"], r["rank"]) for r in data["references"]] == [
        ("random-floor", "floor", None), ("ref0", "reference", None), ("ref1", "reference", None)]
    for row, model in zip(data["models"], ranked, strict=True):
        assert row["role"] == "pruned"
        assert row["band"] == _expected_band(report, model)  # the full text
        _assert_row_numbers(row, model)
    for row, model in zip(data["references"], report.references, strict=True):
        assert row["band"] is None
        _assert_row_numbers(row, model)
    assert data["band"]["floor"] == pytest.approx(report.floor.sp2ps)
    assert data["band"]["references"] == pytest.approx(
        {m.info.name: m.sp2ps for m in report.references[1:]})
    assert data["correlations"] == pytest.approx(report.correlations)
    assert data["original"]["role"] == "original" and "sp2ps" not in data["original"]
    for key, value in report.original_faithfulness.items():
        assert data["original"][key] == pytest.approx(value)


def test_csv_table_has_every_row_and_number() -> None:
    report = _all_bands_report()
    rows = list(csv.DictReader(format_table(report, "csv").splitlines()))
    ranked = report.ranked()
    # Ranked models first (the first row is the best), then the original and references.
    assert [r["model"] for r in rows] == [m.info.name for m in ranked] + [
        "orig", "random-floor", "ref0", "ref1"]
    assert [r["role"] for r in rows] == ["pruned"] * 4 + ["original", "floor", "reference",
                                                          "reference"]
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4", "", "", "", ""]
    for row, model in zip(rows[:4], ranked, strict=True):
        assert row["band"] == _expected_band(report, model)
        _assert_row_numbers(row, model)
    for row, model in zip(rows[5:], report.references, strict=True):
        assert row["band"] == ""
        _assert_row_numbers(row, model)
    original = rows[4]
    assert original["sp2ps"] == "" and float(original["accuracy"]) == pytest.approx(
        report.accuracy_original)
    for key, value in report.original_faithfulness.items():
        assert float(original[key]) == pytest.approx(value)


def _text_rows(text: str) -> list[list[str]]:
    """The cells of the first block of an aligned text table (two or more spaces apart)."""
    block = text.split("\n\n")[0].splitlines()[1:]
    return [re.split(r"\s{2,}", line.strip()) for line in block[2:]]


def _markdown_rows(text: str) -> list[list[str]]:
    block = text.split("\n\n")[0].splitlines()
    return [[c.strip() for c in line.strip("|").split("|")] for line in block[2:]]


@pytest.mark.parametrize("fmt", ["table", "markdown"])
def test_text_tables_show_references_after_the_original_unranked_and_bands(fmt: str) -> None:
    from sp2ps_onnx.formatting import band_label

    report = _all_bands_report()
    text = format_table(report, fmt)
    rows = _text_rows(text) if fmt == "table" else _markdown_rows(text)
    header = text.split("\n\n")[0].splitlines()[1 if fmt == "table" else 0]
    if fmt == "markdown":  # a table from the first line
        rule = text.splitlines()[1]
        assert header.count("|") == rule.count("|") and set(rule) <= set("|-:")
    assert "band" in header and "JS div" in header
    assert [r[:2] for r in rows[:4]] == [["–", "orig (original)"],
                                         ["–", "random-floor (random floor)"],
                                         ["–", "ref0 (reference)"], ["–", "ref1 (reference)"]]
    ranked = report.ranked()
    band_column = 4  # #, model, Sp2PS, 95% CI, band
    for cells, (rank, model) in zip(rows[4:], enumerate(ranked, start=1), strict=True):
        assert cells[0] == str(rank) and cells[1] == model.info.name
        assert cells[2] == f"{model.sp2ps:.3f}"
        assert cells[band_column] == band_label(_expected_band(report, model))
        js = f"{model.result.mean_js_divergence:.3f}"
        assert js in cells
    # Down the ranking the bands fall from above the references to the floor; the labels say so.
    assert [cells[band_column] for cells in rows[4:]] == ["> ref", "≈ ref", "floor–ref",
                                                           "≤ floor"]
    # The split: one row per compared model, with the counts.
    for model in [*report.references, *ranked]:
        result = model.result
        line = next(line for line in text.splitlines()
                    if line.strip("| ").startswith(model.info.name + " ")
                    and f"({result.same_answer_n})" in line)
        assert f"{result.same_answer_sp2ps:.3f} ({result.same_answer_n})" in line
        if result.different_answer_n:
            assert (f"{result.different_answer_sp2ps:.3f} ({result.different_answer_n})"
                    in line)
        assert f"{100 * result.same_answer_gap_share:.0f}%" in line
    # Faithfulness: the original's row, then every model's.
    assert "deletion ↓" in text and "ROAD comb. ↑" in text
    assert f"{report.original_faithfulness['deletion_auc']:.3f}" in text
    flat = " ".join(text.split())
    rho = report.correlations
    assert f"Sp2PS vs accuracy ρ = {rho['sp2ps_vs_accuracy']:.2f}" in flat
    assert f"vs top-1 agreement ρ = {rho['sp2ps_vs_agreement']:.2f}" in flat
    if fmt == "table":
        assert max(len(line) for line in text.splitlines()) <= 110


def test_rank_correlations_shown_are_spearmans() -> None:
    from scipy import stats

    from sp2ps_onnx.report import correlation_text

    report = _banded_report(5, 1)
    sp2ps = [m.sp2ps for m in report.models]
    accuracy = [m.result.accuracy_pruned for m in report.models]
    agreement = [m.result.top1_agreement for m in report.models]
    text = correlation_text(report)
    assert f"ρ = {stats.spearmanr(sp2ps, accuracy).statistic:.2f}" in text
    assert f"ρ = {stats.spearmanr(sp2ps, agreement).statistic:.2f}" in text
    report.correlations = {"models": 2, "sp2ps_vs_accuracy": None, "sp2ps_vs_agreement": None}
    assert correlation_text(report) is None
    assert "ρ" not in format_table(report)


def test_floor_alone_reads_above_floor_and_no_band_without_either() -> None:
    report = _banded_report(3, 0, faithfulness=False)
    text = format_table(report)
    labels = {cells[4] for cells in _text_rows(text)[2:]}
    assert labels <= {"> floor", "≤ floor"} and labels
    assert "references" not in text.split("\n\n")[-1].splitlines()[0]
    assert "deletion" not in text  # no faithfulness, no such block
    plain = format_table(_fake_report())
    assert "band" not in plain.splitlines()[1] and "(random floor)" not in plain
    data = json.loads(format_table(_fake_report(), "json"))
    assert data["references"] == [] and data["band"] == {"floor": None, "references": {}}


def test_per_sample_csv_has_every_compared_model_and_its_js_divergence(tmp_path: Path) -> None:
    report = _banded_report(2, 1)
    write_report(report, tmp_path, formats=("png",))
    rows = list(csv.DictReader((tmp_path / "per_sample.csv").open()))
    compared = [*report.models, *report.references]
    assert len(rows) == sum(len(m.rows) for m in compared)
    for model in compared:
        mine = [r for r in rows if r["model"] == model.info.name]
        assert {r["role"] for r in mine} == {model.role}
        js = np.array([float(r["js_divergence"]) for r in mine])
        expected = [row["js_divergence"] for row in model.rows]
        np.testing.assert_allclose(js, expected, rtol=1e-12)
        # ... which is the per-sample divergence whose mean the result reports.
        assert js.mean() == pytest.approx(model.result.mean_js_divergence, abs=1e-9)
    data = json.loads((tmp_path / "results.json").read_text())
    for entry, model in zip(data["models"], report.models, strict=True):
        for name in NEW_FIELDS:
            assert entry["result"][name] == pytest.approx(getattr(model.result, name))
        assert entry["band"] == model.band
    assert [r["role"] for r in data["references"]] == ["floor", "reference"]
    figures = {p.stem for p in (tmp_path / "figures").iterdir()}
    assert figures == {"sp2ps_vs_accuracy", "sp2ps_by_model", "per_class_h"} | {
        f"{m.info.name}_{kind}" for m in report.models for kind in ("worst", "best", "moved")}


def _band_artists(axis) -> dict[str, float]:
    """label -> position of the band's lines as drawn."""
    drawn = {}
    for line in axis.lines:
        label = line.get_label()
        if "random floor" in label or "(reference)" in label:
            xdata, ydata = line.get_xdata(), line.get_ydata()
            # Horizontal lines have a constant y, vertical ones a constant x.
            drawn[label] = float(ydata[0] if ydata[0] == ydata[-1] and xdata[0] != xdata[-1]
                                 else xdata[0])
    return drawn


@pytest.mark.parametrize("make", [scatter_figure, sp2ps_bar_figure])
def test_figures_draw_the_band_with_a_legend(make) -> None:
    report = _banded_report(3, 2)
    figure = make(report)
    axis = figure.axes[0]
    drawn = _band_artists(axis)
    expected = {f"random floor {report.floor.sp2ps:.3f}": report.floor.sp2ps}
    expected |= {f"{m.info.name} (reference) {m.sp2ps:.3f}": m.sp2ps
                 for m in report.references[1:]}
    assert drawn == pytest.approx(expected)
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert set(expected) <= set(legend) and "references' range" in legend
    # The references' range is shaded from the lowest to the highest reference.
    levels = sorted(m.sp2ps for m in report.references[1:])
    (span,) = [p for p in axis.patches if p.get_label() == "references' range"]
    # In the span's own coordinates its Sp2PS side is in data units (the other: axes).
    corners = span.get_patch_transform().transform(span.get_path().vertices)
    values = corners[:, 1 if make is scatter_figure else 0]
    assert (values.min(), values.max()) == pytest.approx(tuple(levels))


def test_band_labels_on_the_bars_match_the_bands() -> None:
    from sp2ps_onnx.formatting import band_label

    report = _all_bands_report()
    texts = [t.get_text() for t in sp2ps_bar_figure(report).axes[0].texts]
    for model in report.ranked():
        label = f"{model.sp2ps:.3f}  {band_label(_expected_band(report, model))}"
        assert label in texts


def test_html_has_references_bands_split_moved_grids_and_faithfulness() -> None:
    from sp2ps_onnx.formatting import band_label

    report = _all_bands_report()
    page = render_html(report)
    ranking = page[page.index("<h2>Ranking</h2>") : page.index("</tbody></table>")]
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", ranking, flags=re.S)[1:]  # after the header
    names = [re.sub(r"<[^>]+>", "", re.split(r"</td>", row)[1]).strip() for row in rows]
    assert names == ["orig (original)", "random-floor (random floor)", "ref0 (reference)",
                     "ref1 (reference)", *(m.info.name for m in report.ranked())]
    ranks = [re.search(r"<td>(.*?)</td>", row).group(1) for row in rows]
    assert ranks == ["–"] * 4 + [str(i) for i in range(1, 5)]
    for row, model in zip(rows[4:], report.ranked(), strict=True):
        band = _expected_band(report, model)
        assert f'title="{band}">{html.escape(band_label(band))}</td>' in row
    # Band ticks on every score bar: the floor and each reference.
    assert ranking.count('class="mark floor"') == 7 and ranking.count('class="mark refmark"') == 14
    assert "How to read these numbers" in page and "How to read a score" in page
    assert "Spearman rank correlation" in page
    # One "same answer, attention moved" grid per compared model, with its samples.
    compared = [*report.models, *report.references]
    assert page.count("<h4>same answer, attention moved</h4>") == len(compared)
    images = page.count('<img src="data:image/png')
    assert images == len(compared) * (2 + 2 + 2) * 3 + 1
    split = page[page.index("<h2>Decision versus attention</h2>") :]
    for model in compared:
        result = model.result
        assert f"{result.same_answer_sp2ps:.3f} ({result.same_answer_n})" in split
    faith = page[page.index("<h2>Faithfulness of each model"):page.index("<h2>Sp2PS vs")]
    assert "deletion ↓" in faith and f"{report.original_faithfulness['road_combined']:.3f}" in faith
    assert page.count("<svg") == 1


def test_html_without_moved_examples_or_faithfulness_leaves_them_out() -> None:
    report = _banded_report(2, 1, faithfulness=False)
    for model in report.models:
        model.moved = []
    page = render_html(report)
    assert "Faithfulness of each model" not in page
    # Left out where nothing was kept; the references' grids stay.
    assert page.count("<h4>same answer, attention moved</h4>") == len(report.references)


def test_notebook_view_has_reference_rows_and_band() -> None:
    report = _all_bands_report()
    fragment = notebook_html(report)
    table = fragment[: fragment.index("</table>")]
    assert "random-floor (random floor)" in table and "ref1 (reference)" in table
    assert table.index("(random floor)") < table.index("<td>1</td>")
    assert "floor–ref" in table and "Spearman" in fragment
