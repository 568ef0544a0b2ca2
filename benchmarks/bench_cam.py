"""Speed of the vectorised CAM methods against per-image / per-channel loops.

Run from the repository root: .venv/bin/python -m benchmarks.bench_cam [--batch 32] [--repeats 5]
[--tables base new postprocess methods] [--images 2] [--size 96]

For each layer shape (N images, C channels, 7x7 positions, like ResNet-18, EfficientNet-Lite0
and ResNet-50 at 224x224) every method of ``sp2ps_onnx.cam`` is timed on random activations
and gradients against

* **loop**: the formula written the way it reads, one image and one channel at a time in
  Python (channel weights, then the weighted sum of the channel maps), and
* **pytorch-grad-cam**: its own ``get_cam_image`` on the same NumPy arrays (its gradient
  methods are already batched NumPy; its EigenCAM runs one full SVD per image).

A second table times the methods and options added for issue 20 against pytorch-grad-cam's
own code on the same arrays: KPCA-CAM (its ``get_2d_projection_kernel``, scikit-learn's
KernelPCA per image), FEM and RandomCAM (``get_cam_image``), ``eigen_smooth`` (Grad-CAM's
``get_cam_image(eigen_smooth=True)``), Deep Feature Factorization (its ``dff`` per image;
both run scikit-learn's NMF), SobelCAM (its ``sobel_cam``, OpenCV, per uint8 picture at
224x224) and ReciproCAM (no pytorch-grad-cam counterpart: ours alone, with a GAP -> Linear
head of 1000 classes in NumPy, so the time is the mosaics and the head passes).

The ``methods`` table times every method end to end, one row per name of
``sp2ps_onnx.cam.METHODS``: ``CamModel.cams`` on a torchvision ResNet-18 (random weights,
``--images`` images of ``--size`` pixels) exported to ONNX, against pytorch-grad-cam's own
call on the same torch model (its CAM class, ``FullGrad``, ``ShapleyCAM``, ``FinerCAM``,
``GuidedBackpropReLUModel`` per image, ``DeepFeatureFactorization`` and ``sobel_cam`` per
image), with one thread each (ONNX Runtime and torch). Its ``runs`` column counts ONNX Runtime
session calls for the batch (all of it in one call: the CAM model's run, forward or head
passes). ShapleyCAM is timed twice: on ResNet-18, whose linear head has no second-order term
(none is built here; torch still runs its double backward), and on MobileNetV3-Small, whose
classifier has a HardSwish (the Hessian-vector product runs in the same ONNX Runtime call).

The post-processing (ReLU, min-max, resize to 224x224, min-max) is timed against
pytorch-grad-cam's per-image ``scale_cam_image`` (OpenCV resize). Every pair is checked to
agree before timing. Times are the best of ``repeats`` runs of process CPU time, which other
processes on a shared machine disturb much less than wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from pytorch_grad_cam.feature_factorization.deep_feature_factorization import dff
from pytorch_grad_cam.sobel_cam import sobel_cam
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_kernel

from references.gradcam import REFERENCE_CLASSES
from sp2ps_onnx import cam

SHAPES = {"ResNet-18": 512, "EfficientNet-Lite0": 1280, "ResNet-50": 2048}
# The methods whose cost is NumPy's; Score-CAM and Ablation-CAM cost C forward passes per
# image, set by the runtime.
METHODS = ("gradcam", "gradcam++", "xgradcam", "hirescam", "gradcam-elementwise", "layercam",
           "eigencam", "eigengradcam")


def loop_channel_weights(method: str, acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """One image (C, h, w): the weight of every channel, channel by channel."""
    weights = np.empty(acts.shape[0])
    for c in range(acts.shape[0]):
        a, g = acts[c], grads[c]
        if method == "gradcam":
            weights[c] = g.mean()
        elif method == "gradcam++":
            g2 = g * g
            alpha = g2 / (2 * g2 + a.sum() * g2 * g + 1e-6)
            alpha[g == 0] = 0
            weights[c] = (np.maximum(g, 0) * alpha).sum()
        else:  # xgradcam
            weights[c] = (g * a / (a.sum() + 1e-7)).sum()
    return weights


def loop_raw_maps(method: str, acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """The per-image, per-channel loop a user would write from the formulas."""
    maps = np.zeros((acts.shape[0], *acts.shape[2:]))
    for n in range(acts.shape[0]):
        if method in ("eigencam", "eigengradcam"):
            source = acts[n] if method == "eigencam" else grads[n] * acts[n]
            matrix = source.reshape(source.shape[0], -1).T
            matrix = matrix - matrix.mean(axis=0)
            _, _, right = np.linalg.svd(matrix, full_matrices=False)
            maps[n] = (matrix @ right[0]).reshape(source.shape[1:])
            continue
        if method in ("gradcam", "gradcam++", "xgradcam"):
            weights = loop_channel_weights(method, acts[n], grads[n])
        for c in range(acts.shape[1]):
            a, g = acts[n, c], grads[n, c]
            if method in ("gradcam", "gradcam++", "xgradcam"):
                maps[n] += weights[c] * a
            elif method == "hirescam":
                maps[n] += g * a
            elif method == "gradcam-elementwise":
                maps[n] += np.maximum(g * a, 0)
            else:  # layercam
                maps[n] += np.maximum(g, 0) * a
    return maps


def reference_raw_maps(method: str, acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1))
    reference = REFERENCE_CLASSES[method](model, target_layers=[model[0]])
    try:
        return reference.get_cam_image(None, model[0], None, acts, grads, eigen_smooth=False)
    finally:
        reference.activations_and_grads.release()


def ours_raw_maps(method: str, acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
    if method == "eigencam":
        return cam.eigen_cam(acts)
    return cam.gradient_weighted_cam(method, acts, grads)


def reference_raw_maps_with(
    method: str, acts: np.ndarray, grads: np.ndarray, eigen_smooth: bool
) -> np.ndarray:
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1))
    reference = REFERENCE_CLASSES[method](model, target_layers=[model[0]])
    try:
        return reference.get_cam_image(None, model[0], None, acts, grads, eigen_smooth)
    finally:
        reference.activations_and_grads.release()


def seeded(function: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    """RandomCAM's draws from NumPy's global generator, the same on both sides."""

    def call(*args: object) -> np.ndarray:
        np.random.seed(0)
        return function(*args)

    return call


def per_image_dff(acts: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam's dff on one image at a time (ours factorises per image too)."""
    return np.concatenate([dff(acts[n : n + 1].copy(), 5)[1] for n in range(len(acts))])


def ours_per_image_dff(acts: np.ndarray) -> np.ndarray:
    return np.concatenate(
        [cam.deep_feature_factorization(acts[n : n + 1], 5)[1] for n in range(len(acts))]
    )


def gap_linear_head(channels: int, rng: np.random.Generator):
    weights = (rng.standard_normal((1000, channels)) / np.sqrt(channels)).astype(np.float32)

    def head(activations: np.ndarray) -> np.ndarray:
        return activations.mean(axis=(2, 3)) @ weights.T

    return head


def new_method_rows(
    layer: str, acts: np.ndarray, grads: np.ndarray, repeats: int, rng: np.random.Generator
):
    """(method, theirs, ours, arguments, up to sign) for the methods of issue 20."""
    count = len(acts)
    rows = [
        ("kpcacam", get_2d_projection_kernel, cam.kernel_pca_projection, (acts,), False),
        (
            "fem",
            lambda a, g: reference_raw_maps_with("fem", a, g, False),
            lambda a, g: cam.CAM_METHODS["fem"].compute(a),
            (acts, grads),
            False,
        ),
        (
            "randomcam",
            seeded(lambda a, g: reference_raw_maps_with("randomcam", a, g, False)),
            seeded(lambda a, g: cam.CAM_METHODS["randomcam"].compute(a)),
            (acts, grads),
            False,
        ),
        (
            "gradcam + eigen_smooth",
            lambda a, g: reference_raw_maps_with("gradcam", a, g, True),
            lambda a, g: cam.gradient_weighted_cam("gradcam", a, g, eigen_smooth=True),
            (acts, grads),
            True,
        ),
        ("dff (NMF, 5 concepts)", per_image_dff, ours_per_image_dff, (acts,), False),
    ]
    if layer == next(iter(SHAPES)):
        levels = rng.integers(0, 61, size=(count, 224, 224), dtype=np.uint8)
        pictures = np.repeat(levels[..., None], 3, axis=-1)
        rows.append(
            (
                "sobelcam (224x224 input)",
                lambda p: np.stack([sobel_cam(image) for image in p]).astype(np.float32),
                lambda p: cam.sobel_cam(p, "NHWC"),
                (pictures,),
                False,
            )
        )
    head = gap_linear_head(acts.shape[1], rng)
    targets = rng.integers(0, 1000, size=count)
    rows.append(
        ("reciprocam (49 head passes)", None,
         lambda a: cam.recipro_cam(a, targets, head, batch_size=64), (acts,), False)
    )  # fmt: skip
    for method, theirs, ours, arguments, up_to_sign in rows:
        # The slow pairs (seconds per call) once: their spread is far below their ratio.
        times = 1 if method.startswith(("dff", "gradcam + eigen")) else repeats
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NMF's ConvergenceWarning, on both sides
            mine = ours(*arguments)
            t_ours = best_cpu_seconds(times, ours, *arguments)
            if theirs is None:
                yield method, None, t_ours, None
                continue
            difference = agree(mine, np.asarray(theirs(*arguments), np.float64), up_to_sign)
            t_ref = best_cpu_seconds(times, theirs, *arguments)
        yield method, t_ref, t_ours, difference


def best_cpu_seconds(repeats: int, function: Callable[..., object], *args: object) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        function(*args)
        best = min(best, time.process_time() - started)
    return best


def agree(first: np.ndarray, second: np.ndarray, up_to_sign: bool) -> float:
    scale = max(1.0, float(np.abs(second).max()))
    deviation = np.abs(first - second).reshape(len(first), -1).max(axis=1)
    if up_to_sign:
        other = np.abs(first + second).reshape(len(first), -1).max(axis=1)
        deviation = np.minimum(deviation, other)
    return float(deviation.max()) / scale


def base_table(options: argparse.Namespace, rng: np.random.Generator) -> None:
    print(
        "| layer (C) | method | loop (ms) | pytorch-grad-cam (ms) | ours (ms) | "
        "vs loop | vs pytorch-grad-cam | max rel. diff |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for layer, channels in SHAPES.items():
        shape = (options.batch, channels, 7, 7)
        acts = np.maximum(rng.standard_normal(shape), 0).astype(np.float32)
        grads = (0.01 * rng.standard_normal(shape)).astype(np.float32)
        for method in METHODS:
            ours = ours_raw_maps(method, acts, grads)
            eigen = method.startswith("eigen")
            theirs = reference_raw_maps(method, acts, grads)
            difference = max(
                agree(ours, loop_raw_maps(method, acts, grads), eigen),
                agree(ours, theirs, eigen),
            )
            assert difference < 1e-4, (layer, method, difference)
            arguments = (method, acts, grads)
            t_loop = best_cpu_seconds(options.repeats, loop_raw_maps, *arguments)
            t_ref = best_cpu_seconds(options.repeats, reference_raw_maps, *arguments)
            t_ours = best_cpu_seconds(options.repeats, ours_raw_maps, *arguments)
            print(
                f"| {layer} ({channels}) | {method} | {1e3 * t_loop:.1f} | {1e3 * t_ref:.1f} | "
                f"{1e3 * t_ours:.2f} | {t_loop / t_ours:.0f}x | {t_ref / t_ours:.1f}x | "
                f"{difference:.1e} |"
            )
    print()


def new_methods_table(options: argparse.Namespace, rng: np.random.Generator) -> None:
    print("Methods and options of issue 20 (same N, 7x7 positions):")
    print()
    print("| layer (C) | method | pytorch-grad-cam (ms) | ours (ms) | vs pytorch-grad-cam | "
          "max rel. diff |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for layer, channels in SHAPES.items():
        shape = (options.batch, channels, 7, 7)
        acts = np.maximum(rng.standard_normal(shape), 0).astype(np.float32)
        grads = (0.01 * rng.standard_normal(shape)).astype(np.float32)
        for method, t_ref, t_ours, difference in new_method_rows(
            layer, acts, grads, options.repeats, rng
        ):
            if t_ref is None:
                print(f"| {layer} ({channels}) | {method} | – | {1e3 * t_ours:.2f} | – | – |")
                continue
            # SobelCAM's reference rounds to uint8 grey levels: 0.5 of up to 240.
            limit = 5e-3 if method.startswith("sobelcam") else 1e-3
            assert difference < limit, (layer, method, difference)
            print(
                f"| {layer} ({channels}) | {method} | {1e3 * t_ref:.1f} | {1e3 * t_ours:.2f} | "
                f"{t_ref / t_ours:.1f}x | {difference:.1e} |"
            )
    print()


def postprocess_table(options: argparse.Namespace, rng: np.random.Generator) -> None:
    raw = rng.standard_normal((options.batch, 7, 7)).astype(np.float32)

    def reference_postprocess() -> np.ndarray:
        return scale_cam_image(scale_cam_image(np.maximum(raw, 0), (224, 224)))

    difference = float(np.abs(cam.postprocess(raw, (224, 224)) - reference_postprocess()).max())
    t_ref = best_cpu_seconds(options.repeats, reference_postprocess)
    t_ours = best_cpu_seconds(options.repeats, cam.postprocess, raw, (224, 224))
    print(
        "| post-processing to 224x224 | pytorch-grad-cam + OpenCV (ms) | ours (ms) | "
        "ratio | max abs diff |"
    )
    print("|---|---|---|---|---|")
    print(
        f"| N = {options.batch} | {1e3 * t_ref:.2f} | {1e3 * t_ours:.2f} | "
        f"{t_ref / t_ours:.2f}x | {difference:.1e} |"
    )


class CountedRuns:
    """Counts ONNX Runtime session calls of every CamModel (siblings included)."""

    def __init__(self) -> None:
        from sp2ps_onnx.runtime import CamModel

        self.calls = 0
        self._owner = CamModel
        self._original = CamModel._run

        def counted(model, *args, **kwargs):
            self.calls += 1
            return self._original(model, *args, **kwargs)

        CamModel._run = counted

    def close(self) -> None:
        self._owner._run = self._original


def exported_torchvision(name: str, size: int, directory: str):
    """A torchvision classifier with random weights (1000 classes) and its ONNX export."""
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    example = torch.randn(1, 3, size, size)
    path = f"{directory}/{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), path, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "n"}},
                          opset_version=17, dynamo=False)  # fmt: skip
    return model, path


def reference_call(method: str, model, layer, x: torch.Tensor, targets, head) -> np.ndarray:
    """pytorch-grad-cam's own call for ``method`` on the torch model (None: it has none)."""
    import copy

    from pytorch_grad_cam import (
        DeepFeatureFactorization,
        FinerCAM,
        FullGrad,
        GradCAM,
        GuidedBackpropReLUModel,
        ShapleyCAM,
    )
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    wanted = [ClassifierOutputTarget(int(t)) for t in targets]
    classes = {**REFERENCE_CLASSES, "shapleycam": ShapleyCAM, "fullgrad": FullGrad}
    if method in classes:
        explainer = classes[method](model, target_layers=[] if method == "fullgrad" else [layer])
        try:
            return explainer(x, targets=wanted)
        finally:
            explainer.activations_and_grads.release()
    if method == "finercam":
        with FinerCAM(model, [layer]) as explainer:
            return explainer(x)
    if method == "refinecam":
        return several_layers_reference(method, model, [layer], x, targets)
    if method in ("guidedbackprop", "guidedgradcam"):
        guided = GuidedBackpropReLUModel(copy.deepcopy(model), device="cpu")
        gradients = np.stack([guided(x[i : i + 1], int(t)) for i, t in enumerate(targets)])
        if method == "guidedbackprop":
            return np.abs(gradients).max(axis=-1)
        with GradCAM(model, [layer]) as explainer:
            return explainer(x, targets=wanted) * np.abs(gradients).max(axis=-1)
    if method == "dff":
        explainer = DeepFeatureFactorization(model, layer, computation_on_concepts=head)
        try:
            return np.stack([explainer(x[i : i + 1], n_components=5)[1][0][0]
                             for i in range(len(x))])  # fmt: skip
        finally:
            explainer.activations_and_grads.release()
    if method == "sobelcam":
        pictures = (255 * (x - x.min()) / (x.max() - x.min())).to(torch.uint8)
        return np.stack([sobel_cam(p.permute(1, 2, 0).numpy().copy()) for p in pictures])
    return None  # reciprocam: not in pytorch-grad-cam


#: Methods whose maps are pytorch-grad-cam's up to float32 rounding on the same model (the
#: methods column reports their largest difference too).
_COMPARABLE = ("gradcam", "gradcam++", "xgradcam", "hirescam", "gradcam-elementwise",
               "layercam", "kpcacam", "fem", "fullgrad", "shapleycam", "finercam", "refinecam")


def several_layers_reference(method: str, model, layers, x: torch.Tensor, targets) -> np.ndarray:
    """pytorch-grad-cam with a list of target layers (RefineCAM: one base CAM per layer)."""
    from pytorch_grad_cam import GradCAM, RefineCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    explainer = {"gradcam": GradCAM, "refinecam": RefineCAM}[method](model, target_layers=layers)
    try:
        return explainer(x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    finally:
        for base in getattr(explainer, "base_cam_per_layer", [explainer]):
            base.activations_and_grads.release()


def several_layers_row(method: str, case, options: argparse.Namespace) -> str:
    """ResNet-18's layer3 and layer4 (the last two stages) from one run of ours against
    pytorch-grad-cam's list of two target layers."""
    from sp2ps_onnx.graph import stage_layers

    cam_model, model, _, x, targets, _ = case
    layers = stage_layers(cam_model.path)[-2:]
    images = x.numpy()
    cam_model.cams(images, method=method, targets=targets, layers=layers)  # builds it, untimed
    counter = CountedRuns()
    try:
        t_ours, (ours, _) = best_cpu_seconds_with_result(
            options.repeats, lambda: cam_model.cams(images, method, targets, layers=layers))
        runs = counter.calls // options.repeats
    finally:
        counter.close()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_ref, theirs = best_cpu_seconds_with_result(
            options.repeats, several_layers_reference, method, model,
            [model.layer3, model.layer4], x, targets)  # fmt: skip
    ratio = t_ref / t_ours
    return (f"| {method} (layer3 + layer4) | {runs} | {1e3 * t_ours:.1f} | {1e3 * t_ref:.1f} | "
            f"{ratio:.{1 if ratio >= 1 else 2}f}x | {float(np.abs(ours - theirs).max()):.1e} |")


def best_cpu_seconds_with_result(repeats: int, function: Callable[..., object], *args: object):
    """(best process CPU seconds, the last result) of ``repeats`` calls."""
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.process_time()
        result = function(*args)
        best = min(best, time.process_time() - started)
    return best, result


def method_row(label: str, method: str, case, options: argparse.Namespace) -> str:
    """One row of the methods table: ours (``CamModel.cams``) against pytorch-grad-cam."""
    cam_model, model, layer, x, targets, head = case
    images = x.numpy()
    wanted = None if method == "finercam" else targets
    repeats = 1 if method in ("scorecam", "ablationcam", "dff") else options.repeats
    if cam.CAM_METHODS[method].backward:
        cam_model.cams(images, method=method, targets=wanted)  # builds the sibling, untimed
    counter = CountedRuns()
    try:
        t_ours, (ours, _) = best_cpu_seconds_with_result(
            repeats, cam_model.cams, images, method, wanted
        )
        runs = counter.calls // repeats
    finally:
        counter.close()
    # pytorch-grad-cam's ScoreCAM and AblationCAM draw tqdm bars on stderr.
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        t_ref, theirs = best_cpu_seconds_with_result(
            repeats, reference_call, method, model, layer, x, targets, head
        )
    if theirs is None:
        return f"| {label} | {runs} | {1e3 * t_ours:.1f} | – | – | – |"
    difference = (f"{float(np.abs(ours - theirs).max()):.1e}" if method in _COMPARABLE
                  else "–")  # fmt: skip
    ratio = t_ref / t_ours
    return (f"| {label} | {runs} | {1e3 * t_ours:.1f} | {1e3 * t_ref:.1f} | "
            f"{ratio:.{1 if ratio >= 1 else 2}f}x | {difference} |")  # fmt: skip


def methods_table(options: argparse.Namespace, rng: np.random.Generator) -> None:
    import tempfile

    from sp2ps_onnx import CamModel

    print(f"Every method end to end: N = {options.images} images of {options.size}x"
          f"{options.size}, one thread each; runs: ONNX Runtime calls for the batch")  # fmt: skip
    print()
    print("| method | runs | ours (ms) | pytorch-grad-cam (ms) | vs pytorch-grad-cam | "
          "max abs diff |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as directory:
        cases = {}
        for name in ("resnet18", "mobilenet_v3_small"):
            model, path = exported_torchvision(name, options.size, directory)
            x = torch.from_numpy(
                rng.standard_normal((options.images, 3, options.size, options.size))
                .astype(np.float32))  # fmt: skip
            cam_model = CamModel(path, threads=1, batch_size=32)
            with torch.no_grad():
                targets = model(x).argmax(dim=1).numpy()
            if name == "resnet18":
                layer, head = model.layer4, model.fc
            else:
                layer, head = model.features, None
            cases[name] = (cam_model, model, layer, x, targets, head)
        for method in cam.METHODS:
            print(method_row(method, method, cases["resnet18"], options), flush=True)
        for method in ("gradcam", "shapleycam"):
            label = f"{method} (MobileNetV3-Small, curved head)"
            print(method_row(label, method, cases["mobilenet_v3_small"], options), flush=True)
        for method in ("gradcam", "refinecam"):
            print(several_layers_row(method, cases["resnet18"], options), flush=True)
    print()


TABLES = {"base": base_table, "new": new_methods_table, "postprocess": postprocess_table,
          "methods": methods_table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=2, help="images (methods table)")
    parser.add_argument("--size", type=int, default=96, help="input size (methods table)")
    parser.add_argument(
        "--tables", nargs="+", choices=sorted(TABLES), default=list(TABLES),
        help="which tables (default: all): the base methods against a loop and "
        "pytorch-grad-cam, the methods of issue 20, the post-processing, every method end "
        "to end on a model",
    )  # fmt: skip
    options = parser.parse_args()
    torch.set_num_threads(1)
    print(f"numpy {np.__version__}, {platform.processor() or platform.machine()}")
    print(f"best of {options.repeats}, process CPU seconds; N = {options.batch} and 7x7 "
          "positions in the base, new and postprocess tables")  # fmt: skip
    print()
    for name in options.tables:
        # Each table draws its own arrays, the same whichever others run.
        TABLES[name](options, np.random.default_rng(list(TABLES).index(name)))


if __name__ == "__main__":
    main()
