"""Shared pytest fixtures: one directory per session for the cached ONNX exports.

Test modules import the export helpers as ``from tests.exports import ...`` and the shared
references as ``from references... import ...``: ``pythonpath = ["."]`` in pyproject.toml puts
the repository root on ``sys.path`` under plain ``pytest`` as well as ``python -m pytest``.
"""

from __future__ import annotations

import pytest

from tests import exports


@pytest.fixture(scope="session", autouse=True)
def _export_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Each export happens at most once per run; SP2PS_TEST_CACHE (if set) overrides this.
    exports.set_session_dir(tmp_path_factory.mktemp("onnx-exports"))


@pytest.fixture(scope="session")
def export_torchvision():
    """The :func:`tests.exports.export_torchvision` function (cached per session)."""
    return exports.export_torchvision
