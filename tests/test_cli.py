"""The ``sp2ps`` command line and the scoring API, end to end.

Tiny CNNs exported from torch (legacy exporter) keep these tests fast; numbers written by
the CLI are compared with the metric computed directly through the Python API
(``tests/test_cli_bundled.py`` does the same on the bundled Fashion-MNIST models).
"""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
import warnings
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from sp2ps_onnx import CamModel
from sp2ps_onnx.cli import cli
from sp2ps_onnx.metric import Sp2PSAccumulator
from sp2ps_onnx.scoring import CamOptions, DataOptions, MetricOptions, RunOptions, score_models

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
NUM_CLASSES = 4
SIZE = 16


# --------------------------------------------------------------------------------------
# Fixtures: tiny models and data in every format


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torch
    from torch import nn

    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self, nhwc: bool = False, classes: int = NUM_CLASSES, channels: int = 1):
            super().__init__()
            self.nhwc = nhwc
            self.features = nn.Sequential(
                nn.Conv2d(channels, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
            )
            self.head = nn.Linear(8, classes)

        def forward(self, x):
            if self.nhwc:
                x = x.permute(0, 3, 1, 2)
            return self.head(self.features(x).mean(dim=(2, 3)))

    root = tmp_path_factory.mktemp("tiny")
    paths: dict[str, Path] = {}

    def export(name: str, model: nn.Module, shape: tuple[int, ...], dynamic_hw: bool = False):
        model.eval()
        paths[name] = root / f"{name}.onnx"
        axes = {0: "N", 2: "H", 3: "W"} if dynamic_hw else {0: "N"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, torch.rand(*shape), str(paths[name]), input_names=["input"],
                output_names=["logits"], dynamic_axes={"input": axes, "logits": {0: "N"}},
                dynamo=False, opset_version=17,
            )

    original = Net()
    export("original", original, (2, 1, SIZE, SIZE))
    pruned = Net()
    pruned.load_state_dict(original.state_dict())
    with torch.no_grad():
        weight = pruned.features[3].weight
        weight[weight.abs() < weight.abs().median()] = 0
    paths["zeros_expected"] = int((weight == 0).sum())  # type: ignore[assignment]
    paths["weights_expected"] = sum(  # type: ignore[assignment]
        m.weight.numel() for m in pruned.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    )
    export("pruned", pruned, (2, 1, SIZE, SIZE))
    nhwc = Net(nhwc=True)
    nhwc.load_state_dict(pruned.state_dict())
    export("pruned_nhwc", nhwc, (2, SIZE, SIZE, 1))
    export("five_classes", Net(classes=5), (2, 1, SIZE, SIZE))
    export("dynamic", original, (2, 1, SIZE, SIZE), dynamic_hw=True)

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (18, SIZE, SIZE), dtype=np.uint8)
    y = rng.integers(0, NUM_CLASSES, 18)
    np.savez(root / "data.npz", x=x, y=y)
    np.save(root / "data.npy", x[:6])
    folder = root / "folder"
    class_names = ["delta", "alpha", "charlie", "bravo"]  # not sorted: --classes matters
    for i in range(8):
        label = int(y[i])
        (folder / class_names[label]).mkdir(parents=True, exist_ok=True)
        iio.imwrite(folder / class_names[label] / f"s{i:02d}.png", x[i])
    flat = root / "flat"
    flat.mkdir()
    for i in range(3):
        iio.imwrite(flat / f"f{i}.png", np.stack([x[i]] * 3, axis=-1))  # RGB into a grey model
    (root / "classes.txt").write_text("\n".join(class_names) + "\n")
    (root / "table.csv").write_text("a,b\n1,2\n")
    paths.update(root=root, npz=root / "data.npz", npy=root / "data.npy", folder=folder,
                 flat=flat, classes=root / "classes.txt", csv=root / "table.csv")
    return paths


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def assert_user_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sp2ps: error: "), lines[0]
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def direct_metric(original: Path, pruned: Path, x_uint8: np.ndarray, labels: np.ndarray | None,
                  target: str = "label", method: str = "gradcam"):
    """Sp2PS through the Python API only: CamModel + x/255 + Sp2PSAccumulator."""
    o, p = CamModel(str(original)), CamModel(str(pruned))

    def prepare(model: CamModel) -> np.ndarray:
        x = x_uint8.astype(np.float32) / 255.0
        return x[:, None] if model.layout == "NCHW" else x[..., None]

    xo, xp = prepare(o), prepare(p)
    maps_o, t_o = o.cams(xo, method=method, targets=labels if target == "label" else None)
    maps_p, _ = p.cams(xp, method=method, targets=t_o)
    acc = Sp2PSAccumulator(n_bootstrap=50, seed=0)
    acc.update(maps_o, maps_p, labels, targets=t_o, original_scores=o.scores(xo),
               pruned_scores=p.scores(xp))
    return acc.result()


# --------------------------------------------------------------------------------------
# score


def test_score_matches_the_python_api_and_writes_every_output(tiny, tmp_path: Path) -> None:
    out = tmp_path / "report"
    hashes = {name: sha(tiny[name]) for name in ("original", "pruned", "pruned_nhwc", "npz")}
    result = invoke("score", tiny["original"], tiny["pruned"], tiny["pruned_nhwc"],
                    "--data", tiny["npz"], "--preset", "unit", "--out", out, "--bootstrap", 50,
                    "--batch-size", 5, "--format", "json", "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""  # quiet: no notes, no progress bar
    assert {p.name for p in out.iterdir()} == {"results.json", "per_sample.csv", "report.html",
                                               "figures"}
    data = json.loads((out / "results.json").read_text())
    archive = np.load(tiny["npz"])
    expected = direct_metric(tiny["original"], tiny["pruned"], archive["x"], archive["y"])
    by_name = {m["name"]: m for m in data["models"]}
    for name in ("pruned", "pruned_nhwc"):  # same weights, other layout: same numbers
        got = by_name[name]["result"]
        for key in ("sp2ps", "mean_spatial", "mean_spectral", "median_h", "p05_h",
                    "top1_agreement", "accuracy_original", "accuracy_pruned"):
            assert got[key] == pytest.approx(getattr(expected, key), abs=2e-5), (name, key)
        assert got["ci95"] == pytest.approx(list(expected.ci95), abs=2e-5)
        assert got["n"] == 18
    assert data["original"]["accuracy"] == pytest.approx(expected.accuracy_original)
    assert data["config"]["target"] == "label" and data["config"]["preset"] == "unit"
    assert by_name["pruned"]["sha256"] == hashes["pruned"]
    assert by_name["pruned"]["zero_weights"] == tiny["zeros_expected"]
    assert by_name["pruned"]["weight_count"] == tiny["weights_expected"]
    assert data["config"]["versions"]["onnxruntime"]
    # The per-sample table holds the same h values, 18 rows per model (and the random floor's).
    rows = list(csv.DictReader((out / "per_sample.csv").open()))
    assert len([r for r in rows if r["role"] == "pruned"]) == 36
    assert len([r for r in rows if r["role"] == "floor"]) == 18
    h = np.array([float(r["h"]) for r in rows if r["model"] == "pruned"])
    assert h.mean() == pytest.approx(expected.sp2ps, abs=1e-5)
    # stdout: the ranking as JSON.
    printed = json.loads(result.stdout)
    assert [m["model"] for m in printed["models"]] == data["ranking"]
    # Inputs are untouched.
    assert hashes == {name: sha(tiny[name]) for name in hashes}


def test_original_against_itself_scores_one(tiny, tmp_path: Path) -> None:
    result = invoke("score", tiny["original"], tiny["original"], "--data", tiny["npz"],
                    "--preset", "unit", "--out", tmp_path / "r", "--bootstrap", 20,
                    "--format", "csv", "-q")
    assert result.exit_code == 0, result.output
    row = next(csv.DictReader(result.stdout.splitlines()))
    assert float(row["sp2ps"]) == pytest.approx(1.0, abs=1e-6)
    assert float(row["top1_agreement"]) == 1.0
    data = json.loads((tmp_path / "r" / "results.json").read_text())
    assert data["models"][0]["name"] == "original-2"  # duplicate stems are told apart


@pytest.mark.parametrize("target", ["original", "self"])
def test_score_target_modes(tiny, tmp_path: Path, target: str) -> None:
    report = score_models(
        tiny["original"],
        [tiny["pruned"]],
        tiny["npz"],
        cam=CamOptions(target=target),
        data_options=DataOptions(preset="unit", limit=10),
        metric=MetricOptions(n_bootstrap=0),
        run=RunOptions(device="cpu"),
    )
    rows = report.models[0].rows
    assert len(rows) == 10 and report.config["target"] == target
    for row in rows:
        assert row["target_original"] == row["pred_original"]
        expected = row["pred_pruned"] if target == "self" else row["pred_original"]
        assert row["target_pruned"] == expected


def test_original_cams_are_computed_once_per_batch(tiny) -> None:
    original = CamModel(str(tiny["original"]))
    calls: list[int] = []
    real = original.cams

    def counting(x, *args, **kwargs):
        calls.append(len(x))
        return real(x, *args, **kwargs)

    original.cams = counting  # type: ignore[method-assign]
    report = score_models(
        original,
        [tiny["pruned"], tiny["pruned_nhwc"], tiny["pruned"]],
        tiny["npz"],
        data_options=DataOptions(preset="unit"),
        metric=MetricOptions(n_bootstrap=0),
        run=RunOptions(batch_size=7),
    )
    assert calls == [7, 7, 4]  # once per batch, not once per pruned model
    assert [m.info.name for m in report.models] == ["pruned", "pruned_nhwc", "pruned-2"]
    assert len(report.models[0].worst) == 4 and len(report.models[0].best) == 4
    h = [r["h"] for r in report.models[0].rows]
    assert report.models[0].worst[0].h == pytest.approx(min(h))
    assert report.models[0].best[0].h == pytest.approx(max(h))


@pytest.mark.parametrize("fmt", ["table", "markdown", "csv", "json"])
def test_score_every_data_format_and_table_format(
    tiny, tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for key, extra in (("folder", ["--classes", tiny["classes"]]), ("flat", []), ("npy", [])):
        result = invoke("score", tiny["original"], tiny["pruned_nhwc"], "--data", tiny[key],
                        "--preset", "unit", "--no-report", "--format", fmt, "--bootstrap", 10,
                        *extra)
        assert result.exit_code == 0, (key, result.output)
        text = result.stdout
        if fmt == "json":
            assert json.loads(text)["models"][0]["model"] == "pruned_nhwc"
        elif fmt == "csv":
            assert next(csv.DictReader(text.splitlines()))["model"] == "pruned_nhwc"
        elif fmt == "markdown":
            header, rule = text.splitlines()[:2]
            assert header.count("|") == rule.count("|") and set(rule) <= set("|-:")
            assert "pruned_nhwc" in text
        else:
            assert "pruned_nhwc" in text and "Sp2PS" in text
    assert list(tmp_path.iterdir()) == []  # --no-report writes nothing


def test_folder_labels_follow_the_classes_file(tiny, tmp_path: Path) -> None:
    out = tmp_path / "r"
    result = invoke("score", tiny["original"], tiny["pruned"], "--data", tiny["folder"],
                    "--classes", tiny["classes"], "--preset", "unit", "--out", out, "-q",
                    "--bootstrap", 0)
    assert result.exit_code == 0, result.output
    labels = np.load(tiny["npz"])["y"][:8]
    rows = list(csv.DictReader((out / "per_sample.csv").open()))
    by_id = {r["id"]: r for r in rows}
    names = tiny["classes"].read_text().split()
    for i in range(8):
        row = by_id[f"{names[labels[i]]}/s{i:02d}.png"]
        assert int(row["label"]) == labels[i] and row["label_name"] == names[labels[i]]
        assert int(row["target_original"]) == labels[i]


# --------------------------------------------------------------------------------------
# Errors: one line, exit 2, nothing left behind


def _siblings(path: Path) -> set[str]:
    return {p.name for p in path.parent.iterdir()} if path.parent.exists() else set()


@pytest.mark.parametrize(
    "case, fragments",
    [
        ("missing_model", ["nope.onnx", "does not exist"]),
        ("missing_data", ["missing.npz", "does not exist"]),
        ("wrong_format", ["table.csv", "unsupported format"]),
        ("mismatch", ["five_classes", "5 classes"]),
        ("label_without_labels", ["--target label"]),
        ("not_onnx", ["data.npz", "ONNX"]),
    ],
)
def test_score_errors(tiny, tmp_path: Path, case: str, fragments: list[str]) -> None:
    original, pruned, data = tiny["original"], tiny["pruned"], tiny["npz"]
    extra: list[str] = []
    if case == "missing_model":
        pruned = tmp_path / "nope.onnx"
    elif case == "missing_data":
        data = tmp_path / "missing.npz"
    elif case == "wrong_format":
        data = tiny["csv"]
    elif case == "mismatch":
        pruned = tiny["five_classes"]
    elif case == "label_without_labels":
        data, extra = tiny["flat"], ["--target", "label"]
    elif case == "not_onnx":
        pruned = tiny["npz"]
    out = tmp_path / "out" / "report"
    (tmp_path / "out").mkdir()
    result = invoke("score", original, pruned, "--data", data, "--preset", "unit",
                    "--out", out, *extra)
    assert_user_error(result, *fragments)
    assert not out.exists()
    assert _siblings(out) == set()  # no temporary directory left either


def test_score_refuses_a_foreign_out_directory_and_keeps_it(tiny, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    result = invoke("score", tiny["original"], tiny["pruned"], "--data", tiny["npz"],
                    "--out", out, "--preset", "unit")
    assert_user_error(result, "not an earlier sp2ps output")
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]


def test_score_replaces_an_earlier_report(tiny, tmp_path: Path) -> None:
    out = tmp_path / "r"
    args = ["score", tiny["original"], tiny["pruned"], "--data", tiny["npz"], "--preset", "unit",
            "--out", out, "-q", "--bootstrap", 0]
    assert invoke(*args, "--limit", 5).exit_code == 0
    assert_user_error(invoke(*args, "--limit", 7), "--force")
    assert json.loads((out / "results.json").read_text())["n"] == 5
    assert invoke(*args, "--limit", 7, "--force").exit_code == 0
    assert json.loads((out / "results.json").read_text())["n"] == 7
    assert _siblings(out) == {"r"}


def test_entry_point_prints_one_line_without_traceback(tiny, tmp_path: Path) -> None:
    process = subprocess.run(
        [sys.executable, "-m", "sp2ps_onnx.cli", "score", str(tiny["original"]),
         str(tiny["five_classes"]), "--data", str(tiny["npz"]), "--out", str(tmp_path / "r")],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert process.returncode == 2
    assert process.stderr.count("\n") == 1 and process.stderr.startswith("sp2ps: error: ")
    assert "Traceback" not in process.stderr and process.stdout == ""
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------------------
# cam, inspect, export


def test_cam_writes_overlays_and_maps_equal_to_the_api(tiny, tmp_path: Path) -> None:
    out = tmp_path / "cams"
    result = invoke("cam", tiny["pruned_nhwc"], tiny["npz"], "-o", out, "--preset", "unit",
                    "--limit", 5, "--method", "gradcam++", "-q")
    assert result.exit_code == 0, result.output
    model = CamModel(str(tiny["pruned_nhwc"]))
    archive = np.load(tiny["npz"])
    x = archive["x"][:5].astype(np.float32)[..., None] / 255
    maps, targets = model.cams(x, method="gradcam++", targets=archive["y"][:5])
    rows = list(csv.DictReader((out / "cams.csv").open()))
    assert [int(r["target"]) for r in rows] == targets.tolist()
    for i, row in enumerate(rows):
        stem = Path(row["file"]).stem
        np.testing.assert_allclose(np.load(out / f"{stem}.npy"), maps[i], atol=1e-6)
        assert iio.imread(out / row["file"]).shape == (SIZE, SIZE, 3)


def test_cam_on_single_files_and_flat_folder(tiny, tmp_path: Path) -> None:
    files = sorted(tiny["flat"].iterdir())
    out = tmp_path / "c"
    result = invoke("cam", tiny["original"], files[0], tiny["flat"], "-o", out, "--preset",
                    "unit", "-q")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "cams.csv").open()))
    assert len(rows) == 1 + len(files) and len({r["file"] for r in rows}) == len(rows)
    assert all(r["label"] == "" for r in rows)
    assert_user_error(invoke("cam", tiny["original"], tiny["csv"], "-o", tmp_path / "d"),
                      "unsupported format")
    assert not (tmp_path / "d").exists()


def test_inspect_reports_layout_classes_and_sparsity(tiny) -> None:
    result = invoke("inspect", tiny["pruned_nhwc"], "--format", "json")
    assert result.exit_code == 0, result.output
    details = json.loads(result.stdout)
    assert details["layout"] == "NHWC" and details["num_classes"] == NUM_CLASSES
    assert details["inputs"][0]["shape"][1:] == [SIZE, SIZE, 1]
    assert details["zero_weights"] == tiny["zeros_expected"]
    assert details["weight_count"] == tiny["weights_expected"]
    assert details["sha256"] == sha(tiny["pruned_nhwc"])
    assert all(op["has_rule"] for op in details["head_ops"])
    text = invoke("inspect", tiny["original"])
    assert text.exit_code == 0 and "NCHW" in text.stdout and "layer" in text.stdout
    assert_user_error(invoke("inspect", tiny["root"] / "none.onnx"), "does not exist")
    assert_user_error(invoke("inspect", tiny["original"], "--layer", "no_such_tensor"),
                      "no_such_tensor")


def test_export_writes_a_runnable_model_and_never_its_input(tiny, tmp_path: Path) -> None:
    import onnxruntime as ort

    out = tmp_path / "cam.onnx"
    result = invoke("export", tiny["original"], "-o", out)
    assert result.exit_code == 0, result.output
    rewritten = onnx.load(str(out))
    assert "target" in [i.name for i in rewritten.graph.input]
    x = np.random.default_rng(1).random((3, 1, SIZE, SIZE), dtype=np.float32)
    plain = ort.InferenceSession(str(tiny["original"]), providers=["CPUExecutionProvider"])
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feeds = {"input": x, "target": np.full(3, -1, dtype=np.int64)}
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
    logits = plain.run(None, {"input": x})[0]
    assert any(np.allclose(v, logits, atol=1e-5) for v in outputs.values() if v.shape == logits.shape)
    before = sha(tiny["original"])
    assert_user_error(invoke("export", tiny["original"], "-o", tiny["original"]), "input model")
    assert_user_error(invoke("export", tiny["original"], "-o", out), "--force")
    assert invoke("export", tiny["original"], "-o", out, "--force").exit_code == 0
    assert sha(tiny["original"]) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cam.onnx"]


def test_progress_bar_only_on_request(tiny, tmp_path: Path, capsys) -> None:
    from sp2ps_onnx.progress import ProgressReporter

    with ProgressReporter(True, 10, "score") as bar:
        bar(5, 10)
        bar(10, 10)
    err = capsys.readouterr().err
    assert "score" in err and "10/10" in err and "100%" in err
    with ProgressReporter(False, 10, "score") as bar:
        bar(10, 10)
    assert capsys.readouterr().err == ""
    calls = []
    from sp2ps_onnx.scoring import score_models

    report = score_models(
        tiny["original"],
        [tiny["pruned"]],
        tiny["npz"],
        data_options=DataOptions(preset="unit"),
        metric=MetricOptions(n_bootstrap=0),
        run=RunOptions(batch_size=4, progress=lambda *a: calls.append(a)),
    )
    assert calls == [(min(4 * k, report.n), report.n) for k in range(1, len(calls) + 1)]
    assert calls[-1] == (report.n, report.n)
    # Under CliRunner stderr is not a terminal: only the closing note, no bar.
    result = invoke("score", tiny["original"], tiny["pruned"], "--data", tiny["npz"],
                    "--preset", "unit", "--out", tmp_path / "r", "--bootstrap", 0)
    assert result.exit_code == 0
    assert result.stderr.strip().splitlines() == [
        f"sp2ps: report written to {tmp_path / 'r' / 'report.html'}"
    ]


def test_dynamic_input_size_follows_size_option(tiny, tmp_path: Path) -> None:
    out = tmp_path / "c"
    result = invoke("cam", tiny["dynamic"], tiny["flat"], "-o", out, "--size", "24,20", "-q",
                    "--preset", "unit")
    assert result.exit_code == 0, result.output
    maps = [np.load(p) for p in sorted(out.glob("*.npy"))]
    assert len(maps) == 3 and all(m.shape == (24, 20) for m in maps)
    # The fixed-size original and its dynamic twin agree when run at the same size.
    report = score_models(
        tiny["original"],
        [tiny["dynamic"]],
        tiny["npz"],
        data_options=DataOptions(preset="unit", limit=6),
        metric=MetricOptions(n_bootstrap=0),
    )
    assert report.models[0].sp2ps == pytest.approx(1.0, abs=1e-6)


def test_device_cuda_without_cuda_runtime_is_one_line(tiny, tmp_path: Path) -> None:
    import onnxruntime as ort

    result = invoke("score", tiny["original"], tiny["pruned"], "--data", tiny["npz"],
                    "--preset", "unit", "--device", "cuda", "--out", tmp_path / "r", "-q",
                    "--bootstrap", 0, "--limit", 4)
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert result.exit_code == 0, result.output
    else:
        assert_user_error(result, "CUDAExecutionProvider", "--device cpu")
        assert not (tmp_path / "r").exists()


def test_class_list_of_the_wrong_length_is_an_error_unless_partial(tiny, tmp_path: Path) -> None:
    common = ["score", tiny["original"], tiny["pruned"], "--data", tiny["npz"],
              "--classes", "a,b,c,d,e", "--preset", "unit", "--no-report",
              "--bootstrap", 0, "--limit", 4]
    assert_user_error(invoke(*common), "--classes names 5 class(es)", "has 4 classes",
                      "--classes-partial")
    result = invoke(*common, "--classes-partial")
    assert result.exit_code == 0
    assert "sp2ps: note: the data names 5 classes but the model has 4" in result.stderr
    fine = invoke("score", tiny["original"], tiny["pruned"], "--data", tiny["npz"],
                  "--classes", tiny["classes"], "--preset", "unit", "--no-report",
                  "--bootstrap", 0, "--limit", 4)
    assert fine.exit_code == 0 and "note" not in fine.stderr
