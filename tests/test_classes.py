"""``--classes imagenet``: the built-in ImageNet-1k names are torchvision's, in label order."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from torchvision.models import ResNet18_Weights

from sp2ps_onnx.classes import BUILT_IN_CLASS_LISTS, built_in_classes
from sp2ps_onnx.data import parse_classes


def test_imagenet_names_are_torchvisions_in_label_order() -> None:
    expected = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    names = built_in_classes("imagenet")
    assert names == list(expected)
    assert len(names) == 1000 == len(set(names))
    assert names[0] == "tench" and names[281] == "tabby" and names[999] == "toilet tissue"


def test_parse_classes_reads_the_built_in_list_by_name() -> None:
    assert parse_classes("imagenet") == built_in_classes("imagenet")
    assert built_in_classes("cifar") is None
    assert parse_classes("cifar,imagenet") == ["cifar", "imagenet"]
    assert set(BUILT_IN_CLASS_LISTS) == {"imagenet"}


def test_a_file_named_like_a_built_in_list_wins(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imagenet").write_text("cat\ndog\n", encoding="utf-8")
    assert os.path.isfile("imagenet")
    assert parse_classes("imagenet") == ["cat", "dog"]


@pytest.mark.parametrize("name", sorted(BUILT_IN_CLASS_LISTS))
def test_built_in_lists_are_package_data(name: str) -> None:
    # setuptools ships only the files that pyproject's package-data names.
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")
    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["sp2ps_onnx"]
    resource = Path(BUILT_IN_CLASS_LISTS[name])
    assert any(resource.match(pattern) for pattern in patterns)
