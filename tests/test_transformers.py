"""Vision transformers: token maps and channels-last maps against pytorch-grad-cam and torch.

Models: timm ``vit_tiny_patch16_224`` (one class token), ``deit_tiny_distilled_patch16_224``
(class and distillation tokens) and ``swin_tiny_patch4_window7_224`` (channels-last
(N, H, W, C) maps normalised by LayerNorm), random weights, exported with the legacy
exporter at opset 17, 224x224, batch 2. The perturbation methods run on a narrower Swin
(same code, fewer channels) to keep their one forward pass per channel cheap.

Reference: pytorch-grad-cam's own CAM classes on the torch model with the target layer of
its tutorial and its documented reshape transforms (``vit_reshape_transform``, which drops
one class token, after dropping the distillation token for DeiT; ``swinT_reshape_transform``
on the (N, H*W, C) tokens of Swin's map). Truths for the engine's layout proofs: torch's
activations and autograd gradients at the same module, and a pattern planted in the patch
tokens that must come back at its place on the grid.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from pytorch_grad_cam.utils.reshape_transforms import (
    swinT_reshape_transform,
    vit_reshape_transform,
)

from references.gradcam import REFERENCE_CLASSES
from sp2ps_onnx import CamModel
from sp2ps_onnx.cam import eigen_cam, gradient_weighted_cam, postprocess
from sp2ps_onnx.errors import LayerNotFoundError
from sp2ps_onnx.graph import inspect_model
from sp2ps_onnx.graph.locate import RULE_CLASS_TOKEN, RULE_LAST_MAP, TokenLayout
from tests import exports

GRADIENT_AND_EIGEN = (
    "gradcam", "gradcam++", "xgradcam", "hirescam", "gradcam-elementwise", "layercam",
    "eigencam", "eigengradcam",
)  # fmt: skip
TOLERANCE = 1e-3
VIT, DEIT, SWIN = (
    "vit_tiny_patch16_224",
    "deit_tiny_distilled_patch16_224",
    "swin_tiny_patch4_window7_224",
)
NARROW_SWIN = {"embed_dim": 12, "depths": (1, 1, 2, 1), "num_heads": (1, 1, 2, 2)}


def torch_layer(name: str, model):
    """pytorch-grad-cam's tutorial layer for ViT/DeiT (``blocks[-1].norm1``); for timm's
    Swin the final norm, whose output (N, 7, 7, C) is the last stage's map the head pools."""
    return model.norm if "swin" in name else model.blocks[-1].norm1


def reshape_transform(name: str):
    """pytorch-grad-cam's documented transforms (timm's Swin keeps maps as (N, H, W, C), so
    its tokens are flattened first into the (N, H*W, C) that the Swin transform expects).

    The result is cloned: pytorch-grad-cam detaches the stored tensors in place on release,
    which torch refuses for views."""
    if "swin" in name:
        return lambda t: swinT_reshape_transform(t.flatten(1, 2), *t.shape[1:3]).clone()
    if "distilled" in name:
        return lambda t: vit_reshape_transform(t[:, 1:]).clone()
    return lambda t: vit_reshape_transform(t).clone()


NARROW_DEIT = {"embed_dim": 48, "depth": 2, "num_heads": 2}
_cam_models: dict[str, CamModel] = {}


def case(name: str, batch: int = 2, **kwargs):
    path, model, _ = exports.export_timm(name, **kwargs)
    x = exports.example_input(224, batch=batch, seed=3)
    return path, model, x


def cam_model(path) -> CamModel:
    """One CamModel per export in this module (building one probes the whole graph)."""
    if str(path) not in _cam_models:
        _cam_models[str(path)] = CamModel(str(path))
    return _cam_models[str(path)]


def reference_cams(method: str, name: str, model, x, targets, **kwargs) -> np.ndarray:
    reference = REFERENCE_CLASSES[method](
        model, target_layers=[torch_layer(name, model)], reshape_transform=reshape_transform(name),
        **kwargs,
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return reference(x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    finally:
        reference.activations_and_grads.release()


def worst(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(ours.astype(np.float64) - theirs).max())


@pytest.mark.parametrize("name", [VIT, DEIT, SWIN])
def test_default_layer_activations_and_gradients_equal_torch(name: str) -> None:
    path, model, x = case(name)
    cam = cam_model(path)
    expected_rule = RULE_LAST_MAP if "swin" in name else RULE_CLASS_TOKEN
    assert cam.layer_rule == expected_rule
    result = cam.run(x.numpy(), targets=[3, 7])

    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["layer"] = output

    handle = torch_layer(name, model).register_forward_hook(keep)
    try:
        logits = model(x)
        logits[torch.arange(len(x)), torch.tensor([3, 7])].sum().backward()
    finally:
        handle.remove()
    transform = reshape_transform(name)
    activations = transform(captured["layer"].detach()).numpy()
    gradients = transform(captured["layer"].grad).numpy()
    np.testing.assert_allclose(result.score, logits.detach().numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(result.activations, activations, atol=1e-4, rtol=0)
    scale = np.abs(gradients).max()
    assert scale > 0
    np.testing.assert_allclose(result.gradients, gradients, atol=1e-4 * scale, rtol=0)


@pytest.mark.parametrize("name", [VIT, DEIT, SWIN])
def test_gradient_and_eigen_methods_equal_pytorch_grad_cam(name: str) -> None:
    path, model, x = case(name)
    cam = cam_model(path)
    # The top class, then a fixed class for every image.
    for requested in (None, 3):
        # End to end once: CamModel.cams against pytorch-grad-cam's full call (hooks and
        # reshape transform on the torch model).
        ours, targets = cam.cams(x.numpy(), method="gradcam", targets=requested)
        assert worst(ours, reference_cams("gradcam", name, model, x, targets)) <= TOLERANCE
        # Every method then from one run of each side: ours through the same functions
        # that CamModel.cams calls, theirs through its CAM code on the hooked tensors.
        result = cam.run(x.numpy(), targets)
        theirs_inputs = _torch_reshaped(name, model, x, targets)
        for method in GRADIENT_AND_EIGEN:
            raw = (
                eigen_cam(result.activations)
                if method == "eigencam"
                else gradient_weighted_cam(method, result.activations, result.gradients)
            )
            ours = postprocess(raw, (224, 224))
            theirs = _reference_from(method, name, model, x, targets, *theirs_inputs)
            deviation = worst(ours, theirs)
            if method in ("eigencam", "eigengradcam") and deviation > TOLERANCE:
                # The SVD's sign is arbitrary; the other sign is the negated projection.
                deviation = min(deviation, worst(ours, _negated_eigen(method, x, *theirs_inputs)))
            assert deviation <= TOLERANCE, f"{name} {method}: {deviation:.3g}"


def _torch_reshaped(name: str, model, x, targets):
    """The layer's activations and gradients, reshaped by the documented transform."""
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["layer"] = output

    handle = torch_layer(name, model).register_forward_hook(keep)
    try:
        logits = model(x)
        logits[torch.arange(len(x)), torch.as_tensor(targets)].sum().backward()
    finally:
        handle.remove()
    transform = reshape_transform(name)
    return transform(captured["layer"].detach()), transform(captured["layer"].grad)


def _reference_from(method, name, model, x, targets, activations, gradients) -> np.ndarray:
    reference = REFERENCE_CLASSES[method](
        model, target_layers=[torch_layer(name, model)], reshape_transform=reshape_transform(name)
    )
    try:
        reference.activations_and_grads.activations = [activations]
        reference.activations_and_grads.gradients = [gradients]
        chosen = [ClassifierOutputTarget(int(t)) for t in targets]
        return reference.aggregate_multi_layers(reference.compute_cam_per_layer(x, chosen, False))
    finally:
        reference.activations_and_grads.release()


def _negated_eigen(method: str, x, activations, gradients) -> np.ndarray:
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    source = activations.numpy() * (gradients.numpy() if method == "eigengradcam" else 1)
    projection = -get_2d_projection(source)
    per_layer = scale_cam_image(np.maximum(projection, 0), (x.shape[-1], x.shape[-2]))
    return scale_cam_image(np.maximum(per_layer[:, None], 0).mean(axis=1))


@pytest.mark.parametrize(("name", "kwargs"), [(DEIT, NARROW_DEIT), (SWIN, NARROW_SWIN)])
def test_score_cam_equals_pytorch_grad_cam(name: str, kwargs: dict) -> None:
    path, model, x = case(name, batch=1, **kwargs)
    ours, targets = CamModel(str(path)).cams(x.numpy(), method="scorecam")
    theirs = reference_cams("scorecam", name, model, x, targets)
    assert worst(ours, theirs) <= TOLERANCE


@pytest.mark.parametrize(("name", "kwargs"), [(DEIT, NARROW_DEIT), (SWIN, NARROW_SWIN)])
def test_ablation_cam_equals_pytorch_grad_cam(name: str, kwargs: dict) -> None:
    # AblationLayerVit, the ablation layer pytorch-grad-cam documents for transformers,
    # ablates a channel in every token (class tokens too) of the raw layer output; the
    # head (after a block's norm1 it also reads the block's input) re-runs per channel.
    # batch_size=1: its minimum is then the one sp2ps_onnx.cam uses for every channel.
    from pytorch_grad_cam.ablation_layer import AblationLayerVit

    path, model, x = case(name, batch=1, **kwargs)
    cam = CamModel(str(path))
    expected = ("extra_tokens", "images") if name == DEIT else ()
    assert cam.head_inputs == expected
    ours, targets = cam.cams(x.numpy(), method="ablationcam")
    theirs = reference_cams(
        "ablationcam", name, model, x, targets, batch_size=1, ablation_layer=AblationLayerVit()
    )
    assert worst(ours, theirs) <= TOLERANCE


def test_planted_pattern_comes_back_at_its_place() -> None:
    # The class token and a 3x5 grid of patch tokens, one channel: the value of patch
    # (r, c) is 10 * r + c, the class token -1. The graph prepends the class token with
    # Concat to tokens made by Conv -> Reshape -> Transpose, adds a positional embedding and
    # normalises the channels; the head reads the class token. A transposed or shifted
    # reshape would put 10 * r + c anywhere but at (r, c).
    cam = CamModel(_planted_token_model(rows=3, columns=5), layer="tokens")
    layout = cam.graph.layer_layout
    assert isinstance(layout, TokenLayout) and layout.grid == (3, 5) and layout.offset == 1
    x = np.zeros((2, 1, 6, 10), np.float32)
    result = cam.run(x)
    expected = 10 * np.arange(3)[:, None] + np.arange(5)[None, :]
    np.testing.assert_array_equal(result.activations[:, 0], np.broadcast_to(expected, (2, 3, 5)))


def _planted_token_model(rows: int, columns: int) -> onnx.ModelProto:
    """x (N, 1, 2*rows, 2*columns) -> Conv 2x2/2 with zero weights (a zero map) + bias-free
    -> Reshape (N, 1, rows*columns) -> Transpose (N, T, 1) -> Concat(class token) ->
    Add(positional embedding holding the pattern) = "tokens" -> Gather class token -> Gemm."""
    patches = rows * columns
    pattern = np.concatenate([[-1.0], 10 * np.repeat(np.arange(rows), columns) + np.tile(
        np.arange(columns), rows)]).astype(np.float32).reshape(1, patches + 1, 1)
    nodes = [
        helper.make_node("Conv", ["x", "k"], ["map"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Shape", ["map"], ["map_shape"]),
        helper.make_node("Slice", ["map_shape", "zero", "two"], ["batch_channels"]),
        helper.make_node("Concat", ["batch_channels", "minus_one"], ["flat_shape"], axis=0),
        helper.make_node("Reshape", ["map", "flat_shape"], ["flat"]),
        helper.make_node("Transpose", ["flat"], ["patch_tokens"], perm=[0, 2, 1]),
        helper.make_node("Shape", ["x"], ["x_shape"]),
        helper.make_node("Slice", ["x_shape", "zero", "one"], ["batch"]),
        helper.make_node("Concat", ["batch", "one", "one"], ["cls_shape"], axis=0),
        helper.make_node("Expand", ["cls", "cls_shape"], ["cls_tokens"]),
        helper.make_node("Concat", ["cls_tokens", "patch_tokens"], ["joined"], axis=1),
        helper.make_node("Add", ["joined", "pos"], ["tokens"]),
        helper.make_node("Gather", ["tokens", "zero_scalar"], ["class_token"], axis=1),
        helper.make_node("Gemm", ["class_token", "w"], ["logits"]),
    ]
    initializers = [
        numpy_helper.from_array(np.zeros((1, 1, 2, 2), np.float32), "k"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.array([2], np.int64), "two"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
        numpy_helper.from_array(np.array(0, np.int64), "zero_scalar"),
        numpy_helper.from_array(np.zeros((1, 1, 1), np.float32), "cls"),
        numpy_helper.from_array(pattern, "pos"),
        numpy_helper.from_array(np.ones((1, 4), np.float32), "w"),
    ]
    graph = helper.make_graph(
        nodes,
        "planted",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 2 * rows, 2 * columns])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _flattened_token_model() -> onnx.ModelProto:
    """Conv (N, 2, 3, 5) -> Flatten -> Reshape (N, 15, 2) -> class token -> Gather -> Gemm:
    the tokens come from a channel-major flat vector cut into rows of two, which is no
    grid of patches (nothing in the graph says which values belong to which patch)."""
    rng = np.random.default_rng(6)
    nodes = [
        helper.make_node("Conv", ["x", "k"], ["map"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["map"], ["flat"], axis=1),
        helper.make_node("Reshape", ["flat", "token_shape"], ["patch_tokens"]),
        helper.make_node("Shape", ["x"], ["x_shape"]),
        helper.make_node("Slice", ["x_shape", "zero", "one"], ["batch"]),
        helper.make_node("Concat", ["batch", "one", "two"], ["cls_shape"], axis=0),
        helper.make_node("Expand", ["cls", "cls_shape"], ["cls_tokens"]),
        helper.make_node("Concat", ["cls_tokens", "patch_tokens"], ["tokens"], axis=1),
        helper.make_node("Gather", ["tokens", "zero_scalar"], ["class_token"], axis=1),
        helper.make_node("Gemm", ["class_token", "w"], ["logits"]),
    ]
    initializers = [
        numpy_helper.from_array(rng.standard_normal((2, 1, 2, 2)).astype(np.float32), "k"),
        numpy_helper.from_array(np.array([0, 15, 2], np.int64), "token_shape"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.array([2], np.int64), "two"),
        numpy_helper.from_array(np.array(0, np.int64), "zero_scalar"),
        numpy_helper.from_array(np.ones((1, 1, 2), np.float32), "cls"),
        numpy_helper.from_array(rng.standard_normal((2, 4)).astype(np.float32), "w"),
    ]
    graph = helper.make_graph(
        nodes,
        "flattened",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 6, 10])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_unproven_token_grid_is_refused_and_can_be_stated() -> None:
    model = _flattened_token_model()
    with pytest.raises(LayerNotFoundError) as caught:
        CamModel(model, layer="tokens")
    assert "grid=(H, W)" in str(caught.value) and "'tokens'" in str(caught.value)
    stated = CamModel(model, layer="tokens", grid=(3, 5))
    layout = stated.graph.layer_layout
    assert layout.stated and layout.offset == 1 and layout.grid == (3, 5)
    # The stated fold is what pytorch-grad-cam's reshape transform would do.
    x = np.random.default_rng(7).standard_normal((2, 1, 6, 10)).astype(np.float32)
    result = stated.run(x)
    assert result.activations.shape == (2, 2, 3, 5)
    with pytest.raises(LayerNotFoundError, match="does not fit"):
        CamModel(model, layer="tokens", grid=(4, 5))


def test_stated_grid_that_contradicts_the_graph_is_refused() -> None:
    path, _, _ = case(VIT)
    with pytest.raises(LayerNotFoundError, match="proves its tokens form a 14x14 grid"):
        CamModel(str(path), grid=(7, 28))


def test_inspect_names_the_rule_and_the_reshape() -> None:
    path, _, _ = case(DEIT)
    found = inspect_model(str(path))  # graph-level only: no session is built
    assert found["layer"].endswith("blocks.11/norm1/LayerNormalization_output_0")
    assert found["layer_rule"] == RULE_CLASS_TOKEN
    assert found["layer_shape"] == [192, 14, 14]
    assert "2 leading tokens dropped" in found["layer_reshape"]


def test_exported_model_outputs_the_folded_maps(tmp_path) -> None:
    import onnxruntime as ort

    path, _, x = case(DEIT)
    cam = cam_model(path)
    cam.save(tmp_path / "deit_cam.onnx")
    session = ort.InferenceSession(str(tmp_path / "deit_cam.onnx"))
    names = [o.name for o in session.get_outputs()]
    values = session.run(None, {"input": x.numpy(), "target": np.array([-1, 4])})
    outputs = dict(zip(names, values, strict=True))
    result = cam.run(x.numpy(), targets=None)
    assert outputs["activations"].shape == (2, 192, 14, 14)
    np.testing.assert_allclose(outputs["activations"], result.activations, atol=1e-5, rtol=0)


def _scrambled_then_normalised(form: str | None) -> onnx.ModelProto:
    """Conv (N, C, H, W) -> Flatten -> Reshape to (N, 8, 8, 6): a reshape that cuts the flat
    channel-major vector differently, so no traced role survives it. Then ``form``: a decomposed layer norm over the last axis
    (``"div"``: (x - mean) / sqrt(var + eps); ``"reciprocal"``: (x - mean) * 1 / sqrt(...)),
    or ``None`` (no norm); then the mean over H, W and a Gemm."""
    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("Conv", ["x", "k"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c"], ["flat"], axis=1),
        helper.make_node("Reshape", ["flat", "shape"], ["map"]),
    ]
    last = "map"
    if form is not None:
        nodes += [
            helper.make_node("ReduceMean", ["map"], ["mean"], axes=[-1], keepdims=1),
            helper.make_node("Sub", ["map", "mean"], ["centred"]),
            helper.make_node("Pow", ["centred", "two"], ["squared"]),
            helper.make_node("ReduceMean", ["squared"], ["variance"], axes=[-1], keepdims=1),
            helper.make_node("Add", ["variance", "eps"], ["shifted"]),
            helper.make_node("Sqrt", ["shifted"], ["deviation"]),
        ]
        if form == "div":
            nodes.append(helper.make_node("Div", ["centred", "deviation"], ["normed"]))
        else:
            nodes += [
                helper.make_node("Reciprocal", ["deviation"], ["inverse"]),
                helper.make_node("Mul", ["centred", "inverse"], ["normed"]),
            ]
        nodes += [
            helper.make_node("Mul", ["normed", "gamma"], ["scaled"]),
            helper.make_node("Add", ["scaled", "beta"], ["ln"]),
        ]
        last = "ln"
    nodes += [
        helper.make_node("ReduceMean", [last], ["pooled"], axes=[1, 2], keepdims=0),
        helper.make_node("Gemm", ["pooled", "w"], ["logits"]),
    ]
    values = {
        "k": rng.standard_normal((6, 3, 3, 3)),
        "shape": np.array([0, 8, 8, 6]),
        "two": np.array(2.0),
        "eps": np.array(1e-5),
        "gamma": 1 + 0.1 * rng.standard_normal(6),
        "beta": 0.1 * rng.standard_normal(6),
        "w": rng.standard_normal((6, 4)),
    }
    initializers = [
        numpy_helper.from_array(v.astype(np.int64 if k == "shape" else np.float32), k)
        for k, v in values.items()
    ]
    graph = helper.make_graph(
        nodes,
        "decomposed_layer_norm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("form", ["div", "reciprocal"])
def test_decomposed_layer_norm_proves_the_channel_axis(form: str) -> None:
    model = _scrambled_then_normalised(form)
    cam = CamModel(model)
    assert cam.layer == "ln"
    assert cam.graph.layer_layout.channel_axis == 3
    x = np.random.default_rng(5).standard_normal((2, 3, 8, 8)).astype(np.float32)
    result = cam.run(x, targets=[1, 2])
    # The layer's values, channels first, straight from ONNX Runtime: the rewrite only
    # transposes them.
    import onnxruntime as ort

    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    exposed.graph.output.append(helper.make_tensor_value_info("ln", TensorProto.FLOAT, None))
    stored = ort.InferenceSession(exposed.SerializeToString()).run(["ln"], {"x": x})[0]
    np.testing.assert_allclose(result.activations, stored.transpose(0, 3, 1, 2), atol=1e-6)
    # The head is a mean over H, W and a Gemm: d logit_t / d map = w[:, t] / (H * W).
    w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w"))
    expected = np.broadcast_to(w.T[[1, 2], :, None, None] / 64, result.gradients.shape)
    np.testing.assert_allclose(result.gradients, expected, rtol=1e-5, atol=1e-7)


def test_map_without_a_layout_proof_is_still_refused() -> None:
    with pytest.raises(LayerNotFoundError, match="holds the channels"):
        CamModel(_scrambled_then_normalised(None))


def test_cli_grid_option_on_inspect_export_and_cam(tmp_path) -> None:
    import json

    import onnxruntime as ort
    from click.testing import CliRunner

    from sp2ps_onnx.cli import cli

    model = tmp_path / "flat_tokens.onnx"
    onnx.save(_flattened_token_model(), model)
    runner = CliRunner()
    refused = runner.invoke(cli, ["inspect", str(model), "--layer", "tokens"])
    assert refused.exit_code == 2 and "--grid HxW" in refused.output
    found = runner.invoke(
        cli, ["inspect", str(model), "--layer", "tokens", "--grid", "3x5", "--format", "json"]
    )
    assert found.exit_code == 0, found.output
    details = json.loads(found.output)
    assert details["layer_shape"] == [2, 3, 5]
    assert "3x5 grid, 1 leading token dropped (stated" in details["layer_reshape"]
    assert runner.invoke(cli, ["inspect", str(model), "--grid", "3by5"]).exit_code == 2

    exported = tmp_path / "flat_tokens_cam.onnx"
    written = runner.invoke(
        cli, ["export", str(model), "-o", str(exported), "--layer", "tokens", "--grid", "3x5"]
    )
    assert written.exit_code == 0, written.output
    x = np.random.default_rng(8).standard_normal((3, 1, 6, 10)).astype(np.float32)
    session = ort.InferenceSession(str(exported))
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(None, {"x": x, "target": np.full(3, -1)}), strict=True))
    assert values["activations"].shape == (3, 2, 3, 5)

    images = tmp_path / "x.npy"
    np.save(images, x)
    out = tmp_path / "cams"
    made = runner.invoke(
        cli, ["cam", str(model), str(images), "-o", str(out), "--layer", "tokens", "--grid",
              "3x5", "--quiet"],
    )
    assert made.exit_code == 0, made.output
    maps = sorted(out.glob("*.npy"))
    assert len(maps) == 3 and np.load(maps[0]).shape == (6, 10)

    # score: the stated grid reaches every compared model; a model against itself scores 1.
    scored = runner.invoke(
        cli, ["score", str(model), str(model), "--data", str(images), "--layer", "tokens",
              "--grid", "3x5", "--spatial", "pearson", "--no-report", "--format", "json",
              "--bootstrap", "0", "-q"],
    )
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.stdout)["models"][0]["sp2ps"] == pytest.approx(1.0, abs=1e-9)
    unstated = runner.invoke(
        cli, ["score", str(model), str(model), "--data", str(images), "--layer", "tokens",
              "--no-report", "-q"],
    )
    assert unstated.exit_code == 2 and "--grid HxW" in unstated.output


# Hybrids: the last map with a proven grid, at the torch module whose output it is.
HYBRIDS = {
    # LeViT: tokens through BatchNorm1d views (N*T, C) and strided token subsampling.
    "levit_128s": ("stages", 224),
    # EfficientFormer: a 4-D stem and stages, then tokens from a flatten, normed last.
    "efficientformer_l1": ("norm", 224),
    "efficientformerv2_s0": ("norm", 224),
    "mobilevit_xxs": ("final_conv", 256),
}


@pytest.mark.parametrize("name", list(HYBRIDS))
def test_hybrid_default_layer_equals_torch(name: str) -> None:
    module_name, size = HYBRIDS[name]
    path, model, _ = exports.export_timm(name, size=size)
    x = exports.example_input(size, batch=2, seed=3)
    cam = CamModel(str(path))
    assert cam.layer_rule == RULE_LAST_MAP
    result = cam.run(x.numpy(), targets=[1, 6])
    captured = {}
    module = dict(model.named_modules())[module_name]
    handle = module.register_forward_hook(lambda m, i, o: captured.setdefault("layer", o))
    try:
        logits = model(x)
    finally:
        handle.remove()
    layer = captured["layer"]
    (gradient,) = torch.autograd.grad(logits[torch.arange(2), torch.tensor([1, 6])].sum(), layer)
    if layer.ndim == 3:  # (N, T, C) tokens on the grid the engine proved
        h, w = cam.graph.layer_layout.grid
        assert h * w == layer.shape[1]

        def fold(t):
            return t.reshape(len(t), h, w, -1).permute(0, 3, 1, 2)

        layer, gradient = fold(layer), fold(gradient)
    np.testing.assert_allclose(result.activations, layer.detach().numpy(), atol=1e-4, rtol=0)
    scale = float(gradient.abs().max())
    np.testing.assert_allclose(result.gradients, gradient.numpy(), atol=1e-4 * scale, rtol=0)
