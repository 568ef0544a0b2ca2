"""What the report costs next to the scoring it reports on.

Run from the repository root: .venv/bin/python -m benchmarks.bench_report [--repeats 3]

Scores the bundled Fashion-MNIST original against its five pruned versions on the 300
bundled test images (``score_models``, Grad-CAM, the README's job), then times
``write_report`` (results.json, per_sample.csv, the jinja2 page and the matplotlib figures)
with PNG+SVG figures and with PNG+SVG+PDF, and the notebook view (``_repr_html_``), each
best of ``repeats``. Prints the times, their ratio to the scoring time measured in the same
run, and the sizes of report.html and figures/.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

from sp2ps_onnx.report import write_report
from sp2ps_onnx.scoring import DataOptions, RunOptions, score_models

MODELS = Path(__file__).resolve().parent.parent / "models"


def best_of(repeats: int, function) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    pruned = sorted((MODELS / "pruned").glob("*.onnx"))
    started = time.perf_counter()
    report = score_models(
        MODELS / "fmnist_cnn.onnx",
        pruned,
        MODELS / "samples" / "fmnist_test.npz",
        data_options=DataOptions(preset="unit", classes=str(MODELS / "samples" / "classes.txt")),
        run=RunOptions(device="cpu"),
    )
    scoring = time.perf_counter() - started
    root = Path(tempfile.mkdtemp(prefix="sp2ps-bench-report-"))
    try:
        def write(formats: tuple[str, ...]) -> None:
            target = root / "-".join(formats)
            shutil.rmtree(target, ignore_errors=True)
            write_report(report, target, formats=formats)

        png_svg = best_of(args.repeats, lambda: write(("png", "svg")))
        with_pdf = best_of(args.repeats, lambda: write(("png", "svg", "pdf")))
        notebook = best_of(args.repeats, report._repr_html_)
        page = (root / "png-svg" / "report.html").stat().st_size
        figures = sum(p.stat().st_size for p in (root / "png-svg" / "figures").iterdir())
        count = len(list((root / "png-svg" / "figures").iterdir()))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")
    print(f"scoring (5 pruned models, {report.n} images, bootstrap 1000): {scoring:6.2f} s")
    print(f"write_report, PNG+SVG figures:     {png_svg:6.2f} s  ({png_svg / scoring:.2f} x scoring)")
    print(f"write_report, PNG+SVG+PDF figures: {with_pdf:6.2f} s  ({with_pdf / scoring:.2f} x scoring)")
    print(f"notebook view (_repr_html_):       {notebook:6.2f} s")
    print(f"report.html {page / 1024:.0f} KiB; figures/ {count} files, {figures / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
