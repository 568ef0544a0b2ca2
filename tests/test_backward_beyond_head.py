"""The backward pass beyond the head, against torch autograd in float64.

``CamModel(..., backward=BackwardOptions(layers=[...], input_gradient=True, weighted_seed=True,
relu_backward="guided", bias_gradients=True))`` on torchvision resnet18 (random weights and BN statistics, 64x64,
legacy exporter, as in test_torch_autograd.py): the activations and gradients at several
layers and at the input, the gradient of a weighted sum of the class scores, Guided Backprop's
ReLU (a torch model whose every nn.ReLU is replaced by the guided one) and FullGrad's
``bias * gradient`` terms (the BatchNorm bias folded into each Conv by the exporter). Inputs
keep every ReLU input off its kink (see test_torch_autograd.py); tolerances are the same.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from experiments.artifacts import quantize_ort
from sp2ps_onnx import CamModel
from sp2ps_onnx.errors import (
    InputDataError,
    LayerNotFoundError,
    UnsupportedModelError,
    UnsupportedOpError,
)
from sp2ps_onnx.graph.rewrite import BackwardOptions, stage_layers
from tests.exports import as_numpy, example_input, export_timm, export_torchvision
from tests.test_torch_autograd import (
    EXPLICIT_TARGETS,
    _assert_relative,
    find_onnx_tensor,
    float64_copy,
    well_conditioned_input,
)

NAME = "resnet18"
LAYERS = {  # torch module whose output is the layer
    "stem-relu": lambda m: m.relu,
    "layer2": lambda m: m.layer2,
    "layer4": lambda m: m.layer4,
}


def _setup():
    path, model, _ = export_torchvision(NAME, False)
    model64 = float64_copy(NAME, model)
    # The first Conv: every ReLU of the network runs after it, as the input gradient needs.
    x = well_conditioned_input(NAME, model, "conv1", lambda m: m.conv1, default=False)
    return str(path), model64, x


def _torch_gradients(model64: nn.Module, x: torch.Tensor, seed_of, modules: dict[str, nn.Module]):
    """(outputs of ``modules``, their gradients, the input gradient, logits) of the scalar
    ``seed_of(logits)``, float64."""
    captured: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_hook(lambda _m, _i, out, key=key: captured.__setitem__(key, out))
        for key, module in modules.items()
    ]
    x64 = x.double().requires_grad_(True)
    try:
        logits = model64(x64)
    finally:
        for handle in handles:
            handle.remove()
    wrt = [captured[key] for key in modules] + [x64]
    grads = torch.autograd.grad(seed_of(logits), wrt)
    as_np = lambda t: t.detach().numpy().astype(np.float64)  # noqa: E731
    values = {key: as_np(captured[key]) for key in modules}
    return values, {key: as_np(g) for key, g in zip(modules, grads, strict=False)}, as_np(grads[-1]), as_np(logits)


def _picked(targets):
    return lambda logits: logits[torch.arange(len(targets)), torch.as_tensor(targets)].sum()


def test_several_layers_and_input_gradient_in_one_run() -> None:
    path, model64, x = _setup()
    modules = {key: of(model64) for key, of in LAYERS.items()}
    values, grads, input_grad, logits = _torch_gradients(model64, x, _picked(EXPLICIT_TARGETS), modules)
    x_np = as_numpy(x)
    tensors = {key: find_onnx_tensor(path, x_np, values[key]) for key in LAYERS}
    order = [tensors["layer2"], tensors["stem-relu"], tensors["layer4"]]  # any order is kept

    cam = CamModel(path, backward=BackwardOptions(layers=order, input_gradient=True))
    assert cam.layers == order
    assert cam.layer == tensors["layer4"], "without layer=, the main layer is the last computed"
    result = cam.run(x_np, targets=EXPLICIT_TARGETS)
    assert list(result.layers) == order
    for key, tensor in tensors.items():
        _assert_relative(result.layers[tensor].activations, values[key], f"{key} activations")
        _assert_relative(result.layers[tensor].gradients, grads[key], f"{key} gradient")
    assert result.input_gradient.shape == x_np.shape
    _assert_relative(result.input_gradient, input_grad, "input gradient")
    _assert_relative(result.score, logits, "scores")
    np.testing.assert_array_equal(result.targets, EXPLICIT_TARGETS)
    _assert_relative(result.gradients, grads["layer4"], "main layer gradient")
    assert cam.run_layers(x_np, EXPLICIT_TARGETS).keys() == result.layers.keys()

    # The main layer's numbers are those of the one-layer model.
    single = CamModel(path).run(x_np, targets=EXPLICIT_TARGETS)
    np.testing.assert_allclose(result.gradients, single.gradients, rtol=1e-5, atol=1e-7)
    with pytest.raises(InputDataError, match="layers="):
        CamModel(path).run_layers(x_np)


def test_weighted_seed_differentiates_the_weighted_score() -> None:
    path, model64, x = _setup()
    x_np = as_numpy(x)
    weights = np.random.default_rng(3).standard_normal((len(x_np), 10)).astype(np.float32)
    seed = lambda logits: (logits * torch.as_tensor(weights, dtype=torch.float64)).sum()  # noqa: E731
    values, grads, input_grad, _ = _torch_gradients(model64, x, seed, {"layer3": model64.layer3})
    tensor = find_onnx_tensor(path, x_np, values["layer3"])

    options = BackwardOptions(layers=[tensor], input_gradient=True, weighted_seed=True)
    cam = CamModel(path, backward=options)
    result = cam.run(x_np, target_weights=weights)
    _assert_relative(result.layers[tensor].gradients, grads["layer3"], "weighted layer3 gradient")
    _assert_relative(result.input_gradient, input_grad, "weighted input gradient")
    np.testing.assert_array_equal(result.targets, result.score.argmax(axis=1))

    # One class per sample stays the one-hot path: the same numbers as a model without weights.
    plain = CamModel(path)
    weighted = CamModel(path, backward=BackwardOptions(weighted_seed=True))
    for targets in (EXPLICIT_TARGETS, None):
        a, b = plain.run(x_np, targets), weighted.run(x_np, targets)
        np.testing.assert_array_equal(b.gradients, a.gradients)
        np.testing.assert_array_equal(b.score, a.score)
        np.testing.assert_array_equal(b.targets, a.targets)
    one_hot = np.eye(10, dtype=np.float32)[EXPLICIT_TARGETS]
    np.testing.assert_allclose(
        weighted.run(x_np, target_weights=one_hot).gradients,
        plain.run(x_np, EXPLICIT_TARGETS).gradients, rtol=1e-6, atol=1e-8,
    )  # fmt: skip

    with pytest.raises(InputDataError, match="weighted_seed=True"):
        plain.run(x_np, target_weights=one_hot)
    with pytest.raises(InputDataError, match="not both"):
        weighted.run(x_np, targets=EXPLICIT_TARGETS, target_weights=one_hot)
    with pytest.raises(InputDataError, match="shape"):
        weighted.run(x_np, target_weights=one_hot[:, :5])


class _GuidedReluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        return grad_output * (x > 0) * (grad_output > 0)


class _GuidedRelu(nn.Module):
    def forward(self, x):
        return _GuidedReluFunction.apply(x)


def _guided_copy(model64: nn.Module) -> nn.Module:
    guided = copy.deepcopy(model64)
    for module in list(guided.modules()):
        for child_name, child in module.named_children():
            if isinstance(child, nn.ReLU):
                setattr(module, child_name, _GuidedRelu())
    return guided


def test_guided_relu_is_chosen_per_model() -> None:
    path, model64, x = _setup()
    x_np = as_numpy(x)
    guided64 = _guided_copy(model64)
    seed = _picked(EXPLICIT_TARGETS)
    values, grads, input_grad, _ = _torch_gradients(guided64, x, seed, {"layer2": guided64.layer2})
    _, plain_grads, plain_input, _ = _torch_gradients(model64, x, seed, {"layer2": model64.layer2})
    tensor = find_onnx_tensor(path, x_np, values["layer2"])
    assert np.abs(input_grad - plain_input).max() > 0.1 * np.abs(plain_input).max()

    options = BackwardOptions(layers=[tensor], input_gradient=True, relu_backward="guided")
    guided = CamModel(path, backward=options)
    # Built after the guided one, from the same file: unaffected.
    plain = CamModel(path, backward=BackwardOptions(layers=[tensor], input_gradient=True))
    g, p = guided.run(x_np, EXPLICIT_TARGETS), plain.run(x_np, EXPLICIT_TARGETS)
    _assert_relative(g.input_gradient, input_grad, "guided input gradient")
    _assert_relative(g.layers[tensor].gradients, grads["layer2"], "guided layer2 gradient")
    _assert_relative(p.input_gradient, plain_input, "plain input gradient")
    _assert_relative(p.layers[tensor].gradients, plain_grads["layer2"], "plain layer2 gradient")
    # Both in one run (Guided Grad-CAM): the plain pass and a second, guided one to the input.
    options = BackwardOptions(layers=[tensor], input_gradient=True, guided_input_gradient=True)
    both = CamModel(path, backward=options).run(x_np, EXPLICIT_TARGETS)
    _assert_relative(both.guided_input_gradient, input_grad, "guided input gradient, both")
    _assert_relative(both.input_gradient, plain_input, "plain input gradient, both")
    _assert_relative(both.layers[tensor].gradients, plain_grads["layer2"], "plain layer2, both")
    with pytest.raises(ValueError, match="relu_backward"):
        BackwardOptions(relu_backward="deconvnet")


def test_bias_gradients_are_fullgrads_terms() -> None:
    path, model64, x = _setup()
    x_np = as_numpy(x)
    # torchvision's in-place ReLUs would overwrite the BN outputs (the gradient taken would
    # then be the one after the ReLU); FullGrad's term is at the BN (= folded Conv) output.
    model64 = copy.deepcopy(model64)
    for module in model64.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    norms: list[nn.BatchNorm2d] = []
    outputs: list[torch.Tensor] = []

    def record(module, _inputs, output):
        norms.append(module)
        outputs.append(output)

    handles = [m.register_forward_hook(record) for m in model64.modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        logits = model64(x.double())
    finally:
        for handle in handles:
            handle.remove()
    grads = torch.autograd.grad(_picked(EXPLICIT_TARGETS)(logits), outputs + [logits])
    expected_bias = [
        (bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().numpy()
        for bn in norms
    ] + [model64.fc.bias.detach().numpy()]
    expected = [
        (g * torch.as_tensor(bias).reshape(1, -1, *([1] * (g.dim() - 2)))).detach().numpy()
        for g, bias in zip(grads, expected_bias, strict=True)
    ]

    cam = CamModel(path, backward=BackwardOptions(bias_gradients=True))
    graph = onnx.load(path).graph
    kinds = [n.op_type for n in graph.node if n.op_type in ("Conv", "Gemm")]
    assert [entry.op_type for entry in cam.graph.bias_outputs] == kinds  # every one, in order
    result = cam.run(x_np, EXPLICIT_TARGETS)
    assert list(result.bias_gradients) == [name for name, _ in cam.bias_layers]
    assert len(result.bias_gradients) == len(expected)
    for k, ((name, bias), term, want_bias, want) in enumerate(
        zip(cam.bias_layers, result.bias_gradients.values(), expected_bias, expected, strict=True)
    ):
        np.testing.assert_allclose(bias, want_bias, rtol=1e-5, atol=1e-6, err_msg=name)
        _assert_relative(term, want, f"bias term {k} ({name})")


def test_stage_layers_resnet18_are_the_stem_and_each_stage() -> None:
    path, model64, x = _setup()
    x_np = as_numpy(x)
    modules = {k: getattr(model64, k) for k in ("relu", "layer1", "layer2", "layer3", "layer4")}
    values, _, _, _ = _torch_gradients(model64, x, _picked(EXPLICIT_TARGETS), modules)
    expected = [find_onnx_tensor(path, x_np, values[k]) for k in modules]
    assert stage_layers(path) == expected
    cam = CamModel(path, backward=BackwardOptions(layers="stages"))
    assert cam.layers == expected and cam.layer == expected[-1] == CamModel(path).layer


def test_stage_layers_bundled_cnn_are_each_pools_input_and_the_default_layer() -> None:
    path = "models/fmnist_cnn.onnx"
    graph = onnx.load(path).graph
    pooled = [n.input[0] for n in graph.node if n.op_type == "MaxPool"]
    default = CamModel(path).layer
    assert stage_layers(path) == [*pooled, default]
    options = BackwardOptions(layers="stages", input_gradient=True, bias_gradients=True)
    cam = CamModel(path, backward=options)
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    result = cam.run(x)
    sizes = [result.layers[t].activations.shape[2:] for t in cam.layers]
    assert sizes == [(28, 28), (14, 14), (7, 7)]
    with pytest.raises(LayerNotFoundError, match="stages"):
        CamModel(path, backward=BackwardOptions(layers="stage"))
    # The head (pooling, Gemm) has no ReLU: Guided Backprop there would be the plain gradient.
    with pytest.raises(UnsupportedModelError, match="no ReLU"):
        CamModel(path, backward=BackwardOptions(relu_backward="guided"))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("form", ["qdq", "qoperator"])
def test_quantized_model_input_gradients_follow_the_float_model(form: str, tmp_path) -> None:
    """ONNX Runtime's quantizers drop the Relu nodes (QDQ: into the QuantizeLinear's range,
    QOperator: into QLinearConv's output): the input gradient, plain and guided, must still
    stop where those ReLUs did. Quantization moves the forward values slightly, so the
    gradients match the float model's in direction (a straight-through pass over the
    dropped ReLUs falls to a cosine of 0.46 / 0.2 here), and guided ones stay guided."""
    source = "models/fmnist_cnn.onnx"
    x = np.random.default_rng(0).standard_normal((8, 1, 28, 28)).astype(np.float32)
    quantized = str(quantize_ort(Path(source), tmp_path / f"{form}.onnx", form, x))
    for relu_backward in ("standard", "guided"):
        options = BackwardOptions(input_gradient=True, relu_backward=relu_backward)
        reference = CamModel(source, backward=options).run(x)
        result = CamModel(quantized, backward=options).run(x, reference.targets)
        assert _cosine(result.input_gradient, reference.input_gradient) > 0.98, relu_backward
    if form == "qdq":
        terms = CamModel(quantized, backward=BackwardOptions(bias_gradients=True)).run(x).bias_gradients
        assert len(terms) == 6  # five Conv and the Gemm, their biases from DequantizeLinear
    else:
        with pytest.raises(UnsupportedModelError, match="QLinearConv"):
            CamModel(quantized, backward=BackwardOptions(bias_gradients=True))


def _torch_hvp(model: nn.Module, module: nn.Module, x: torch.Tensor, targets) -> np.ndarray:
    """ShapleyCAM's second-order term as pytorch-grad-cam computes it: H · a at
    ``module``'s output (``grad(grads, activations, grad_outputs=activations)``)."""
    captured: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        logits = model(x)
    finally:
        handle.remove()
    (acts,) = captured
    (grads,) = torch.autograd.grad(_picked(targets)(logits), acts, create_graph=True)
    (hvp,) = torch.autograd.grad(grads, acts, grad_outputs=acts, allow_unused=True)
    return np.zeros(acts.shape) if hvp is None else hvp.detach().numpy()


HESSIAN = BackwardOptions(hessian_vector_product=True)


def test_hessian_vector_product_matches_torch(tmp_path) -> None:
    # A piecewise-linear head: the product is exactly 0, in torch and here.
    path, model64, x = _setup()
    cam = CamModel(path, backward=HESSIAN)
    assert cam.hessian_vanishes and cam.curved_head_ops == []
    assert not np.abs(_torch_hvp(model64, model64.layer4, x.double(), EXPLICIT_TARGETS)).any()
    assert not np.abs(cam.run(as_numpy(x), EXPLICIT_TARGETS).hessian_vector).any()

    # Curved heads: Sigmoid, HardSwish (mobilenet_v3's classifier), Softmax probabilities.
    for activation in (nn.Sigmoid(), nn.Hardswish(), nn.Softmax(dim=1)):
        torch.manual_seed(0)
        curved = nn.Sequential(
            nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(6, 8), activation, nn.Linear(8, 10),
        ).eval()  # fmt: skip
        onnx_path = tmp_path / "curved.onnx"
        example = torch.randn(2, 3, 16, 16)
        torch.onnx.export(curved, (example,), str(onnx_path), input_names=["input"],
                          opset_version=17, dynamo=False)  # fmt: skip
        cam = CamModel(str(onnx_path), backward=HESSIAN)
        assert not cam.hessian_vanishes
        assert [op for _, op in cam.curved_head_ops] == [type(activation).__name__.replace("Hardswish", "HardSwish")]
        expected = _torch_hvp(curved.double(), curved[1], example.double(), EXPLICIT_TARGETS)
        result = cam.run(example.numpy(), EXPLICIT_TARGETS)
        _assert_relative(result.hessian_vector, expected, f"H · a after {activation}")
        weighted = CamModel(str(onnx_path), backward=BackwardOptions(hessian_vector_product=True, weighted_seed=True))
        one_hot = np.eye(10, dtype=np.float32)[EXPLICIT_TARGETS]
        _assert_relative(weighted.run(example.numpy(), target_weights=one_hot).hessian_vector,
                         expected, "H · a, weighted seed")  # fmt: skip


def test_an_op_without_a_rule_below_the_head_is_refused_by_name() -> None:
    rng = np.random.default_rng(0)

    def weight(name, shape):
        return onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    nodes = [
        onnx.helper.make_node("Conv", ["input", "w1"], ["c1"], kernel_shape=[3, 3], pads=[1] * 4),
        onnx.helper.make_node("Softsign", ["c1"], ["s1"], name="the_softsign"),
        onnx.helper.make_node("Conv", ["s1", "w2"], ["c2"], kernel_shape=[3, 3], pads=[1] * 4),
        onnx.helper.make_node("Relu", ["c2"], ["r2"]),
        onnx.helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
        onnx.helper.make_node("Flatten", ["p"], ["f"]),
        onnx.helper.make_node("Gemm", ["f", "w3"], ["logits"], transB=1),
    ]
    graph = onnx.helper.make_graph(
        nodes, "softsign", [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", 1, 8, 8])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 3])],
        [weight("w1", (4, 1, 3, 3)), weight("w2", (4, 4, 3, 3)), weight("w3", (3, 4))],
    )  # fmt: skip
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    assert CamModel(model).layer == "r2"  # the head alone needs no Softsign rule
    with pytest.raises(UnsupportedOpError, match="Softsign.*the_softsign.*down to 'input'"):
        CamModel(model, backward=BackwardOptions(input_gradient=True))


def test_bias_terms_of_unfolded_batchnorms_are_fullgrads(tmp_path) -> None:
    """A BatchNorm after a ReLU stays a BatchNormalization node (nothing to fold it into):
    its term uses the effective bias, as pytorch-grad-cam's FullGrad does for BatchNorm2d,
    beside the terms of the Conv2d layers with a bias."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 5, 3, bias=False),
        nn.ReLU(), nn.BatchNorm2d(5), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 10),
    )  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    for bn in (model[2], model[5]):
        with torch.no_grad():
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=generator))
            bn.running_var.copy_(0.5 + torch.rand(bn.num_features, generator=generator))
            bn.weight.copy_(0.5 + torch.rand(bn.num_features, generator=generator))
            bn.bias.copy_(torch.randn(bn.num_features, generator=generator))
    model = model.eval().double()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64, generator=generator)
    path = tmp_path / "bn.onnx"
    torch.onnx.export(model.float(), (x.float(),), str(path), input_names=["input"],
                      opset_version=17, dynamo=False)  # fmt: skip
    model = model.double()
    cam = CamModel(str(path), backward=BackwardOptions(bias_gradients=True))
    assert [e.op_type for e in cam.graph.bias_outputs] == ["Conv", "BatchNormalization", "BatchNormalization", "Gemm"]

    layers = [model[0], model[2], model[5]]  # pytorch-grad-cam's FullGrad layers
    outputs: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for m in layers]
    try:
        logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    grads = torch.autograd.grad(_picked(EXPLICIT_TARGETS)(logits), outputs)
    biases = [model[0].bias] + [
        bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)
        for bn in (model[2], model[5])
    ]
    result = cam.run(x.float().numpy(), EXPLICIT_TARGETS)
    for (name, bias), want_bias, grad, term in zip(
        cam.bias_layers, biases, grads, list(result.bias_gradients.values())[:3], strict=False
    ):
        np.testing.assert_allclose(bias, want_bias.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
        want = (grad * want_bias.reshape(1, -1, 1, 1)).detach().numpy()
        _assert_relative(term, want, f"bias term at {name}")


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0", "convnext_tiny"])
def test_input_gradient_through_whole_networks(name: str) -> None:
    """Down to the input through squeeze-excitation (HardSigmoid, Sigmoid gates), HardSwish,
    SiLU, depthwise convolutions, LayerNorm and GELU."""
    path, model, _ = export_torchvision(name, False)
    model64 = float64_copy(name, model)
    x = well_conditioned_input(name, model, "first-conv", lambda m: m.features[0][0], default=False)
    _, _, input_grad, _ = _torch_gradients(model64, x, _picked(EXPLICIT_TARGETS), {})
    cam = CamModel(str(path), backward=BackwardOptions(input_gradient=True))
    result = cam.run(as_numpy(x), EXPLICIT_TARGETS)
    _assert_relative(result.input_gradient, input_grad, f"{name} input gradient")


def test_hessian_vector_product_of_real_heads() -> None:
    """mobilenet_v3_small's classifier (Linear, HardSwish, Linear) and a ViT's class-token
    head (the last block's attention and MLP after norm1) against torch's double backward."""
    path, model, _ = export_torchvision("mobilenet_v3_small", False)
    model64 = float64_copy("mobilenet_v3_small", model)
    x = well_conditioned_input("mobilenet_v3_small", model, "default", lambda m: m.features, default=True)
    cam = CamModel(str(path), backward=HESSIAN)
    expected = _torch_hvp(model64, model64.features, x.double(), EXPLICIT_TARGETS)
    _assert_relative(cam.run(as_numpy(x), EXPLICIT_TARGETS).hessian_vector, expected, "mobilenet_v3 H · a")

    path, model, _ = export_timm("vit_tiny_patch16_224", embed_dim=48, depth=2, num_heads=2)
    model64 = copy.deepcopy(model).double().eval()
    for block in model64.blocks:
        block.attn.fused_attn = False  # torch has no double backward of fused attention
    x = example_input(224)
    cam = CamModel(str(path), backward=HESSIAN)
    expected = _torch_hvp(model64, model64.blocks[-1].norm1, x.double(), EXPLICIT_TARGETS)
    grid = expected[:, 1:].transpose(0, 2, 1).reshape(len(x), -1, 14, 14)  # patch tokens
    _assert_relative(cam.run(as_numpy(x), EXPLICIT_TARGETS).hessian_vector, grid, "ViT H · a")
