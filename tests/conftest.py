"""Shared pytest fixtures: one directory per session for the cached ONNX exports.

Test modules import the export helpers as ``from tests.exports import ...``; the repository
root is put on ``sys.path`` here so that this works under plain ``pytest`` as well as
``python -m pytest``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from tests import exports  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _export_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Each export happens at most once per run; SP2PS_TEST_CACHE (if set) overrides this.
    exports.set_session_dir(tmp_path_factory.mktemp("onnx-exports"))


@pytest.fixture(scope="session")
def export_torchvision():
    """The :func:`tests.exports.export_torchvision` function (cached per session)."""
    return exports.export_torchvision
