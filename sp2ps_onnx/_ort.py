"""Import guard and execution-provider selection for ONNX Runtime."""

from __future__ import annotations

import sys
from importlib import metadata
from types import ModuleType

from .errors import RuntimeMissingError

_INSTALL_HINT = (
    "ONNX Runtime is not installed; install sp2ps-onnx with an extra: "
    "pip install 'sp2ps-onnx[cpu]' (onnxruntime) or 'sp2ps-onnx[gpu]' (onnxruntime-gpu)"
)


def ort() -> ModuleType:
    """Return the ``onnxruntime`` module, or raise a clear error naming the extra to install."""
    try:
        import onnxruntime  # an optional dependency (extras cpu, gpu)
    except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
        raise RuntimeMissingError(_INSTALL_HINT) from exc
    return onnxruntime


def select_providers(device: str = "auto", quiet: bool = False) -> list[str]:
    """Map ``auto``/``cpu``/``cuda`` to an ONNX Runtime provider list.

    ``auto`` takes CUDA when the installed runtime offers it, and says so on stderr when it
    falls back to the CPU although a GPU build was asked for implicitly.
    """
    available = ort().get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise RuntimeMissingError(
                "--device cuda was requested but this ONNX Runtime has no CUDAExecutionProvider "
                f"(available: {', '.join(available)}); install 'sp2ps-onnx[gpu]' "
                "(onnxruntime-gpu) with a matching CUDA, or use --device cpu"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device != "auto":
        raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if not quiet and "onnxruntime-gpu" in _installed_distributions():
        print(
            "sp2ps: onnxruntime-gpu is installed but CUDA is not usable here; running on CPU",
            file=sys.stderr,
        )
    return ["CPUExecutionProvider"]


def _installed_distributions() -> set[str]:
    return {(d.metadata["Name"] or "").lower() for d in metadata.distributions()}
