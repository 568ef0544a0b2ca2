"""Graph rewriting: locate the target layer, differentiate the head, rewrite the model."""

from .inspection import inspect_model, parameter_count, weight_statistics
from .rewrite import CamGraph, build_cam_model, build_head_model
from .rules import VJP_RULES

__all__ = [
    "VJP_RULES",
    "CamGraph",
    "build_cam_model",
    "build_head_model",
    "inspect_model",
    "parameter_count",
    "weight_statistics",
]
