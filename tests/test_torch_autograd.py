"""CamModel's activations and gradients against torch autograd on exported torchvision models.

For each of nine architectures, exported by the legacy and by the dynamo ONNX exporter (random
weights, random BN statistics, batch 2, 64x64), the gradient that the rewritten ONNX graph
computes for score[n, target[n]] must equal torch autograd's gradient of the same logit with
respect to the corresponding torch tensor: ``max|g_onnx - g_torch| <= 1e-4 * max|g_torch|``;
the activations must match to the same relative tolerance.

Checked at the default layer (the last feature map) and at two earlier layers per architecture,
given to CamModel by ONNX tensor name. The ONNX name of an earlier layer is found by value: the
model is run with every intermediate tensor exposed and the tensor whose values equal the torch
module output (same shape, allclose) is taken. Across the architectures the gradient paths from
those layers cross Conv, BatchNormalization (DenseNet keeps BN nodes in both exporters: its BN
precedes the conv), Add (residuals), Concat, MaxPool, AveragePool, Clip, HardSwish, SiLU,
LayerNorm and Gelu.

The torch reference runs in float64 (a copy of the model), so the tolerance measures the float32
ONNX engine alone. The gradient is discontinuous at ReLU-family kinks: a pre-activation within
float32 rounding of a kink can fall on the other side in ONNX Runtime than in torch, and the
two gradients then legitimately differ. Each check therefore runs at an input (seeded, batch 2)
whose float64 pre-activations of every ReLU / ReLU6 / Hardswish / Hardsigmoid that runs after
the layer stay at least KINK_MARGIN * max|pre-activation| away from every kink. KINK_MARGIN is
about two float32 ulps of the tensor's largest value: a DenseNet input with a pre-activation at
1e-7 * max from zero did flip. Larger margins cannot be met for layers early in DenseNet/VGG
(hundreds of thousands of ReLU inputs downstream).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from sp2ps_onnx import CamModel
from tests.exports import (
    ARCHITECTURES,
    as_numpy,
    example_input,
    export_torchvision,
    torch_head,
    torch_layer_output,
)

REL_TOL = 1e-4
EXPLICIT_TARGETS = np.array([3, 7], dtype=np.int64)
KINK_MARGIN = 2e-7
INPUT_SEEDS = range(12)
KINKS: dict[type, tuple[float, ...]] = {
    nn.ReLU: (0.0,),
    nn.ReLU6: (0.0, 6.0),
    nn.Hardswish: (-3.0, 3.0),
    nn.Hardsigmoid: (-3.0, 3.0),
}

# Two earlier layers per architecture: (label, function giving the torch module whose OUTPUT is
# the layer). Chosen so that the gradient from them crosses MaxPool / BN / Add / Concat.
EARLIER_LAYERS: dict[str, list[tuple[str, Callable[[nn.Module], nn.Module]]]] = {
    # the stem ReLU output is the MaxPool's input; layer3 is an Add → Relu residual output
    "resnet18": [("stem-relu", lambda m: m.relu), ("layer3", lambda m: m.layer3)],
    # features[2] is the first ReLU, right before a MaxPool; features[10] is a mid ReLU
    "vgg11_bn": [("features.2", lambda m: m.features[2]), ("features.10", lambda m: m.features[10])],
    # features[3] and features[13] end in a residual Add
    "mobilenet_v2": [("features.3", lambda m: m.features[3]),
                     ("features.13", lambda m: m.features[13])],
    # features[1] holds a squeeze-excitation block; features[5] a residual one
    "mobilenet_v3_small": [("features.1", lambda m: m.features[1]),
                           ("features.5", lambda m: m.features[5])],
    "efficientnet_b0": [("features.2", lambda m: m.features[2]),
                        ("features.5", lambda m: m.features[5])],
    # relu0 feeds the MaxPool pool0; transition1 ends in an AveragePool after BN → ReLU → Conv
    "densenet121": [("features.relu0", lambda m: m.features.relu0),
                    ("features.transition1", lambda m: m.features.transition1)],
    # features[1] is the ReLU before the first MaxPool; features[5] a Fire module (Concat)
    "squeezenet1_1": [("features.1", lambda m: m.features[1]),
                      ("features.5", lambda m: m.features[5])],
    "regnet_x_400mf": [("stem", lambda m: m.stem),
                       ("trunk_output.block2", lambda m: m.trunk_output.block2)],
    "convnext_tiny": [("features.1", lambda m: m.features[1]),
                      ("features.3", lambda m: m.features[3])],
}

FLAVOURS = [pytest.param(False, id="legacy"), pytest.param(True, id="dynamo")]


def _maybe_slow(name: str, dynamo: bool):
    if name == "densenet121" and dynamo:
        return [pytest.mark.slow]
    return []


def _model_params() -> list:
    return [
        pytest.param(name, dynamo, id=f"{name}-{'dynamo' if dynamo else 'legacy'}",
                     marks=_maybe_slow(name, dynamo))
        for name in ARCHITECTURES
        for dynamo in (False, True)
    ]


_float64_models: dict[str, nn.Module] = {}


def float64_copy(name: str, model: nn.Module) -> nn.Module:
    """A float64 copy of the (shared, float32) torch model, made once per architecture."""
    if name not in _float64_models:
        _float64_models[name] = copy.deepcopy(model).double().eval()
    return _float64_models[name]


def default_layer_module(name: str, model: nn.Module) -> nn.Module:
    """The module whose output is the last feature map (DenseNet: before its functional ReLU)."""
    if name == "resnet18":
        return model.layer4
    if name == "regnet_x_400mf":
        return model.trunk_output
    return model.features


def kink_margin(name: str, model64: nn.Module, layer: nn.Module, x64: torch.Tensor,
                default: bool) -> float:
    """Smallest distance to a kink, relative to the tensor's max, of every ReLU-family input
    that runs after ``layer`` in the forward pass (a superset of those between it and the score).
    """
    state = {"after": False, "margin": float("inf")}
    if name != "densenet121" and not any(type(m) in KINKS for m in model64.modules()):
        return state["margin"]  # smooth activations only (SiLU, GELU): nothing to check

    def record(values: torch.Tensor, kinks: tuple[float, ...]) -> None:
        scale = float(values.abs().max())
        if scale == 0:
            return
        distance = min(float((values - k).abs().min()) for k in kinks)
        state["margin"] = min(state["margin"], distance / scale)

    def on_layer(_module, _inputs, _output) -> None:
        state["after"] = True

    def on_kink(kinks):
        def hook(_module, inputs) -> None:
            if state["after"]:
                record(inputs[0].detach(), kinks)  # a pre-hook sees the input before in-place ops

        return hook

    handles = [layer.register_forward_hook(on_layer)]
    handles += [
        module.register_forward_pre_hook(on_kink(KINKS[type(module)]))
        for module in model64.modules()
        if type(module) in KINKS
    ]
    if name == "densenet121" and not default:
        # DenseNet's last ReLU is functional: watch the features output that feeds it.
        handles.append(
            model64.features.register_forward_hook(lambda _m, _i, out: record(out.detach(), (0.0,)))
        )
    try:
        with torch.no_grad():
            model64(x64)
    finally:
        for handle in handles:
            handle.remove()
    return state["margin"]


_chosen_inputs: dict[tuple[str, str], torch.Tensor] = {}


def well_conditioned_input(
    name: str, model: nn.Module, layer_label: str, layer_of: Callable[[nn.Module], nn.Module],
    default: bool,
) -> torch.Tensor:
    """The first seeded float32 batch whose later ReLU-family inputs keep KINK_MARGIN."""
    key = (name, layer_label)
    if key in _chosen_inputs:
        return _chosen_inputs[key]
    model64 = float64_copy(name, model)
    best = 0.0
    for seed in INPUT_SEEDS:
        x = example_input(seed=seed)
        margin = kink_margin(name, model64, layer_of(model64), x.double(), default)
        if margin >= KINK_MARGIN:
            _chosen_inputs[key] = x
            return x
        best = max(best, margin)
    raise AssertionError(
        f"{name} {layer_label}: no input among seeds {INPUT_SEEDS} keeps ReLU-family "
        f"pre-activations {KINK_MARGIN} away from kinks (best {best:.2g}); choose another layer"
    )


TargetSets = list[np.ndarray | None]


def _gradients(logits: torch.Tensor, wrt: torch.Tensor, target_sets: TargetSets) -> list:
    """d logit[n, t[n]] / d wrt for each target set (None: each sample's arg-max class)."""
    gradients = []
    for k, targets in enumerate(target_sets):
        if targets is None:
            targets = logits.detach().argmax(dim=1).numpy()
        picked = logits[torch.arange(len(targets)), torch.as_tensor(targets)].sum()
        retain = k < len(target_sets) - 1
        (gradient,) = torch.autograd.grad(picked, wrt, retain_graph=retain)
        gradients.append(_float64(gradient))
    return gradients


def torch_reference_at_module(
    model64: nn.Module, module: nn.Module, x: torch.Tensor, target_sets: TargetSets
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """(module output, [d logit[n, t[n]] / d output per target set], logits), float64, via a
    forward hook."""
    captured: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, output: captured.append(output))
    try:
        logits = model64(x.double())
    finally:
        handle.remove()
    # A module reused in one forward would capture several outputs (none chosen here is).
    assert len(captured) == 1, f"module ran {len(captured)} times in one forward pass"
    gradients = _gradients(logits, captured[0], target_sets)
    return _float64(captured[0]), gradients, _float64(logits)


def torch_reference_at_default_layer(
    name: str, model64: nn.Module, x: torch.Tensor, target_sets: TargetSets
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Same for the last feature map.

    DenseNet applies its last ReLU functionally (no module to hook), so that output is made a
    leaf and the rest of torchvision's forward is replayed from it (torch_head, checked against
    model(x) here).
    """
    if name != "densenet121":
        return torch_reference_at_module(
            model64, default_layer_module(name, model64), x, target_sets
        )
    with torch.no_grad():
        layer_value = torch_layer_output(name, model64, x.double())
        full_logits = model64(x.double())
    leaf = layer_value.clone().requires_grad_(True)
    logits = torch_head(name, model64, leaf)
    np.testing.assert_allclose(_float64(logits), _float64(full_logits), rtol=1e-10, atol=1e-12)
    return _float64(leaf), _gradients(logits, leaf, target_sets), _float64(logits)


def _float64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy().astype(np.float64)


def _assert_relative(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = float(np.abs(expected).max())
    assert scale > 0, f"{what}: the torch reference is identically zero"
    error = float(np.abs(actual.astype(np.float64) - expected).max())
    assert error <= REL_TOL * scale, (
        f"{what}: max|onnx - torch| = {error:.3g} > {REL_TOL} * max|torch| ({scale:.3g})"
    )


_intermediates: dict[tuple[str, bytes], dict[str, np.ndarray]] = {}


def onnx_intermediate_values(path: str, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every float32 tensor of the ONNX model at input x, by name (cached)."""
    key = (path, x.tobytes())
    if key in _intermediates:
        return _intermediates[key]
    model = onnx.load(path)
    graph_outputs = {o.name for o in model.graph.output}
    names = [o.name for o in model.graph.output]
    for node in model.graph.node:
        for out in node.output:
            if out and out not in graph_outputs:
                # No type given: ONNX Runtime takes the producer's inferred type.
                model.graph.output.append(onnx.ValueInfoProto(name=out))
                graph_outputs.add(out)
                names.append(out)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    values = session.run(None, {session.get_inputs()[0].name: x})
    floats = {
        n: v for n, v in zip(names, values, strict=True)
        if isinstance(v, np.ndarray) and v.dtype == np.float32
    }
    _intermediates.clear()  # one model's tensors at a time keeps memory small
    _intermediates[key] = floats
    return floats


def find_onnx_tensor(path: str, x: np.ndarray, reference: np.ndarray) -> str:
    """Name of the ONNX tensor whose values equal ``reference`` (shape + allclose).

    When several tensors match (an Identity, a one-input Concat, a ReLU of a non-negative
    value), the one produced first in graph order is taken: the others are computed from it, so
    its gradient collects every consumer, like the torch module output does.
    """
    values = onnx_intermediate_values(path, x)
    scale = float(np.abs(reference).max())
    matches = [
        name for name, value in values.items()
        if value.shape == reference.shape
        and float(np.abs(value - reference).max()) <= REL_TOL * scale
    ]
    assert matches, f"no ONNX tensor of {path} equals the torch tensor {reference.shape}"
    model = onnx.load(path, load_external_data=False)
    order = {out: i for i, node in enumerate(model.graph.node) for out in node.output}
    return min(matches, key=lambda n: order.get(n, -1))


@pytest.mark.parametrize(("name", "dynamo"), _model_params())
def test_default_layer_matches_torch_autograd(name: str, dynamo: bool) -> None:
    path, model, _ = export_torchvision(name, dynamo)
    model64 = float64_copy(name, model)
    x = well_conditioned_input(
        name, model, "default", lambda m: default_layer_module(name, m), default=True
    )
    x_np = as_numpy(x)
    cam = CamModel(str(path))

    torch_act, (torch_grad, argmax_grad), torch_logits = torch_reference_at_default_layer(
        name, model64, x, [EXPLICIT_TARGETS, None]
    )
    result = cam.run(x_np, targets=EXPLICIT_TARGETS)
    activations = np.asarray(result.activations)
    assert activations.shape == torch_act.shape, (
        f"default layer {cam.layer!r} has shape {activations.shape}, torch's last feature map "
        f"is {torch_act.shape}"
    )
    _assert_relative(activations, torch_act, f"{name} activations at {cam.layer!r}")
    _assert_relative(np.asarray(result.score), torch_logits, f"{name} scores")
    _assert_relative(np.asarray(result.gradients), torch_grad, f"{name} gradient at {cam.layer!r}")
    np.testing.assert_array_equal(np.asarray(result.targets), EXPLICIT_TARGETS)

    # targets=None explains the arg-max class of each sample.
    argmax = torch_logits.argmax(axis=1)
    automatic = cam.run(x_np)
    np.testing.assert_array_equal(np.asarray(automatic.targets), argmax)
    _assert_relative(np.asarray(automatic.gradients), argmax_grad, f"{name} arg-max gradient")


def _earlier_params() -> list:
    return [
        pytest.param(
            name, dynamo, index,
            id=f"{name}-{'dynamo' if dynamo else 'legacy'}-{EARLIER_LAYERS[name][index][0]}",
            marks=_maybe_slow(name, dynamo),
        )
        for name in ARCHITECTURES
        for dynamo in (False, True)
        for index in range(2)
    ]


@pytest.mark.parametrize(("name", "dynamo", "index"), _earlier_params())
def test_earlier_layer_matches_torch_autograd(name: str, dynamo: bool, index: int) -> None:
    path, model, _ = export_torchvision(name, dynamo)
    model64 = float64_copy(name, model)
    label, module_of = EARLIER_LAYERS[name][index]
    x = well_conditioned_input(name, model, label, module_of, default=False)
    x_np = as_numpy(x)
    torch_act, (torch_grad,), _ = torch_reference_at_module(
        model64, module_of(model64), x, [EXPLICIT_TARGETS]
    )
    tensor = find_onnx_tensor(str(path), x_np, torch_act)

    cam = CamModel(str(path), layer=tensor)
    assert cam.layer == tensor
    result = cam.run(x_np, targets=EXPLICIT_TARGETS)
    _assert_relative(np.asarray(result.activations), torch_act, f"{name} {label} activations")
    _assert_relative(np.asarray(result.gradients), torch_grad, f"{name} {label} ({tensor}) gradient")


def test_layer_given_by_node_name_uses_its_first_output() -> None:
    path, model, _ = export_torchvision("resnet18", False)
    model64 = float64_copy("resnet18", model)
    x = well_conditioned_input("resnet18", model, "layer3", lambda m: m.layer3, default=False)
    x_np = as_numpy(x)
    torch_act, (torch_grad,), _ = torch_reference_at_module(
        model64, model64.layer3, x, [EXPLICIT_TARGETS]
    )
    tensor = find_onnx_tensor(str(path), x_np, torch_act)
    graph = onnx.load(str(path), load_external_data=False).graph
    (node,) = [n for n in graph.node if tensor in n.output]
    assert node.name and node.name != tensor, "the export must name nodes apart from tensors"

    cam = CamModel(str(path), layer=node.name)
    assert cam.layer == node.output[0] == tensor
    result = cam.run(x_np, targets=EXPLICIT_TARGETS)
    _assert_relative(np.asarray(result.gradients), torch_grad, "layer by node name")
