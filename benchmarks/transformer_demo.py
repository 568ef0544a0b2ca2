"""A small vision transformer, pruned and quantized, scored against its original (not run in CI).

Trains a ViT (timm ``VisionTransformer``: 28x28 grey input, 4x4 patches -> a 7x7 grid plus
a class token, 4 blocks of width 64) on Fashion-MNIST from the Debian package's IDX files,
exports it to ONNX (legacy exporter, opset 17), and makes four variants:

- global L1 magnitude pruning of the blocks' Linear weights at 50 % and 80 %;
- ONNX Runtime dynamic int8 quantization (MatMulInteger);
- ONNX Runtime static int8 QDQ quantization, calibrated on 256 training images.

Each is scored against the original with ``sp2ps score`` (Grad-CAM at the default layer, the
last block's norm1, whose 50 tokens are folded into the 7x7 grid with the class token
dropped) on the 300 bundled test images, and its accuracy is measured on the full test set
with ONNX Runtime. Writes ``docs/transformers.md`` and ``docs/figures/transformer_cams.png``.

    python benchmarks/transformer_demo.py [--train 30000] [--epochs 4] [--out docs/transformers.md]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from experiments import fmnist  # noqa: E402

SAMPLES = REPO / "models" / "samples" / "fmnist_test.npz"
CLASSES = REPO / "models" / "samples" / "classes.txt"


def build_vit():
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=4,
        num_heads=4, mlp_ratio=2.0,
    )


def train(model, x, y, epochs: int, seed: int = 0) -> None:
    import torch

    torch.manual_seed(seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    steps = epochs * (len(x) // 128)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=2e-3, total_steps=steps)
    images = torch.from_numpy(x[:, None].astype(np.float32) / 255)
    labels = torch.from_numpy(y)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x) - 127, 128):
            batch = order[start : start + 128]
            loss = torch.nn.functional.cross_entropy(model(images[batch]), labels[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}", flush=True)
    model.eval()


def export(model, path: Path) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, torch.zeros(2, 1, 28, 28), str(path), input_names=["input"],
            output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
            opset_version=17, dynamo=False,
        )


def magnitude_pruned(model, amount: float):
    import copy

    import torch
    from torch.nn.utils import prune

    pruned = copy.deepcopy(model)
    linears = [(m, "weight") for m in pruned.blocks.modules() if isinstance(m, torch.nn.Linear)]
    prune.global_unstructured(linears, pruning_method=prune.L1Unstructured, amount=amount)
    for module, name in linears:
        prune.remove(module, name)
    return pruned


def quantized(float_path: Path, x_calibration: np.ndarray, workdir: Path) -> dict[str, Path]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(
                [{"input": x_calibration[i : i + 32]} for i in range(0, len(x_calibration), 32)]
            )

        def get_next(self):
            return next(self.batches, None)

    dynamic = workdir / "vit_int8_dynamic.onnx"
    static = workdir / "vit_int8_qdq.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(str(float_path), str(dynamic), weight_type=QuantType.QInt8)
        quantize_static(
            str(float_path), str(static), Reader(), quant_format=QuantFormat.QDQ,
            per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        )
    return {"int8 dynamic (ORT)": dynamic, "int8 static QDQ (ORT)": static}


def accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = np.concatenate(
        [session.run(None, {"input": x[i : i + 500]})[0] for i in range(0, len(x), 500)]
    )
    return float((logits.argmax(axis=1) == y).mean())


def score(original: Path, variants: list[Path], out: Path) -> dict:
    command = [
        sys.executable, "-m", "sp2ps_onnx.cli", "score", str(original), *map(str, variants),
        "--data", str(SAMPLES), "--preset", "unit", "--classes", str(CLASSES), "--out", str(out),
        "--force", "--quiet", "--format", "json", "--device", "cpu",
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(done.stdout)


def figure(original: Path, variants: dict[str, Path], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sp2ps_onnx import CamModel

    samples = np.load(SAMPLES)
    images = samples["x"][:4]
    x = images[:, None].astype(np.float32) / 255
    labels = samples["y"][:4]
    models = {"original": original, **variants}
    fig, axes = plt.subplots(len(images), len(models), figsize=(2 * len(models), 2 * len(images)))
    for column, (title, path) in enumerate(models.items()):
        maps, _ = CamModel(str(path)).cams(x, targets=labels)
        for row in range(len(images)):
            axis = axes[row, column]
            axis.imshow(images[row], cmap="gray")
            axis.imshow(maps[row], cmap="jet", alpha=0.5, vmin=0, vmax=1)
            axis.set_axis_off()
            if row == 0:
                axis.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=30000, help="training images used")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", default=str(REPO / "docs" / "transformers.md"))
    parser.add_argument("--figure", default=str(REPO / "docs" / "figures" / "transformer_cams.png"))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    data = fmnist.subset(fmnist.load(), args.train, None, seed=0)
    started = time.perf_counter()
    model = build_vit()
    train(model, data["x_train"], data["y_train"], args.epochs)
    trained_s = time.perf_counter() - started
    x_test = data["x_test"][:, None].astype(np.float32) / 255
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        original = workdir / "vit.onnx"
        export(model, original)
        variants: dict[str, Path] = {}
        for amount in (0.5, 0.8):
            path = workdir / f"vit_mag{int(amount * 100)}.onnx"
            export(magnitude_pruned(model, amount), path)
            variants[f"magnitude {int(amount * 100)} %"] = path
        calibration = data["x_train"][:256, None].astype(np.float32) / 255
        variants.update(quantized(original, calibration, workdir))
        report = score(original, list(variants.values()), workdir / "report")
        figure(original, variants, Path(args.figure))
        rows = {Path(r["model"]).stem: r for r in report["models"]}
        lines = _document(args, trained_s, accuracy(original, x_test, data["y_test"]))
        for title, path in variants.items():
            r = rows[path.stem]
            lines.append(
                f"| {title} | {accuracy(path, x_test, data['y_test']):.4f} | "
                f"{r['sp2ps']:.3f} [{r['ci95_low']:.3f}, {r['ci95_high']:.3f}] | "
                f"{r['mean_spatial']:.3f} | {r['mean_spectral']:.3f} | {r['top1_agreement']:.1%} |"
            )
    lines += [
        "",
        "![Grad-CAMs of the ViT and its variants](figures/transformer_cams.png)",
        "",
        "Grad-CAM of the true class on the first four bundled test images (columns: the",
        "original, then the variants above).",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


def _document(args, trained_s: float, original_accuracy: float) -> list[str]:
    return [
        "# A vision transformer, pruned and quantized",
        "",
        "Written by `benchmarks/transformer_demo.py` (not part of CI). A small ViT (timm",
        "`VisionTransformer`, 28×28 grey input, 4×4 patches: a 7×7 grid and a class token, 4",
        f"blocks of width 64) trained for {args.epochs} epochs on {args.train:,} Fashion-MNIST",
        f"training images ({trained_s:.0f} s on the CPU), exported with the legacy exporter",
        "(opset 17). Its variants: global L1 magnitude pruning of the blocks' Linear weights,",
        "and ONNX Runtime int8 quantization (dynamic: MatMulInteger; static: QDQ, per channel,",
        "calibrated on 256 training images).",
        "",
        "`sp2ps score` explains every model at its default layer: the head reads only the",
        "class token, so the layer is the output of the last block's `norm1` (pytorch-grad-cam's",
        "`blocks[-1].norm1`), whose 50 tokens are folded into the 7×7 grid with the class token",
        "dropped (`sp2ps inspect` shows this). Sp2PS: Grad-CAM of the true label, SSIM and TV,",
        "mean over the 300 bundled test images (`models/samples/fmnist_test.npz`), with its",
        "bootstrap 95 % interval. Accuracy: ONNX Runtime on the full 10,000-image test set.",
        "",
        f"Original accuracy: {original_accuracy:.4f}.",
        "",
        "| variant | accuracy | Sp2PS [95 % CI] | spatial | spectral | top-1 agree |",
        "|---|---|---|---|---|---|",
    ]


if __name__ == "__main__":
    main()
