"""The package imports without ONNX Runtime and names the extra to install."""

import subprocess
import sys
import textwrap


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
