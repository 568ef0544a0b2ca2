"""An ONNX Runtime static-quantization sweep of the bundled CNN, ranked by Sp2PS.

Run from the repository root: .venv/bin/python -m examples.quantize_sweep [--n 1000]
[--calibration 16,128,1024] [--out quantize-sweep]

Every combination of weight granularity (per channel, per tensor), format (QDQ, QOperator)
and calibration size (images of the Fashion-MNIST training split, MinMax) is quantized with
``onnxruntime.quantization.quantize_static`` (uint8 activations, int8 weights) and scored by
one :class:`~sp2ps_onnx.scoring.Sp2PSJudge` over ``--n`` test images, so that the original
runs once. Writes ``ranking.json`` and prints the ranking as a Markdown table
(docs/compression_loops.md).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from examples.data import ORIGINAL, model_input, split
from experiments.artifacts import calibration_reader
from sp2ps_onnx.scoring import DataOptions, MetricOptions, RunOptions, Sp2PSJudge

FORMATS = ("qdq", "qoperator")
GRANULARITIES = ("per-channel", "per-tensor")


def quantize(target: Path, form: str, granularity: str, calibration: np.ndarray) -> Path:
    """The bundled CNN statically quantized, calibrated on ``calibration`` (model inputs) in
    batches of up to 64."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    batches = np.array_split(calibration, max(1, len(calibration) // 64))
    logging.getLogger().setLevel(logging.ERROR)  # ORT's advice on pre-processing
    quantize_static(str(ORIGINAL), str(target), calibration_reader("input", batches),
                    quant_format=QuantFormat.QDQ if form == "qdq" else QuantFormat.QOperator,
                    per_channel=granularity == "per-channel",
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return target


def sweep(judge: Sp2PSJudge, calibration_sizes: list[int], folder: Path,
          formats: tuple[str, ...] = FORMATS,
          granularities: tuple[str, ...] = GRANULARITIES) -> list[dict[str, Any]]:
    """Quantize every combination into ``folder`` and score it; the rows, best Sp2PS first."""
    images, _ = split("train", max(calibration_sizes))
    calibration = model_input(images)
    rows = []
    for form, granularity, size in itertools.product(formats, granularities, calibration_sizes):
        path = quantize(folder / f"fmnist_cnn_{form}_{granularity}_cal{size}.onnx", form,
                        granularity, calibration[:size])
        score = judge.score(path)
        low, high = score.result.ci95 or (None, None)
        rows.append({
            "model": path.name, "format": form, "granularity": granularity,
            "calibration": size, "sp2ps": score.sp2ps, "ci95_low": low, "ci95_high": high,
            "accuracy": score.result.accuracy_pruned,
            "top1_agreement": score.result.top1_agreement,
            "js_divergence": score.result.mean_js_divergence,
            "file_size": score.info.file_size, "path": str(path),
        })
    return sorted(rows, key=lambda row: -row["sp2ps"])


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| rank | format | weights | calibration | Sp2PS | 95% CI | accuracy | top-1 agree |"
             " size |", "|---|---|---|---|---|---|---|---|---|"]
    for rank, row in enumerate(rows, 1):
        ci = "–" if row["ci95_low"] is None else f"[{row['ci95_low']:.4f}, {row['ci95_high']:.4f}]"
        lines.append(
            f"| {rank} | {row['format']} | {row['granularity']} | {row['calibration']} | "
            f"{row['sp2ps']:.4f} | {ci} | {100 * row['accuracy']:.1f} % | "
            f"{100 * row['top1_agreement']:.1f} % | {row['file_size'] / 1024:.0f} KB |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="evaluation images")
    parser.add_argument("--calibration", default="16,128,1024",
                        help="calibration sizes (training images), comma-separated")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--out", default="quantize-sweep")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x, y = split("test", args.n)
    sizes = [int(v) for v in args.calibration.split(",")]
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "eval.npz"
        np.savez(data, x=x, y=y)
        judge = Sp2PSJudge(ORIGINAL, data, data_options=DataOptions(preset="unit"),
                           metric=MetricOptions(n_bootstrap=args.bootstrap),
                           run=RunOptions(device="cpu"))
        rows = sweep(judge, sizes, out)
    (out / "ranking.json").write_text(json.dumps({"n": int(len(x)), "models": rows},
                                                 indent=2) + "\n")
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
