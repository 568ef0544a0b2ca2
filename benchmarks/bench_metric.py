"""Speed of the batched Sp2PS metric against a per-image scikit-image + NumPy loop.

Run from the repository root: .venv/bin/python -m benchmarks.bench_metric [--sizes 64 256]
[--repeats 3]

Both sides compute the same numbers on the same 224x224 float64 CAM pairs (smooth maps made
by upsampling random 7x7 grids, like ResNet-style CAMs): per sample the clipped SSIM
(skimage.metrics.structural_similarity with the Sp2PS v1 settings), the spectral TV
similarity and their harmonic mean. The script checks that the results agree, then prints
the best-of-``repeats`` wall time of each and the ratio, interleaving the two so that load
from other processes hits both alike. ``sp2ps_onnx.metric`` runs with its default thread
count (SP2PS_THREADS, else up to 4 bounded by the CPU count); the single-thread columns set
SP2PS_THREADS=1 (the metric's BLAS calls are small enough that BLAS stays single-threaded).
The CPU-time ratio compares the process CPU time of the loop with that of the single-thread
metric, which other processes on a shared machine disturb much less than wall time.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import time

import numpy as np
from scipy import ndimage
from skimage.metrics import structural_similarity

from sp2ps_onnx import metric


def make_cams(rng: np.random.Generator, n: int, size: int = 224) -> np.ndarray:
    coarse = rng.random((n, 7, 7))
    fine = ndimage.zoom(coarse, (1, size / 7, size / 7), order=1)
    return metric.normalize_maps(fine)


def per_image_loop(P: np.ndarray, Q: np.ndarray) -> np.ndarray:
    """The reference implementation a user would write: one pair at a time."""
    h = np.empty(len(P))
    for i, (p, q) in enumerate(zip(P, Q, strict=True)):
        s = structural_similarity(
            p, q, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
        s = min(max(s, 0.0), 1.0)
        mp = np.abs(np.fft.fft2(p))
        mq = np.abs(np.fft.fft2(q))
        mp[0, 0] = 0.0
        mq[0, 0] = 0.0
        f = 1.0 - 0.5 * np.abs(mp / mp.sum() - mq / mq.sum()).sum()
        h[i] = 0.0 if s + f == 0 else 2 * s * f / (s + f)
    return h


def batched(P: np.ndarray, Q: np.ndarray) -> np.ndarray:
    return metric.sp2ps(P, Q).h


def timed(function, *args) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    function(*args)
    return time.perf_counter() - wall, time.process_time() - cpu


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    print(f"CPU: {cpu_name()}, {os.cpu_count()} logical cores; numpy {np.__version__}; "
          f"load average before: {os.getloadavg()[0]:.2f}")
    print("| N | loop wall (s) | metric wall (s) | speed-up | metric 1 thread wall (s) | "
          "speed-up, 1 thread | CPU-time ratio, 1 thread | max abs diff of h |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        P = make_cams(rng, n)
        Q = make_cams(rng, n)
        difference = float(np.max(np.abs(per_image_loop(P, Q) - batched(P, Q))))
        loop, default, single = [], [], []
        for _ in range(args.repeats):
            loop.append(timed(per_image_loop, P, Q))
            default.append(timed(batched, P, Q))
            os.environ["SP2PS_THREADS"] = "1"
            single.append(timed(batched, P, Q))
            del os.environ["SP2PS_THREADS"]
        loop_wall, loop_cpu = (min(column) for column in zip(*loop, strict=True))
        default_wall = min(wall for wall, _ in default)
        single_wall, single_cpu = (min(column) for column in zip(*single, strict=True))
        print(
            f"| {n} | {loop_wall:.3f} | {default_wall:.3f} | {loop_wall / default_wall:.2f}x | "
            f"{single_wall:.3f} | {loop_wall / single_wall:.2f}x | {loop_cpu / single_cpu:.2f}x | "
            f"{difference:.1e} |",
            flush=True,
        )
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
