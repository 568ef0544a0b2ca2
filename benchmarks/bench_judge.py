"""Cost of :meth:`Sp2PSJudge.score` and of a ``--cache`` run, against the candidate's own pass.

Run from the repository root: .venv/bin/python -m benchmarks.bench_judge [--n 2000]
[--repeats 3] [--part judge,cache]

* ``judge``: the bundled Fashion-MNIST original, one judge over the first ``--n`` test images
  (Debian package ``dataset-fashion-mnist``; without it the 300 bundled samples), and a
  pruned candidate. Interleaved in one process (bare, bare-plan, judge, bare, ...), the
  fastest of ``--repeats`` counts, since noise only ever adds time:

  - ``bare``: what a user writes for the candidate's pass: ``CamModel(candidate)`` (graph
    rewrite and session), preprocessing, then ``cams(..., return_scores=True)`` batch after
    batch with the classes the judge explains (the labels), default threads;
  - ``bare-plan``: the same pass with the judge's execution plan (batches side by side, the
    thread budget split between them, as ``score_models`` runs them): like for like, so
    ``judge / bare-plan - 1`` is the judge's own overhead (metric, bootstrap, model facts);
  - ``judge``: ``judge.score(candidate)``, which also opens the candidate.

* ``resnet18``: the same for torchvision resnet18 at 224 px (random weights) and a copy
  with half its weights zeroed, over ``--n224`` crops of scikit-image's sample photos.

* ``cache``: ``score_models`` with one new pruned model (and the random floor), without a
  cache, then with a cache filled by a run with another pruned model: the second run skips
  the original's and the floor's passes.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from experiments.fmnist import DatasetMissing, load_split
from sp2ps_onnx.data import Preprocessing
from sp2ps_onnx.runtime import CamModel, thread_budget
from sp2ps_onnx.scoring import (
    DataOptions,
    MetricOptions,
    RunOptions,
    Sp2PSJudge,
    open_model,
    plan_execution,
    score_models,
)

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
ORIGINAL = MODELS / "fmnist_cnn.onnx"
CANDIDATE = MODELS / "pruned" / "fmnist_cnn_mag80.onnx"
OTHER = MODELS / "pruned" / "fmnist_cnn_mag50.onnx"
BATCH = 32


def test_images(n: int) -> tuple[np.ndarray, np.ndarray, str]:
    try:
        x, y = load_split("test")
        where = "Fashion-MNIST test set"
    except DatasetMissing:
        with np.load(MODELS / "samples" / "fmnist_test.npz") as archive:
            x, y = archive["x"], archive["y"]
        where = "bundled samples"
    return x[:n], y[:n], where


def bare(candidate: Path, x: np.ndarray, y: np.ndarray | None, preset: str) -> float:
    started = time.perf_counter()
    model = CamModel(str(candidate))
    prep = Preprocessing.for_model(model, preset)
    inputs = prep(x)
    size = (prep.height, prep.width)
    for i in range(0, len(inputs), BATCH):
        model.cams(inputs[i:i + BATCH], targets=None if y is None else y[i:i + BATCH],
                   size=size, return_scores=True)
    return time.perf_counter() - started


def bare_plan(candidate: Path, x: np.ndarray, y: np.ndarray | None, preset: str) -> float:
    started = time.perf_counter()
    plan = plan_execution(["CPUExecutionProvider"])
    model = open_model(str(candidate), providers=["CPUExecutionProvider"], batch_size=BATCH,
                       threads=plan.session_threads, spinning=plan.session_spinning)
    prep = Preprocessing.for_model(model, preset)

    def one(i: int) -> None:
        model.cams(prep(x[i:i + BATCH]), targets=None if y is None else y[i:i + BATCH],
                   size=(prep.height, prep.width), return_scores=True)

    with ThreadPoolExecutor(plan.in_flight) as pool:
        list(pool.map(one, range(0, len(x), BATCH)))
    return time.perf_counter() - started


def bench_judge(original: Path, candidate: Path, data: Path, x: np.ndarray,
                y: np.ndarray | None, repeats: int, preset: str = "unit") -> None:
    options = {"data_options": DataOptions(preset=preset), "metric": MetricOptions(),
               "run": RunOptions(batch_size=BATCH, device="cpu")}
    started = time.perf_counter()
    judge = Sp2PSJudge(original, data, **options)
    setup = time.perf_counter() - started
    times: dict[str, list[float]] = {"bare": [], "bare-plan": [], "judge": []}
    for _ in range(repeats):
        times["bare"].append(bare(candidate, x, y, preset))
        times["bare-plan"].append(bare_plan(candidate, x, y, preset))
        started = time.perf_counter()
        judge.score(candidate)
        times["judge"].append(time.perf_counter() - started)
    best = {k: min(v) for k, v in times.items()}
    print(f"{candidate.name}: judge setup (original + floor, once): {setup:.2f} s")
    for name, values in times.items():
        print(f"{name:10s} best {best[name]:.3f} s   all {', '.join(f'{v:.3f}' for v in values)}")
    print(f"judge / bare      = {best['judge'] / best['bare']:.3f}")
    print(f"judge / bare-plan = {best['judge'] / best['bare-plan']:.3f}")


def resnet18_case(folder: Path, n: int) -> tuple[Path, Path, Path, np.ndarray]:
    """torchvision resnet18 (random weights, seed 0) and a copy with the 50 % smallest
    Conv/Linear weights zeroed, as ONNX; ``n`` random 224 px crops of scikit-image's sample
    photos (uint8, no labels: the CAMs explain the original's top-1 class)."""
    import skimage.data
    import torch
    import torchvision

    from experiments import artifacts
    from experiments.prune import torch_finalize, torch_magnitude

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    shape = (1, 3, 224, 224)
    original = artifacts.export_torch(model, folder / "resnet18.onnx", shape)
    candidate = artifacts.export_torch(torch_finalize(torch_magnitude(model, 50)),
                                       folder / "resnet18_mag50.onnx", shape)
    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(),
              skimage.data.rocket()]
    rng = np.random.default_rng(0)
    crops = []
    for i in range(n):
        photo = photos[i % len(photos)]
        top = int(rng.integers(0, photo.shape[0] - 224 + 1))
        left = int(rng.integers(0, photo.shape[1] - 224 + 1))
        crops.append(photo[top:top + 224, left:left + 224])
    x = np.stack(crops)
    data = folder / "crops.npz"
    np.savez(data, x=x)
    return original, candidate, data, x


def bench_cache(data: Path, repeats: int) -> None:
    options = {"data_options": DataOptions(preset="unit"), "metric": MetricOptions(),
               "run": RunOptions(batch_size=BATCH, device="cpu")}
    times: dict[str, list[float]] = {"no cache": [], "warm cache": []}
    with tempfile.TemporaryDirectory() as cache:
        cached = {**options, "run": RunOptions(batch_size=BATCH, device="cpu", cache=cache)}
        started = time.perf_counter()
        score_models(ORIGINAL, [OTHER], data, **cached)
        cold = time.perf_counter() - started
        for _ in range(repeats):
            started = time.perf_counter()
            plain = score_models(ORIGINAL, [CANDIDATE], data, **options)
            times["no cache"].append(time.perf_counter() - started)
            started = time.perf_counter()
            warm = score_models(ORIGINAL, [CANDIDATE], data, **cached)
            times["warm cache"].append(time.perf_counter() - started)
        assert warm.models[0].result.to_dict() == plain.models[0].result.to_dict()
    print(f"cold cache run (another pruned model, fills the cache): {cold:.2f} s; "
          f"warm run: {warm.config['cache']}")
    best = {k: min(v) for k, v in times.items()}
    for name, values in times.items():
        print(f"{name:10s} best {best[name]:.3f} s   all {', '.join(f'{v:.3f}' for v in values)}")
    print(f"warm / no cache = {best['warm cache'] / best['no cache']:.3f} (identical numbers)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--part", default="judge,cache",
                        help="judge, cache, resnet18 (224 px, --n224 images)")
    parser.add_argument("--n224", type=int, default=64)
    args = parser.parse_args()
    x, y, where = test_images(args.n)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, thread "
          f"budget {thread_budget()}; {len(x)} images of the {where}, batch {BATCH}")
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "test.npz"
        np.savez(data, x=x, y=y)
        if "judge" in args.part:
            bench_judge(ORIGINAL, CANDIDATE, data, x, y, args.repeats)
        if "cache" in args.part:
            bench_cache(data, args.repeats)
        if "resnet18" in args.part:
            original, candidate, crops, images = resnet18_case(Path(folder), args.n224)
            bench_judge(original, candidate, crops, images, None, args.repeats, "imagenet")


if __name__ == "__main__":
    main()
