"""Framework model files to ONNX: TFLite and Keras with tf2onnx, PyTorch ``.pt2`` with
torch.onnx.

:func:`to_onnx` converts one file in a child process that runs this module
(``python -m sp2ps_onnx.convert KIND SOURCE OUTPUT --opset N``), so TensorFlow or PyTorch
never load into the caller's process and the exact command is recorded for
``results.json``. The converters are optional: the ``tf`` extra (``tensorflow-cpu``,
``tf2onnx``) for ``.tflite``, ``.keras`` and ``.h5``, the ``torch`` extra (``torch``,
``onnxscript``) for ``.pt2``. A missing one is a :class:`ModelLoadError` that names the extra.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import ModelLoadError

DEFAULT_OPSET = 17

# suffix -> (kind, converter packages (import name, distribution), extra)
_KINDS: dict[str, tuple[str, tuple[tuple[str, str], ...], str]] = {
    ".tflite": ("tflite", (("tensorflow", "tensorflow"), ("tf2onnx", "tf2onnx")), "tf"),
    ".keras": ("keras", (("tensorflow", "tensorflow"), ("tf2onnx", "tf2onnx")), "tf"),
    ".h5": ("keras", (("tensorflow", "tensorflow"), ("tf2onnx", "tf2onnx")), "tf"),
    ".pt2": ("pt2", (("torch", "torch"), ("onnxscript", "onnxscript")), "torch"),
}
FRAMEWORK_SUFFIXES = tuple(_KINDS)
"""File endings converted to ONNX before use."""


@dataclass
class Conversion:
    """How one framework file became ONNX (recorded in ``results.json``)."""

    source: str
    onnx: str
    kind: str
    command: str
    versions: dict[str, str | None]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def needs_conversion(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a framework file (``.tflite``, ``.keras``, ``.h5``, ``.pt2``)."""
    return Path(path).suffix.lower() in _KINDS


def check_converter(source: str | os.PathLike[str]) -> None:
    """Raise :class:`ModelLoadError` naming the extra to install when the converter for
    ``source`` is missing (nothing to do for ``.onnx`` files)."""
    suffix = Path(source).suffix.lower()
    if suffix not in _KINDS:
        return
    _, packages, extra = _KINDS[suffix]
    missing = [name for name, _ in packages if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelLoadError(
            f"converting {source} ({suffix}) to ONNX needs {' and '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed; install the '{extra}' "
            f"extra: pip install 'sp2ps-onnx[{extra}]', or convert the model to ONNX yourself"
        )


def _versions(packages: tuple[tuple[str, str], ...]) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for _, dist in (*packages, ("onnx", "onnx")):
        for candidate in (dist, f"{dist}-cpu"):
            try:
                versions[dist] = metadata.version(candidate)
                break
            except metadata.PackageNotFoundError:
                versions[dist] = None
    return versions


def to_onnx(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    opset: int = DEFAULT_OPSET,
    timeout: float | None = None,
    final_output: str | os.PathLike[str] | None = None,
) -> Conversion:
    """Convert the framework file ``source`` to the ONNX file ``output``; never touches
    ``source``. Raises :class:`ModelLoadError` with the converter's own message on failure.

    ``final_output`` is where ``output`` will end up (when it is written to a temporary
    place first); the recorded command and path name it.
    """
    source, output = Path(source), Path(output)
    suffix = source.suffix.lower()
    if suffix not in _KINDS:
        raise ModelLoadError(
            f"{source} is not a framework file sp2ps converts ({', '.join(FRAMEWORK_SUFFIXES)})"
        )
    if not source.is_file():
        what = "is a directory" if source.is_dir() else "does not exist"
        raise ModelLoadError(f"model file {source} {what}; give the path of a model file")
    kind, packages, extra = _KINDS[suffix]
    check_converter(source)
    output.parent.mkdir(parents=True, exist_ok=True)
    arguments = ["-m", "sp2ps_onnx.convert", kind, str(source), str(output), "--opset", str(opset)]
    started = time.perf_counter()
    # The child imports this very package (not another installed copy) and stays on the CPU.
    package_root = str(Path(__file__).resolve().parent.parent)
    python_path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    environment = {**os.environ, "PYTHONPATH": python_path, "TF_CPP_MIN_LOG_LEVEL": "3",
                   "CUDA_VISIBLE_DEVICES": ""}
    try:
        finished = subprocess.run([sys.executable, *arguments], capture_output=True, text=True,
                                  env=environment, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise ModelLoadError(f"converting {source} to ONNX took over {timeout:.0f} s") from None
    if finished.returncode != 0 or not output.is_file():
        output.unlink(missing_ok=True)
        raise ModelLoadError(
            f"converting {source} to ONNX with {'tf2onnx' if extra == 'tf' else 'torch.onnx'} "
            f"failed: {_last_error(finished.stderr)}; check that the file is a valid {suffix} "
            "model, or convert it to ONNX yourself"
        )
    recorded = str(final_output) if final_output is not None else str(output)
    return Conversion(
        source=str(source),
        onnx=recorded,
        kind=kind,
        command=shlex.join(["python", *arguments[:-3], recorded, *arguments[-2:]]),
        versions=_versions(packages),
        seconds=time.perf_counter() - started,
    )


def _last_error(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or ["no message"])[-1]


# --------------------------------------------------------------------------------------
# The child process


def _convert_tflite(source: str, output: str, opset: int) -> None:
    import tf2onnx

    tf2onnx.convert.from_tflite(source, opset=opset, output_path=output)


def _convert_keras(source: str, output: str, opset: int) -> None:
    import tensorflow as tf
    import tf2onnx

    model = tf.keras.models.load_model(source, compile=False)
    signature = tuple(
        tf.TensorSpec((None, *tensor.shape[1:]), tensor.dtype, name=_input_name(tensor, i))
        for i, tensor in enumerate(model.inputs)
    )
    tf2onnx.convert.from_keras(model, input_signature=signature, opset=opset, output_path=output)


def _input_name(tensor: Any, index: int) -> str:
    name = str(getattr(tensor, "name", "") or f"input_{index}")
    return name.split(":")[0]


def _convert_pt2(source: str, output: str, opset: int) -> None:
    import torch

    program = torch.export.load(source)
    torch.onnx.export(program, (), output, opset_version=opset, dynamo=True,
                      external_data=False)


_CONVERTERS = {"tflite": _convert_tflite, "keras": _convert_keras, "pt2": _convert_pt2}


def main(argv: list[str] | None = None) -> None:
    """``python -m sp2ps_onnx.convert {tflite,keras,pt2} SOURCE OUTPUT [--opset N]``."""
    parser = argparse.ArgumentParser(prog="python -m sp2ps_onnx.convert",
                                     description="Convert a framework model file to ONNX.")
    parser.add_argument("kind", choices=sorted(_CONVERTERS))
    parser.add_argument("source")
    parser.add_argument("output")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    args = parser.parse_args(argv)
    _CONVERTERS[args.kind](args.source, args.output, args.opset)


if __name__ == "__main__":
    main()
