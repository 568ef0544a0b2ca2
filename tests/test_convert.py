"""Framework files in: .keras and .tflite through tf2onnx, .pt2 through torch.onnx, checked
against the frameworks' own inference; a .keras original scored against a .tflite pruned
model in one command gives the Sp2PS of the same models exported to ONNX."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from sp2ps_onnx import CamModel
from sp2ps_onnx import convert as convert_module
from sp2ps_onnx.cli import cli
from sp2ps_onnx.convert import to_onnx
from sp2ps_onnx.errors import ModelLoadError

MODELS = Path(__file__).resolve().parent.parent / "models"
KERAS = MODELS / "frameworks" / "fmnist_keras.keras"
TFLITE = MODELS / "frameworks" / "fmnist_keras_mag70.tflite"
LIMIT = 40


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def images(n: int = LIMIT) -> np.ndarray:
    x = np.load(MODELS / "samples" / "fmnist_test.npz")["x"][:n]
    return (x[..., None] / 255.0).astype(np.float32)


def onnx_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = []
    batch = session.get_inputs()[0].shape[0]
    step = batch if isinstance(batch, int) else len(x)
    for start in range(0, len(x), step):
        outputs.append(session.run(None, {session.get_inputs()[0].name: x[start : start + step]})[0])
    return np.concatenate(outputs)


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("convert") / "report"
    result = invoke("score", KERAS, TFLITE, "--data", MODELS / "samples" / "fmnist_test.npz",
                    "--preset", "unit", "--limit", LIMIT, "--bootstrap", 50, "--out", out, "-q",
                    "--figures", "pdf")
    assert result.exit_code == 0, result.output
    return out


def test_keras_file_converts_to_what_keras_computes(scored: Path) -> None:
    pytest.importorskip("tensorflow")  # a test dependency in pyproject; never skipped in CI
    import keras

    x = images()
    expected = keras.models.load_model(KERAS, compile=False).predict(x, verbose=0)
    np.testing.assert_allclose(onnx_outputs(scored / "converted" / "fmnist_keras.onnx", x),
                               expected, rtol=1e-4, atol=1e-5)


def test_legacy_h5_file_converts_to_what_keras_computes(tmp_path: Path) -> None:
    pytest.importorskip("tensorflow")
    import keras

    model = keras.models.load_model(KERAS, compile=False)
    h5 = tmp_path / "fmnist_keras.h5"
    model.save(h5)  # the legacy HDF5 format
    conversion = to_onnx(h5, tmp_path / "h5.onnx")
    assert conversion.kind == "keras"
    x = images(16)
    np.testing.assert_allclose(onnx_outputs(Path(conversion.onnx), x),
                               model.predict(x, verbose=0), rtol=1e-4, atol=1e-5)


def test_tflite_file_converts_to_what_the_tflite_interpreter_computes(scored: Path) -> None:
    tf = pytest.importorskip("tensorflow")

    x = images(12)
    interpreter = tf.lite.Interpreter(model_path=str(TFLITE))
    interpreter.allocate_tensors()
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    expected = []
    for image in x:
        interpreter.set_tensor(inp["index"], image[None])
        interpreter.invoke()
        expected.append(interpreter.get_tensor(out["index"])[0])
    converted = scored / "converted" / "fmnist_keras_mag70.onnx"
    np.testing.assert_allclose(onnx_outputs(converted, x), np.stack(expected), rtol=1e-4,
                               atol=1e-5)


def test_keras_against_tflite_in_one_command(scored: Path) -> None:
    data = json.loads((scored / "results.json").read_text())
    conversions = {Path(c["source"]).name: c for c in data["config"]["conversions"]}
    assert set(conversions) == {KERAS.name, TFLITE.name}
    for conversion in conversions.values():
        kept = Path(conversion["onnx"])  # the converted ONNX is kept in --out
        assert kept.parent == scored / "converted" and kept.is_file()
        assert conversion["command"].startswith("python -m sp2ps_onnx.convert ")
        assert conversion["command"].split()[5] == str(kept)  # the final path, not a temporary one
        assert conversion["versions"]["tf2onnx"] and conversion["versions"]["tensorflow"]
    assert conversions[TFLITE.name]["kind"] == "tflite"
    assert (scored / "figures" / "sp2ps_vs_accuracy.pdf").read_bytes().startswith(b"%PDF")
    # The same weights, exported to ONNX by tf2onnx from the trained Keras models.
    out = scored.parent / "onnx"
    result = invoke("score", MODELS / "keras" / "fmnist_keras.onnx",
                    MODELS / "keras" / "fmnist_keras_mag70.onnx", "--data",
                    MODELS / "samples" / "fmnist_test.npz", "--preset", "unit", "--limit", LIMIT,
                    "--bootstrap", 50, "--out", out, "-q")
    assert result.exit_code == 0, result.output
    reference = json.loads((out / "results.json").read_text())["models"][0]["result"]
    (got,) = [m["result"] for m in data["models"]]
    for key in ("sp2ps", "mean_spatial", "mean_spectral", "accuracy_pruned", "top1_agreement"):
        assert got[key] == pytest.approx(reference[key], abs=1e-4), key
    assert "Converted to ONNX before scoring" in (scored / "report.html").read_text()


def test_pt2_exported_program_converts_and_explains(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    ).eval()
    x = torch.randn(4, 3, 16, 16)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    source = tmp_path / "tiny.pt2"
    torch.export.save(program, source)
    before = source.read_bytes()
    conversion = to_onnx(source, tmp_path / "out" / "tiny.onnx")
    assert source.read_bytes() == before
    assert conversion.kind == "pt2" and conversion.versions["torch"]
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(onnx_outputs(Path(conversion.onnx), x.numpy()), expected,
                               rtol=1e-4, atol=1e-5)
    cam = CamModel(conversion.onnx)
    result = cam.run(x.numpy(), targets=[0, 1, 2, 3])
    # The Grad-CAM gradient of the score w.r.t. the last ReLU, against torch autograd.
    features = model[:4](x).detach().requires_grad_(True)
    model[4:](features)[torch.arange(4), torch.tensor([0, 1, 2, 3])].sum().backward()
    np.testing.assert_allclose(result.gradients, features.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_a_missing_converter_names_the_extra(monkeypatch, tmp_path: Path) -> None:
    real = convert_module.importlib.util.find_spec
    monkeypatch.setattr(convert_module.importlib.util, "find_spec",
                        lambda name: None if name == "tf2onnx" else real(name))
    with pytest.raises(ModelLoadError, match=r"needs tf2onnx.*pip install 'sp2ps-onnx\[tf\]'"):
        to_onnx(TFLITE, tmp_path / "x.onnx")
    result = CliRunner().invoke(cli, ["score", str(KERAS), str(TFLITE), "--data",
                                      str(MODELS / "samples" / "fmnist_test.npz"), "--out",
                                      str(tmp_path / "r")])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "'tf' extra" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no partial report


def test_a_broken_framework_file_is_one_clear_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.tflite"
    broken.write_bytes(b"not a flatbuffer")
    with pytest.raises(ModelLoadError, match=r"converting .*broken.tflite to ONNX with tf2onnx "
                       r"failed: .*valid \.tflite model"):
        to_onnx(broken, tmp_path / "out" / "broken.onnx")
    assert not (tmp_path / "out" / "broken.onnx").exists()


def test_the_python_api_says_to_convert_a_framework_file_first() -> None:
    with pytest.raises(ModelLoadError, match=r"\.tflite framework file, not ONNX; convert it "
                       r"first with sp2ps_onnx\.convert\.to_onnx"):
        CamModel(str(TFLITE))
