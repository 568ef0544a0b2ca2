"""The package's shape: its layers (import-linter's contracts in pyproject.toml) and the size
of its functions, so that the code stays readable as it grows."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sp2ps_onnx"

#: Functions allowed past the limits ("path::name"), each with a comment saying why.
LONG_FUNCTIONS: set[str] = {
    # CamModel's constructor: the public API's keyword options, ten of them before
    # ``backward`` (itself the group of the backward pass's options).
    "runtime.py::__init__",
}
MAX_LINES = 100
MAX_PARAMETERS = 10


def test_no_import_points_up_a_layer() -> None:
    script = Path(sys.executable).parent / "lint-imports"
    if not script.exists():
        pytest.fail("import-linter is not installed; pip install -e '.[test]'")
    result = subprocess.run([str(script), "--no-cache"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def _functions() -> list[tuple[str, ast.FunctionDef]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((f"{path.relative_to(PACKAGE).as_posix()}::{node.name}", node))
    return found


def test_functions_are_short_and_take_few_parameters() -> None:
    too_big = []
    for name, node in _functions():
        args = node.args
        params = [*args.posonlyargs, *args.args, *args.kwonlyargs]
        if params and params[0].arg in ("self", "cls"):
            params = params[1:]
        lines = node.end_lineno - node.lineno + 1
        if (lines > MAX_LINES or len(params) > MAX_PARAMETERS) and name not in LONG_FUNCTIONS:
            too_big.append(f"{name}: {lines} lines, {len(params)} parameters")
    assert not too_big, "split these or group their options:\n" + "\n".join(too_big)
