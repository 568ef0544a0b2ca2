"""Built-in class-name lists, for ``--classes NAME`` (a model's overlays and CSV then show
names instead of indices).

``imagenet``: the 1000 ImageNet-1k class names in label order, as torchvision publishes them
(``ResNet18_Weights.IMAGENET1K_V1.meta["categories"]``), shipped as
``sp2ps_onnx/resources/imagenet_classes.txt``.
"""

from __future__ import annotations

from importlib import resources

__all__ = ["BUILT_IN_CLASS_LISTS", "built_in_classes"]

#: Name -> the package resource holding its class names, one per line, in label order.
BUILT_IN_CLASS_LISTS: dict[str, str] = {"imagenet": "resources/imagenet_classes.txt"}


def built_in_classes(name: str) -> list[str] | None:
    """The class names of the built-in list ``name``, or ``None`` if there is none so named."""
    resource = BUILT_IN_CLASS_LISTS.get(name)
    if resource is None:
        return None
    text = resources.files(__package__).joinpath(resource).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]
