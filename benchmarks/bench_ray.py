"""Throughput of the Ray backend with 1 and 2 workers, and the driver's peak memory against
the dataset size.

Run from the repository root: .venv/bin/python -m benchmarks.bench_ray [--n 2000]
[--sizes 1000,4000]

Scores the bundled Fashion-MNIST original against its five pruned models on the Debian
``dataset-fashion-mnist`` test set (an .npy, memory-mapped) on a local Ray started here
with 2 CPUs. Throughput is images per second of the whole run (actor start included, once
per run) for ``--workers 1`` and ``--workers 2``, next to the local backend in the same
process. The driver's peak RSS is measured in a fresh subprocess per dataset size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_score import MODELS, ROOT, fmnist_test, peak_rss
from sp2ps_onnx.scoring import CamOptions, DataOptions, RayOptions, RunOptions, score_models

PRUNED = sorted((MODELS / "pruned").glob("*.onnx"))


def run(data: Path, n: int, ray: RayOptions | None = None) -> float:
    started = time.perf_counter()
    score_models(MODELS / "fmnist_cnn.onnx", PRUNED, data, cam=CamOptions(target="original"),
                 data_options=DataOptions(preset="unit", limit=n),
                 run=RunOptions(batch_size=64, device="cpu", ray=ray))
    return time.perf_counter() - started


def driver_child(data: Path, n: int) -> None:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    run(data, n, RayOptions(workers=2))
    print(peak_rss())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--sizes", default="1000,4000")
    parser.add_argument("--driver-child", nargs=2)
    args = parser.parse_args()
    if args.driver_child:
        driver_child(Path(args.driver_child[0]), int(args.driver_child[1]))
        return
    import ray

    with tempfile.TemporaryDirectory(prefix="sp2ps-bench-ray-") as tmp:
        data = Path(tmp) / "fmnist.npy"
        np.save(data, fmnist_test()[0])
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        local = run(data, args.n)
        rows = {"images": args.n, "local_img_s": args.n / local}
        for workers in (1, 2):
            rows[f"ray{workers}_img_s"] = args.n / run(data, args.n, RayOptions(workers=workers))
        print(json.dumps(rows), flush=True)
        ray.shutdown()
        for n in map(int, args.sizes.split(",")):
            peak = subprocess.run([sys.executable, "-m", "benchmarks.bench_ray", "--driver-child",
                                   str(data), str(n)], check=True, capture_output=True, text=True,
                                  cwd=ROOT).stdout.split()[-1]
            print(json.dumps({"images": n, "driver_peak_rss_mb": int(peak) / 2**20}), flush=True)


if __name__ == "__main__":
    main()
