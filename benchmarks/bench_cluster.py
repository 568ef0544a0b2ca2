"""A simulated Ray cluster at scale: N images x 10 pruned models on a 3-node
``ray.cluster_utils.Cluster`` on this machine, next to the local backend.

Run from the repository root:
    .venv/bin/python -m benchmarks.bench_cluster --n 50000 [--backend ray|local|both]

The models are small (``tests.tiny_models.cnn`` at 16x16, 4 classes; the pruned ones are
its weights cut by magnitude at 5 %, 13 %, ... 77 %) so that 50k images fit in minutes
on a laptop-class machine: the point is the driver's memory, the rows arriving exactly
once, and where the time goes, not the models' speed. Each run is a fresh subprocess
(the driver's peak RSS is its own VmHWM). Prints one JSON line per run:

- ``seconds``: the whole ``score_models`` call (cluster start excluded; actor start
  included);
- ``first_batch_s``: until the first batch's rows reached the driver (for Ray: the actors'
  start, each opening the 11 models);
- ``streaming_s``: from the first to the last batch;
- ``aggregate_s``: after the last batch (aggregation, bootstrap, report objects);
- ``driver_peak_rss_mb`` (VmHWM); ``driver_rss_at_peak_mb``: the highest RSS sampled
  every 0.1 s, split into anonymous, file-backed and shared memory; ``rows_mb``: the per-sample rows the report keeps (on disk,
  memory-mapped: see ``RowSpill``);
- ``exactly_once``: every model has each sample index once;
- ``sp2ps``: per model, to compare the backends.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from benchmarks.bench_score import ROOT, peak_rss

SIZE = 16


class RssSampler:
    """The driver's RSS split at its highest sample (every 0.1 s, in a thread): anonymous
    memory, mapped files (the data, the spilled rows) and shared memory (Ray's object
    store, where the workers' outputs arrive)."""

    def __init__(self) -> None:
        self.peak: dict[str, int] = {"VmRSS": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with open("/proc/self/status") as status:
                now = {key: int(value.split()[0]) * 1024 for key, value in
                       (line.split(":", 1) for line in status)
                       if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem")}
            if now.get("VmRSS", 0) > self.peak["VmRSS"]:
                self.peak = now
            self._stop.wait(0.1)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {key: round(value / 2**20, 1) for key, value in self.peak.items()}

RATES = [0.05 + 0.08 * k for k in range(10)]


def make_files(root: Path, n: int) -> tuple[Path, list[Path], Path]:
    """The original, its 10 magnitude-pruned versions and n random 16x16 images (.npz,
    uncompressed, so memory-mapped) with labels."""
    sys.path.insert(0, str(ROOT))
    from tests.tiny_models import cnn

    original = cnn(SIZE)
    onnx.save(original, root / "original.onnx")
    pruned = []
    for k, rate in enumerate(RATES):
        model = onnx.ModelProto()
        model.CopyFrom(original)
        for tensor in model.graph.initializer:
            weights = numpy_helper.to_array(tensor).copy()
            if weights.ndim > 1:
                weights[np.abs(weights) < np.quantile(np.abs(weights), rate)] = 0
                tensor.CopyFrom(numpy_helper.from_array(weights, tensor.name))
        onnx.save(model, root / f"pruned{k}.onnx")
        pruned.append(root / f"pruned{k}.onnx")
    rng = np.random.default_rng(0)
    data = root / f"images{n}.npz"
    np.savez(data, x=rng.integers(0, 256, (n, SIZE, SIZE), dtype=np.uint8),
             y=rng.integers(0, 4, n))
    return root / "original.onnx", pruned, data


def child(backend: str, root: Path, n: int, nodes: int, batch_size: int) -> None:
    from sp2ps_onnx.scoring import (
        DataOptions,
        MetricOptions,
        RayOptions,
        ReferenceOptions,
        RunOptions,
        score_models,
    )

    original, pruned, data = make_files(root, n)
    ray_options = cluster = None
    if backend == "ray":
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray_options = RayOptions(address=cluster.address, workers=nodes)
    arrivals: list[float] = []
    sampler = RssSampler()
    started = time.perf_counter()
    report = score_models(
        original, pruned, data, data_options=DataOptions(preset="unit"),
        metric=MetricOptions(n_bootstrap=200, examples=2),
        run=RunOptions(batch_size=batch_size, device="cpu", ray=ray_options,
                       progress=lambda done, total: arrivals.append(time.perf_counter())),
        references=ReferenceOptions(floor=False),
    )
    ended = time.perf_counter()
    peak = peak_rss()  # before the checks below read the report's memory-mapped rows
    split = sampler.stop()
    once = all(np.array_equal(np.sort(m.rows.columns["index"]), np.arange(n))
               for m in report.models)
    print(json.dumps({
        "backend": backend, "nodes": nodes if backend == "ray" else 1, "images": n,
        "models": len(pruned), "batch_size": batch_size,
        "seconds": round(ended - started, 2),
        "images_per_s": round(n / (ended - started), 1),
        "first_batch_s": round(arrivals[0] - started, 2),
        "streaming_s": round(arrivals[-1] - arrivals[0], 2),
        "aggregate_s": round(ended - arrivals[-1], 2),
        "driver_peak_rss_mb": round(peak / 2**20, 1),
        "driver_rss_at_peak_mb": split,
        "exactly_once": once, "rows": sum(len(m.rows) for m in report.models),
        "rows_mb": round(sum(a.nbytes for m in report.models
                             for a in m.rows.columns.values()) / 2**20, 1),
        "sp2ps": [m.sp2ps for m in report.models],
    }), flush=True)
    if cluster is not None:
        import ray

        ray.shutdown()
        cluster.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", default="50000", help="image counts, comma-separated")
    parser.add_argument("--backend", choices=["ray", "local", "both"], default="both")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--child", nargs=2, metavar=("BACKEND", "ROOT"))
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), int(args.n), args.nodes, args.batch_size)
        return
    backends = ["local", "ray"] if args.backend == "both" else [args.backend]
    with tempfile.TemporaryDirectory(prefix="sp2ps-bench-cluster-") as tmp:
        for n in args.n.split(","):
            for backend in backends:
                result = subprocess.run(
                    [sys.executable, "-m", "benchmarks.bench_cluster", "--child", backend, tmp,
                     "--n", n, "--nodes", str(args.nodes), "--batch-size",
                     str(args.batch_size)],
                    check=True, capture_output=True, text=True, cwd=ROOT)
                print(result.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
