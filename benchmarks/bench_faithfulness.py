"""Cost and values of the faithfulness metrics on the bundled Fashion-MNIST models.

Run: .venv/bin/python benchmarks/bench_faithfulness.py [--samples 128] [--repeats 3]

Each model's Grad-CAMs for the labelled class are computed once with the engine (not timed).
Then, with one ONNX Runtime session per model (one intra-op thread, batches of 32, the
plain ONNX file, no CAM rewrite), the bench times

* **plain**: one forward pass over the samples (the unit of the ratios),
* **deletion + insertion**: K = 16 steps each, sharing the unperturbed pass (2K + 1 = 33
  passes per image),
* each other metric alone, and :func:`evaluate_faithfulness` with its defaults (all of them).

Times are the best of ``repeats`` runs (10 x as many for the two single passes) of process
CPU time (other processes on a shared machine disturb it much less than wall time). With ``--models`` it also prints the mean of
every figure for the original and the pruned models (for docs/metric.md).
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from sp2ps_onnx import faithfulness as fa
from sp2ps_onnx.runtime import CamModel

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "original": ROOT / "models/fmnist_cnn.onnx",
    **{
        name: ROOT / f"models/pruned/fmnist_cnn_{name}.onnx"
        for name in ("mag50", "mag80", "mag95", "l1filter25", "l1filter50")
    },
}


def score_function(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def score_fn(images: np.ndarray) -> np.ndarray:
        return session.run(None, {name: images.astype(np.float32, copy=False)})[0]

    return score_fn


def best_cpu_seconds(repeats: int, function: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        function()
        best = min(best, time.process_time() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--models", action="store_true", help="figures of every bundled model")
    args = parser.parse_args()

    data = np.load(ROOT / "models/samples/fmnist_test.npz")
    images = (data["x"][: args.samples, None] / 255).astype(np.float32)
    labels = data["y"][: args.samples].astype(np.int64)
    batch = args.batch
    print(f"{platform.processor() or platform.machine()}, {len(images)} samples, batch {batch}")

    cam_model = CamModel(MODELS["original"], providers=["CPUExecutionProvider"], threads=1)
    cams, _ = cam_model.cams(images, targets=labels)[:2]
    score_fn = score_function(MODELS["original"])

    def plain() -> None:
        for start in range(0, len(images), batch):
            score_fn(images[start : start + batch])

    base = best_cpu_seconds(10 * args.repeats, plain)  # short: more runs for a stable best
    per_image = base / len(images)
    print(f"plain inference: {1e6 * per_image:8.1f} us/image")
    options = fa.FaithfulnessOptions(batch_size=batch)
    original = fa.class_scores(images, labels, score_fn, options)
    cases = {
        "deletion + insertion (K=16)": lambda: (
            fa.deletion(images, cams, labels, score_fn, options, original_scores=original),
            fa.insertion(images, cams, labels, score_fn, options, original_scores=original),
        ),
        "deletion alone (K=16)": lambda: fa.deletion(images, cams, labels, score_fn, options),
        "CAM x image change": lambda: fa.cam_mult_image_confidence_change(
            images, cams, labels, score_fn, options
        ),
        "ROAD MoRF, p=80": lambda: fa.road_most_relevant_first(
            images, cams, labels, score_fn, options
        ),
        "ROAD MoRF 80 + LeRF 20 (shared)": lambda: (
            fa.road_most_relevant_first(
                images, cams, labels, score_fn, options, original_scores=original
            ),
            fa.road_least_relevant_first(
                images, cams, labels, score_fn, options, original_scores=original
            ),
        ),
        "ROAD combined, 9 percentiles": lambda: fa.road_combined(
            images, cams, labels, score_fn, options
        ),
        "evaluate_faithfulness (all)": lambda: fa.evaluate_faithfulness(
            images, cams, labels, score_fn, options
        ),
    }
    print(f"{'metric':32s} {'us/image':>10s} {'x plain':>8s}")
    for name, run in cases.items():
        seconds = best_cpu_seconds(args.repeats, run) / len(images)
        print(f"{name:32s} {1e6 * seconds:10.1f} {seconds / per_image:8.1f}")
    cam_seconds = best_cpu_seconds(
        10 * args.repeats, lambda: cam_model.cams(images, targets=labels)
    ) / len(images)
    print(
        f"{'(Grad-CAM pass, for scale)':32s} {1e6 * cam_seconds:10.1f} {cam_seconds / per_image:8.1f}"
    )

    if not args.models:
        return
    print("\nmeans over the samples (targets: labels; class score: softmax probability)")
    header = ("model", "score", "deletion", "insertion", "cam_mult", "morf", "lerf", "combined")
    print(" ".join(f"{h:>10s}" for h in header))
    for name, path in MODELS.items():
        model = CamModel(path, providers=["CPUExecutionProvider"], threads=1)
        maps, _ = model.cams(images, targets=labels)[:2]
        result = fa.evaluate_faithfulness(
            images, maps, labels, score_function(path), fa.FaithfulnessOptions(batch_size=batch)
        )
        means = result.means()
        values = [means[k] for k in (
            "original_score", "deletion_auc", "insertion_auc", "cam_mult_change", "road_morf",
            "road_lerf", "road_combined",
        )]  # fmt: skip
        undefined = int(np.isnan(result.road_morf).sum())
        print(f"{name:>10s} " + " ".join(f"{v:10.3f}" for v in values), f"(ROAD NaN: {undefined})")
        rng = np.random.default_rng(0)
        random_maps = rng.random(maps.shape).astype(np.float32)
        if name == "original":
            shuffled = fa.evaluate_faithfulness(
                images, random_maps, labels, score_function(path),
                fa.FaithfulnessOptions(batch_size=batch),
            ).means()  # fmt: skip
            values = [shuffled[k] for k in (
                "original_score", "deletion_auc", "insertion_auc", "cam_mult_change",
                "road_morf", "road_lerf", "road_combined",
            )]  # fmt: skip
            print(f"{'random map':>10s} " + " ".join(f"{v:10.3f}" for v in values))


if __name__ == "__main__":
    main()
