"""The fault matrix of docs/reliability.md: bad input gives one clear error line, bad data
does not end a run, untrusted model files stay contained, nothing is lost or modified."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from sp2ps_onnx import (
    CamModel,
    InputDataError,
    LayerNotFoundError,
    ModelLoadError,
    ModelMismatchError,
    UnsupportedModelError,
    UnsupportedOpError,
    UntrustedModelError,
)
from sp2ps_onnx import data as data_module
from sp2ps_onnx.cli import cli
from sp2ps_onnx.data import open_data, read_image
from sp2ps_onnx.scoring import DataOptions, MetricOptions, score_models
from tests.tiny_models import cnn, mlp, segmenter, vector_model

SIZE = 16
CLASSES = 4


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result, *fragments: str, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sp2ps: error: ") and "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its SHA-256 (symlinks by their target name)."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            out[str(path.relative_to(root))] = "link:" + os.readlink(path)
        elif path.is_file():
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reliability")
    paths = {
        "original": save(cnn(SIZE), root / "original.onnx"),
        "pruned": save(cnn(SIZE, seed=1), root / "pruned.onnx"),
        "rgb": save(cnn(SIZE, channels=3), root / "rgb.onnx"),
        "bigger": save(cnn(32), root / "bigger.onnx"),
        "five": save(cnn(SIZE, classes=5), root / "five.onnx"),
        "mlp": save(mlp(SIZE), root / "mlp.onnx"),
        "segmenter": save(segmenter(SIZE), root / "segmenter.onnx"),
        "vector": save(vector_model(), root / "vector.onnx"),
        "no_rule": save(cnn(SIZE, head_op="Cos"), root / "no_rule.onnx"),
    }
    blob = paths["original"].read_bytes()
    (root / "truncated.onnx").write_bytes(blob[: len(blob) // 2])
    (root / "garbage.onnx").write_bytes(np.random.default_rng(0).bytes(2000))
    (root / "empty.onnx").write_bytes(b"")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, SIZE, SIZE), dtype=np.uint8)
    np.savez(root / "data.npz", x=x, y=rng.integers(0, CLASSES, 6))
    np.savez(root / "bad_labels.npz", x=x, y=np.array([0, 1, 2, 3, 7, 1]))
    iio.imwrite(root / "picture.png", x[0])
    paths.update(
        root=root, truncated=root / "truncated.onnx", garbage=root / "garbage.onnx",
        empty=root / "empty.onnx", npz=root / "data.npz", bad_labels=root / "bad_labels.npz",
        png=root / "picture.png",
    )
    return paths


# --------------------------------------------------------------------------------------
# Bad input: one clear error line, exit status 2, no traceback


@pytest.mark.parametrize(
    "model, error, fragments",
    [
        ("missing", ModelLoadError, ["missing.onnx", ".onnx file"]),
        ("truncated", ModelLoadError, ["truncated.onnx", "cannot read", "truncated"]),
        ("garbage", ModelLoadError, ["garbage.onnx", "ONNX"]),
        ("empty", ModelLoadError, ["empty.onnx"]),
        ("png", ModelLoadError, ["picture.png", "ONNX"]),
        ("mlp", LayerNotFoundError, ["mlp.onnx", "no feature map", "--layer"]),
        ("segmenter", UnsupportedModelError, ["segmenter.onnx", "not class scores (N, K)"]),
        ("vector", UnsupportedModelError, ["vector.onnx", "rank 2", "4-D image"]),
        ("no_rule", UnsupportedOpError, ["'Cos'", "'odd_node'", "no_rule.onnx", "--layer"]),
    ],
)
def test_bad_model_is_one_clear_error(files, tmp_path, model, error, fragments) -> None:
    path = files.get(model, files["root"] / f"{model}.onnx")
    with pytest.raises(error) as info:
        CamModel(path)
    for fragment in fragments:
        assert fragment in str(info.value)
    out = tmp_path / "report"
    result = invoke("score", path, files["pruned"], "--data", files["npz"], "--preset", "unit",
                    "--out", out)
    assert_one_line_error(result, *fragments)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    if model not in ("missing", "no_rule"):  # inspect lists a head op without a rule
        assert_one_line_error(invoke("inspect", path), fragments[0])


def test_a_file_too_big_for_onnx_is_refused_before_reading(tmp_path) -> None:
    big = tmp_path / "video.onnx"
    with open(big, "wb") as handle:  # sparse: takes no disk space
        handle.truncate(2 << 30)
    started = time.perf_counter()
    with pytest.raises(ModelLoadError, match="video.onnx.*larger than any ONNX protobuf"):
        CamModel(big)
    assert time.perf_counter() - started < 5


def test_input_that_is_not_numbers_is_refused(tmp_path) -> None:
    model = cnn(SIZE)
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.STRING
    with pytest.raises(UnsupportedModelError, match="element type string.*not an image"):
        CamModel(model)


@pytest.mark.parametrize(
    "pruned, fragments",
    [
        ("rgb", ["rgb", "3-channel", "1-channel"]),
        ("bigger", ["bigger", "32x32", "16x16"]),
        ("five", ["five", "5 classes", "4"]),
    ],
)
def test_mismatched_models_are_refused_before_any_compute(
    files, tmp_path, monkeypatch, pruned, fragments
) -> None:
    def no_compute(*args, **kwargs):
        raise AssertionError("a model was opened before the mismatch was found")

    monkeypatch.setattr("sp2ps_onnx.scoring.batch.open_model", no_compute)
    with pytest.raises(ModelMismatchError) as info:
        score_models(files["original"], [files["pruned"], files[pruned]], files["npz"])
    for fragment in fragments:
        assert fragment in str(info.value)
    result = invoke("score", files["original"], files[pruned], "--data", files["npz"],
                    "--out", tmp_path / "r")
    assert_one_line_error(result, *fragments)


def test_nchw_and_nhwc_of_the_same_64x64_image_work_side_by_side(tmp_path) -> None:
    nchw = save(cnn(64, channels=3, seed=4), tmp_path / "nchw.onnx")
    nhwc = save(cnn(64, channels=3, seed=4, nhwc=True), tmp_path / "nhwc.onnx")
    rng = np.random.default_rng(5)
    np.savez(tmp_path / "rgb.npz", x=rng.integers(0, 256, (5, 64, 64, 3), dtype=np.uint8))
    report = score_models(
        nchw,
        [nhwc],
        tmp_path / "rgb.npz",
        data_options=DataOptions(preset="unit"),
        metric=MetricOptions(n_bootstrap=0),
    )
    # The same function of the same image: the CAMs agree exactly, whatever the layout.
    assert report.models[0].sp2ps == pytest.approx(1.0, abs=1e-6)
    report = score_models(
        nhwc,
        [nchw],
        tmp_path / "rgb.npz",
        data_options=DataOptions(preset="unit"),
        metric=MetricOptions(n_bootstrap=0),
    )
    assert report.models[0].sp2ps == pytest.approx(1.0, abs=1e-6)


def test_label_out_of_range_is_refused_before_any_cam(files, tmp_path, monkeypatch) -> None:
    def no_cams(*args, **kwargs):
        raise AssertionError("CAMs were computed before the labels were checked")

    monkeypatch.setattr(CamModel, "cams", no_cams)
    with pytest.raises(InputDataError, match="label 7 but the model has 4 classes"):
        score_models(files["original"], [files["pruned"]], files["bad_labels"])
    result = invoke("cam", files["original"], files["bad_labels"], "-o", tmp_path / "c")
    assert_one_line_error(result, "bad_labels.npz", "label 7", "0..3")
    assert not (tmp_path / "c").exists()


def test_debug_shows_the_traceback(files, tmp_path) -> None:
    command = [sys.executable, "-m", "sp2ps_onnx.cli"]
    args = ["score", str(files["original"]), str(files["five"]), "--data", str(files["npz"]),
            "--out", str(tmp_path / "r")]
    plain = subprocess.run(command + args, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    for debug in (command + ["--debug"] + args, command + args + ["--debug"]):
        shown = subprocess.run(debug, capture_output=True, text=True, timeout=120)
        assert shown.returncode != 0
        assert "Traceback" in shown.stderr and "ModelMismatchError" in shown.stderr
    assert not (tmp_path / "r").exists()


def test_an_unexpected_exception_is_one_line_with_exit_status_3(files, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("sp2ps_onnx.cli.score_models", broken)
    result = invoke("score", files["original"], files["pruned"], "--data", files["npz"],
                    "--out", tmp_path / "r")
    assert_one_line_error(result, "internal error", "ZeroDivisionError", "--debug", code=3)
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------------------
# Bad data does not end the run


@pytest.fixture()
def faulty_folder(tmp_path: Path) -> tuple[Path, Path]:
    """Class folders with good PNGs, a truncated PNG, a garbage JPEG and an empty class;
    and the same folder without the bad files."""
    rng = np.random.default_rng(7)
    good, bad = tmp_path / "good", tmp_path / "faulty"
    for root in (good, bad):
        for k, name in enumerate(["a", "b", "c"]):
            (root / name).mkdir(parents=True)
            for i in range(3):
                image = rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8) if root == good else (
                    iio.imread(good / name / f"{k}{i}.png")
                )
                iio.imwrite(root / name / f"{k}{i}.png", image)
    (bad / "d").mkdir()  # a class without images
    png = (good / "a" / "00.png").read_bytes()
    (bad / "b" / "broken.png").write_bytes(png[: len(png) // 2])
    (bad / "c" / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0" + rng.bytes(300))
    (good / "d").mkdir()  # labels must agree: the empty class keeps index 3
    (good / "d" / ".keep").write_text("")
    return good, bad


def test_unreadable_images_and_empty_folders_are_skipped_and_listed(
    files, faulty_folder, tmp_path
) -> None:
    good, bad = faulty_folder
    source = open_data(bad)
    seen = [sample for batch in source.batches(4) for sample in batch.ids]
    assert len(seen) == 9 and "b/broken.png" not in seen
    assert sorted(f.id for f in source.faults) == ["b/broken.png", "c/garbage.jpg", "d/"]
    assert all(f.reason for f in source.faults)

    out = tmp_path / "report"
    result = invoke("score", files["original"], files["pruned"], "--data", bad, "--preset",
                    "unit", "--out", out, "--bootstrap", 0)
    assert result.exit_code == 0, result.output
    assert "skipped 3" in result.stderr
    saved = json.loads((out / "results.json").read_text())
    assert {f["id"] for f in saved["data_faults"]} == {"b/broken.png", "c/garbage.jpg", "d/"}
    assert any("broken.png" in f["reason"] for f in saved["data_faults"])
    assert saved["n"] == 9
    # The skipped files change nothing else: the score equals that of the clean folder.
    clean = score_models(
        files["original"],
        [files["pruned"]],
        good,
        data_options=DataOptions(preset="unit"),
        metric=MetricOptions(n_bootstrap=0),
    )
    assert saved["models"][0]["result"]["sp2ps"] == pytest.approx(clean.models[0].sp2ps)


def test_strict_turns_bad_data_into_an_error(files, faulty_folder, tmp_path) -> None:
    _, bad = faulty_folder
    out = tmp_path / "report"
    result = invoke("score", files["original"], files["pruned"], "--data", bad, "--out", out,
                    "--strict", "--preset", "unit")
    assert_one_line_error(result, "class folder d", "contains no images")
    (bad / "d" / "x.png").write_bytes((bad / "a" / "00.png").read_bytes())
    result = invoke("score", files["original"], files["pruned"], "--data", bad, "--out", out,
                    "--strict", "--preset", "unit")
    assert_one_line_error(result, "broken.png", "cannot decode")
    assert not out.exists()
    with pytest.raises(InputDataError, match="garbage.jpg"):
        for _ in open_data(bad / "c", strict=True).batches(8):
            pass


def test_cam_lists_skipped_files(files, faulty_folder, tmp_path) -> None:
    _, bad = faulty_folder
    out = tmp_path / "cams"
    result = invoke("cam", files["original"], bad / "b", bad / "c", "-o", out, "--preset", "unit")
    assert result.exit_code == 0, result.output
    skipped = (out / "skipped.csv").read_text().splitlines()
    assert skipped[0] == "id,reason" and len(skipped) == 3
    assert len(list(out.glob("*.npy"))) == 6


def test_data_with_only_bad_images_is_one_error(files, tmp_path) -> None:
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    result = invoke("score", files["original"], files["pruned"], "--data", tmp_path / "flat",
                    "--out", tmp_path / "r")
    assert_one_line_error(result, "no samples were read", "x.png")
    assert not (tmp_path / "r").exists()


def _png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk declaring ``width`` x ``height`` grey pixels, then a
    few bytes of compressed zeros: what a decompression bomb looks like from outside."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    body = zlib.compress(b"\x00" * 4096)
    idat = b"IDAT" + body
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
        + struct.pack(">I", len(body)) + idat + struct.pack(">I", zlib.crc32(idat))
    )


def test_decompression_bombs_are_refused_from_the_header(tmp_path, monkeypatch) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(60000, 60000))  # 3.6 G pixels in 4 KB
    started = time.perf_counter()
    with pytest.raises(InputDataError, match="bomb.png.*decompression bomb"):
        read_image(bomb)
    assert time.perf_counter() - started < 5
    # The check reads the declared size of real images too: lower the limit, refuse one.
    ok = tmp_path / "ok.png"
    iio.imwrite(ok, np.zeros((40, 30), np.uint8))
    assert read_image(ok).shape == (40, 30)
    monkeypatch.setattr(data_module, "MAX_IMAGE_PIXELS", 40 * 30 - 1)
    with pytest.raises(InputDataError, match="30 x 40 pixels"):
        read_image(ok)
    source = open_data([ok, bomb])
    assert [b.ids for b in source.batches(4)] == []
    assert sorted(f.id for f in source.faults) == ["bomb.png", "ok.png"]


# --------------------------------------------------------------------------------------
# Untrusted model files


def _external_model(tmp_path: Path, location: str) -> Path:
    """A model whose weight ``w1`` is stored externally at ``location``."""
    model = cnn(SIZE)
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    for tensor in model.graph.initializer:
        if tensor.name == "w1":
            raw = numpy_helper.to_array(tensor).tobytes()
            tensor.ClearField("float_data")
            tensor.ClearField("raw_data")
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", "0"), ("length", str(len(raw)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
    path = folder / "model.onnx"
    onnx.save(model, str(path))
    return path


def _weight_bytes() -> bytes:
    w1 = next(t for t in cnn(SIZE).graph.initializer if t.name == "w1")
    return numpy_helper.to_array(w1).tobytes()


def test_external_data_inside_the_model_folder_is_read(tmp_path) -> None:
    path = _external_model(tmp_path, "weights/w1.bin")
    (path.parent / "weights").mkdir()
    (path.parent / "weights" / "w1.bin").write_bytes(_weight_bytes())
    x = np.random.default_rng(0).normal(size=(2, 1, SIZE, SIZE)).astype(np.float32)
    np.testing.assert_array_equal(CamModel(path).scores(x), CamModel(cnn(SIZE)).scores(x))


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink_out"])
def test_external_data_outside_the_model_folder_is_refused(tmp_path, kind) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(_weight_bytes())
    if kind == "absolute":
        path, fragment = _external_model(tmp_path, str(secret)), "absolute path"
    elif kind == "dotdot":
        path, fragment = _external_model(tmp_path, "../secret.bin"), "'..'"
    else:
        path, fragment = _external_model(tmp_path, "link.bin"), "symbolic link"
        (path.parent / "link.bin").symlink_to(secret)
    before = digest(tmp_path)
    with pytest.raises(UntrustedModelError, match=fragment) as info:
        CamModel(path)
    assert "w1" in str(info.value) and "model.onnx" in str(info.value)
    result = invoke("inspect", path)
    assert_one_line_error(result, fragment)
    assert digest(tmp_path) == before


@pytest.mark.parametrize(
    "length, fragment", [(10**9, "does not belong to this model"), (8, "holds 8 bytes")]
)
def test_external_data_of_the_wrong_size_is_refused(tmp_path, length, fragment) -> None:
    path = _external_model(tmp_path, "w1.bin")
    (path.parent / "w1.bin").write_bytes(_weight_bytes())
    model = onnx.load(str(path), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.name == "w1")
    next(e for e in tensor.external_data if e.key == "length").value = str(length)
    onnx.save(model, str(path))
    with pytest.raises(ModelLoadError, match=fragment):
        CamModel(path)


def test_missing_external_data_file_is_named(tmp_path) -> None:
    path = _external_model(tmp_path, "w1.bin")
    with pytest.raises(ModelLoadError, match="w1.bin.*missing.*copy it next to the model"):
        CamModel(path)


def _with_custom_op(domain: str) -> onnx.ModelProto:
    model = cnn(SIZE)
    relu = next(n for n in model.graph.node if n.name == "relu1")
    relu.op_type, relu.domain = "FancyRelu", domain
    model.opset_import.append(helper.make_opsetid(domain, 1))
    return model


def test_custom_op_domains_are_refused_unless_allowed(tmp_path) -> None:
    path = save(_with_custom_op("com.vendor.secret"), tmp_path / "custom.onnx")
    with pytest.raises(UntrustedModelError) as info:
        CamModel(path)
    message = str(info.value)
    for fragment in ("relu1", "FancyRelu", "com.vendor.secret", "--allow-domain"):
        assert fragment in message
    assert_one_line_error(invoke("inspect", path), "--allow-domain com.vendor.secret")
    # Allowed, the domain check passes; ONNX Runtime then needs the op library itself.
    with pytest.raises(ModelLoadError) as info:
        CamModel(path, allow_domains=["com.vendor.secret"])
    assert not isinstance(info.value, UntrustedModelError)
    result = invoke("inspect", path, "--allow-domain", "com.vendor.secret")
    assert "--allow-domain" not in result.stderr and result.exit_code == 2


def test_ops_defined_by_the_models_own_functions_are_accepted() -> None:
    model = cnn(SIZE)
    relu = next(n for n in model.graph.node if n.name == "relu2")
    relu.op_type, relu.domain = "MyRelu", "local.functions"
    model.functions.append(
        helper.make_function("local.functions", "MyRelu", ["a"], ["b"],
                             [helper.make_node("Relu", ["a"], ["b"])],
                             [helper.make_opsetid("", 17)])
    )
    model.opset_import.append(helper.make_opsetid("local.functions", 1))
    x = np.random.default_rng(0).normal(size=(2, 1, SIZE, SIZE)).astype(np.float32)
    np.testing.assert_allclose(
        CamModel(model).scores(x), CamModel(cnn(SIZE)).scores(x), rtol=1e-6
    )


def test_impossible_tensor_sizes_are_refused_before_allocation(tmp_path) -> None:
    model = cnn(SIZE)
    huge = TensorProto(name="huge", data_type=TensorProto.FLOAT, dims=[1 << 20, 1 << 20])
    model.graph.initializer.append(huge)  # declares 4 TiB, holds nothing
    started = time.perf_counter()
    with pytest.raises(UntrustedModelError, match="'huge'.*limit"):
        CamModel(save(model, tmp_path / "huge.onnx"))
    assert time.perf_counter() - started < 5

    model = cnn(SIZE)
    w1 = next(t for t in model.graph.initializer if t.name == "w1")
    w1.dims[0] = 7  # 7 x 1 x 3 x 3 declared, 6 x 1 x 3 x 3 stored
    with pytest.raises(UntrustedModelError, match="'w1'.*holds data for 54"):
        CamModel(model)

    model = cnn(SIZE)
    for dim in model.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.Clear()
        dim.dim_value = 100_000
    with pytest.raises(UnsupportedModelError, match="more than"):
        CamModel(model)


# --------------------------------------------------------------------------------------
# Nothing is lost, nothing is modified


def test_out_is_replaced_only_with_force(files, tmp_path) -> None:
    out = tmp_path / "cams"
    args = ["cam", files["original"], files["npz"], "-o", out, "--preset", "unit", "-q"]
    assert invoke(*args, "--limit", 2).exit_code == 0
    assert_one_line_error(invoke(*args, "--limit", 3), "--force")
    assert len(list(out.glob("*.npy"))) == 2
    assert invoke(*args, "--limit", 3, "--force").exit_code == 0
    assert len(list(out.glob("*.npy"))) == 3
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.tex").write_text("precious")
    result = invoke("cam", files["original"], files["npz"], "-o", foreign, "--force")
    assert_one_line_error(result, "not an earlier sp2ps output")
    assert digest(foreign) == {"chapter1.tex": hashlib.sha256(b"precious").hexdigest()}


def test_out_that_is_an_input_is_refused(files, tmp_path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    iio.imwrite(folder / "a.png", np.zeros((SIZE, SIZE), np.uint8))
    before = digest(tmp_path)
    result = invoke("cam", files["original"], folder, "-o", folder, "--force")
    assert_one_line_error(result, "is one of the inputs")
    result = invoke("score", files["original"], files["pruned"], "--data", folder, "--out",
                    folder, "--force")
    assert_one_line_error(result, "is one of the inputs")
    assert digest(tmp_path) == before


def test_an_interrupted_score_leaves_the_earlier_report_whole(files, tmp_path, monkeypatch):
    out = tmp_path / "report"
    args = ["score", files["original"], files["pruned"], "--data", files["npz"], "--preset",
            "unit", "--out", out, "--bootstrap", 0, "--batch-size", 2]
    assert invoke(*args, "--limit", 4).exit_code == 0
    before = digest(out)

    calls = []

    def interrupt(self, done, total):
        calls.append(done)
        raise KeyboardInterrupt

    monkeypatch.setattr("sp2ps_onnx.progress.ProgressReporter.__call__", interrupt)
    result = invoke(*args, "--force")
    assert calls and result.exit_code != 0
    # The earlier report is untouched; beside it are the rows saved for --resume.
    after = digest(out)
    assert {k: v for k, v in after.items() if not k.startswith(".sp2ps-rows/")} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no temporary left


def test_an_interrupted_export_leaves_no_partial_file(files, tmp_path, monkeypatch) -> None:
    out = tmp_path / "cam.onnx"

    def crash(proto, path, *args, **kwargs):
        Path(path).write_bytes(b"half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx, "save", crash)
    result = invoke("export", files["original"], "-o", out)
    assert result.exit_code != 0
    assert list(tmp_path.iterdir()) == []


def test_input_files_are_never_modified(files, tmp_path) -> None:
    ext = _external_model(tmp_path, "w1.bin")
    (ext.parent / "w1.bin").write_bytes(_weight_bytes())
    watched = [files["root"], ext.parent]
    before = [digest(folder) for folder in watched]
    common = ["--preset", "unit", "-q"]
    runs = [
        ("inspect", ext),
        ("cam", ext, files["npz"], "-o", tmp_path / "cams", *common),
        ("score", files["original"], ext, files["pruned"], "--data", files["npz"],
         "--out", tmp_path / "report", "--bootstrap", 0, *common),
        ("export", ext, "-o", tmp_path / "cam.onnx"),
    ]
    for args in runs:
        assert invoke(*args).exit_code == 0, args
    CamModel(ext).save(tmp_path / "saved.onnx")
    with pytest.raises(ModelLoadError, match="never overwrites"):
        CamModel(ext).save(ext)
    assert [digest(folder) for folder in watched] == before


# --------------------------------------------------------------------------------------
# Found by the fuzz tests


@pytest.mark.parametrize("aligned", [False, True])
def test_interpolation_weights_equal_scipy_zoom(aligned) -> None:
    from scipy import ndimage

    from sp2ps_onnx.cam import _interpolation_matrix

    for source in (*range(1, 30), 97, 300):
        for target in (*range(1, 30), 224, 301):
            expected = ndimage.zoom(np.eye(source), (target / source, 1.0), order=1,
                                    mode="nearest", grid_mode=not aligned)
            if expected.shape != (target, source):
                continue  # zoom rounds this output length differently; not a size we use
            np.testing.assert_allclose(
                _interpolation_matrix(source, target, aligned), expected, atol=1e-12
            )


def test_a_very_tall_feature_map_is_resized_without_a_quadratic_matrix() -> None:
    """A Conv padded by 65535 rows (a mutated attribute) gives a 32774-row feature map, for
    which the CAM resize once built a 32774 x 32774 identity (8.6 GB); the interpolation
    weights are now built directly."""
    model = cnn(12)
    next(a for a in model.graph.node[0].attribute if a.name == "pads").ints[0] = 65535
    started = time.perf_counter()
    maps, _ = CamModel(model).cams(np.zeros((1, 1, 12, 12), np.float32))
    assert maps.shape == (1, 12, 12) and time.perf_counter() - started < 20
