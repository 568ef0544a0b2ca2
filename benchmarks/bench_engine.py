"""Cost of explaining: CamModel.run (forward + in-graph head backward) vs a plain forward pass.

Run from the repository root: .venv/bin/python -m benchmarks.bench_engine [--size 224]
[--batch 8] [--repeats 5]
Needs the test extra (torch/torchvision) to export the models. Prints one row per model with
the median times and their ratio, all measured in the same process, interleaved.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torchvision

from experiments import artifacts
from sp2ps_onnx import CamModel

MODELS = ["resnet18", "mobilenet_v2", "efficientnet_b0", "densenet121", "convnext_tiny"]


def export(name: str, size: int, folder: Path) -> Path:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=1000).eval()
    return artifacts.export_torch(model, folder / f"{name}.onnx", (1, 3, size, size))


def interleaved_medians(first, second, repeats: int) -> tuple[float, float, float]:
    """Median times of ``first`` and ``second`` run alternately (so that the machine's
    drifting load hits both alike), and the median of the per-pair ratios second/first."""
    first()  # warm-up
    second()
    times_a, times_b = [], []
    for _ in range(repeats):
        for fn, times in ((first, times_a), (second, times_b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    ratios = [b / a for a, b in zip(times_a, times_b, strict=True)]
    return statistics.median(times_a), statistics.median(times_b), statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"machine: {platform.processor() or platform.machine()}, onnxruntime {ort.__version__}")
    print(f"input {args.batch}x3x{args.size}x{args.size}, median of {args.repeats}")
    print("| model | rewrite build s | backward nodes | forward ms | CamModel.run ms | ratio |")
    print("|---|---|---|---|---|---|")
    x = np.random.default_rng(0).normal(size=(args.batch, 3, args.size, args.size)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            path = export(name, args.size, Path(tmp))
            start = time.perf_counter()
            cam = CamModel(path, providers=["CPUExecutionProvider"], batch_size=args.batch)
            build = time.perf_counter() - start
            plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            forward, explain, ratio = interleaved_medians(
                lambda s=plain: s.run(None, {"input": x}), lambda c=cam: c.run(x), args.repeats
            )
            print(
                f"| {name} | {build:.2f} | {cam.graph.backward_nodes} | {forward * 1e3:.0f} | "
                f"{explain * 1e3:.0f} | {ratio:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
