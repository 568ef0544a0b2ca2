"""The project's exception types.

Every error caused by the user's input derives from :class:`Sp2PSError`. Its message
says what went wrong, where (file, node, op) and what to do next; the CLI prints it
as one line and exits with status 2, without a traceback.
"""

from __future__ import annotations


class Sp2PSError(Exception):
    """Base class for every error that a user's input can cause."""


class ModelLoadError(Sp2PSError):
    """The ONNX file cannot be read, parsed or run."""


class UntrustedModelError(ModelLoadError):
    """The model file asks for something a file from outside must not do: read external
    data outside its folder, run custom ops that were not allowed, or declare tensors of
    impossible size."""


class UnsupportedModelError(Sp2PSError):
    """The model is valid ONNX but not a CNN classifier this tool can explain."""


class UnsupportedOpError(UnsupportedModelError):
    """An op between the target layer and the score has no gradient rule."""

    def __init__(self, op_type: str, node_name: str, detail: str = "", model: str = "") -> None:
        self.op_type = op_type
        self.node_name = node_name
        where = f" in {model}" if model else ""
        extra = f" ({detail})" if detail else ""
        super().__init__(
            f"op {op_type!r} at node {node_name!r}{where} has no gradient rule{extra}; "
            f"choose a later target layer with layer=... (CLI: --layer) so that this node "
            f"is not between the layer and the score, or add a rule (see docs/ops.md)"
        )


class LayerNotFoundError(Sp2PSError):
    """The requested or default target layer cannot be found."""


class InputDataError(Sp2PSError):
    """Input data (images, arrays, folders) cannot be read or does not fit the model."""


class ModelMismatchError(Sp2PSError):
    """Original and pruned models cannot be compared (e.g. different class counts)."""


class RuntimeMissingError(Sp2PSError):
    """A package a feature needs is not installed (ONNX Runtime; matplotlib and jinja2 for
    the report)."""


class UnknownNameError(Sp2PSError, ValueError):
    """A name that is not in its registry (a CAM method, a metric component, ...)."""


class UnknownMethodError(UnknownNameError):
    """The requested CAM method name is not one of :data:`sp2ps_onnx.cam.METHODS`."""


class UnknownComponentError(UnknownNameError):
    """A spatial/spectral/aggregation name that is not in its registry."""


class MetricInputError(InputDataError, ValueError):
    """CAM arrays, labels or scores that the metric cannot use."""


class FaithfulnessInputError(InputDataError, ValueError):
    """Images, CAMs, targets, options or model outputs that the faithfulness metrics cannot
    use."""
