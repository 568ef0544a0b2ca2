"""The package imports without ONNX Runtime and names the extra to install."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest


def test_missing_onnxruntime_names_the_extra():
    # A meta-path finder that hides onnxruntime simulates a machine without it.
    script = textwrap.dedent(
        """
        import sys
        class Hide:
            def find_spec(self, name, path=None, target=None):
                if name == "onnxruntime" or name.startswith("onnxruntime."):
                    raise ImportError("hidden for the test")
        sys.meta_path.insert(0, Hide())
        import sp2ps_onnx
        try:
            sp2ps_onnx._ort.ort()
        except sp2ps_onnx.RuntimeMissingError as exc:
            print("MSG:", exc)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert "sp2ps-onnx[cpu]" in out.stdout
    assert "sp2ps-onnx[gpu]" in out.stdout


def test_cpu_device_selects_cpu_provider():
    from sp2ps_onnx._ort import select_providers

    assert select_providers("cpu") == ["CPUExecutionProvider"]


def test_cuda_fallback_to_cpu_is_reported_once(capsys, monkeypatch):
    import onnxruntime

    from sp2ps_onnx import runtime
    from tests.test_model_io import _cnn

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("a working CUDA runtime has nothing to fall back from")
    monkeypatch.setattr(runtime, "_fallback_reported", False)
    cam = runtime.CamModel(_cnn(), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    cam.scores(np.zeros((1, 3, 6, 6), np.float32))  # a second session: no second message
    err = capsys.readouterr().err
    assert err.count("running on the CPU") == 1
