"""Graph rewriting: locate the target layer, differentiate the head, rewrite the model;
randomise its weights for the random floor."""

from .inspection import inspect_model, parameter_count, weight_statistics
from .randomize import WeightLayer, randomize_weights, weight_layers
from .rewrite import BackwardOptions, CamGraph, build_cam_model, build_head_model, stage_layers
from .rules import VJP_RULES

__all__ = [
    "VJP_RULES",
    "BackwardOptions",
    "CamGraph",
    "WeightLayer",
    "build_cam_model",
    "build_head_model",
    "inspect_model",
    "parameter_count",
    "randomize_weights",
    "stage_layers",
    "weight_layers",
    "weight_statistics",
]
