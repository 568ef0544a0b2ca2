"""sp2ps-onnx: does a pruned CNN still look where the original looked?

Grad-CAM family explanations computed inside any ONNX classifier graph, and the Sp2PS
metric that compares the class activation maps of an original and a pruned model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import _ort  # noqa: F401  (import guard used by tests and the CLI)
from .errors import (
    InputDataError,
    LayerNotFoundError,
    MetricInputError,
    ModelLoadError,
    ModelMismatchError,
    RuntimeMissingError,
    Sp2PSError,
    UnknownComponentError,
    UnknownMethodError,
    UnknownNameError,
    UnsupportedModelError,
    UnsupportedOpError,
    UntrustedModelError,
)

__version__ = "0.1.0"

__all__ = [
    "BackwardOptions",
    "CamModel",
    "CamResult",
    "InputDataError",
    "LayerNotFoundError",
    "MetricInputError",
    "ModelLoadError",
    "ModelMismatchError",
    "RuntimeMissingError",
    "Sp2PSError",
    "UnknownComponentError",
    "UnknownMethodError",
    "UnknownNameError",
    "UnsupportedModelError",
    "UnsupportedOpError",
    "UntrustedModelError",
    "__version__",
]

if TYPE_CHECKING:
    from .graph import BackwardOptions
    from .runtime import CamModel, CamResult


def __getattr__(name: str) -> Any:
    # CamModel needs ONNX Runtime; importing it lazily keeps `sp2ps_onnx.metric` usable
    # without it and turns a missing runtime into a clear RuntimeMissingError.
    if name in ("CamModel", "CamResult"):
        from . import runtime

        return getattr(runtime, name)
    if name == "BackwardOptions":  # CamModel(..., backward=BackwardOptions(...))
        from .graph import BackwardOptions

        return BackwardOptions
    raise AttributeError(f"module 'sp2ps_onnx' has no attribute {name!r}")
