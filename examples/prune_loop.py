"""Iterative Torch-Pruning of the bundled CNN, stopped by Sp2PS.

Run from the repository root: .venv/bin/python -m examples.prune_loop [--n 1000]
[--steps 8] [--max-rate 0.8] [--floor 0.85] [--finetune 0.1] [--out prune-loop]

The loop (docs/compression_loops.md):

1. load the bundled original (``models/fmnist_cnn.onnx``) into PyTorch, from its own
   weights (its BatchNorms are folded into the convolutions);
2. make one :class:`~sp2ps_onnx.scoring.Sp2PSJudge` over ``--n`` Fashion-MNIST test images:
   the original and its random floor run once;
3. prune with Torch-Pruning's ``MetaPruner`` (L1 filter importance, the head kept) in
   ``--steps`` steps up to ``--max-rate`` of every conv's channels, optionally fine-tune
   each step for ``--finetune`` epochs, export the model to ONNX bytes in memory and
   ``judge.score`` them;
4. stop at the first step whose Sp2PS falls below ``--floor``: the kept model is the
   previous one, the largest rate whose attention still matches the original's.

Writes ``curve.json`` (rate, parameters, Sp2PS and its CI, accuracy, top-1 agreement per
step), ``curve.png`` (accuracy and Sp2PS against rate, the floor and the stop) and
``kept.onnx``.
"""

from __future__ import annotations

import argparse
import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from examples.data import ORIGINAL, split
from sp2ps_onnx.scoring import DataOptions, MetricOptions, RunOptions, Sp2PSJudge

POOL_AFTER = (1, 3)  # max-pooling follows the 2nd and 4th conv (models/build.py)


def bundled_cnn(path: Path = ORIGINAL) -> Any:
    """The bundled CNN as a PyTorch module with the ONNX file's weights: convolutions (the
    BatchNorms folded in, so with biases) and ReLUs, two max-pools, global average pooling
    and a linear head, as ``models/build.py`` builds it."""
    import torch
    from onnx import numpy_helper
    from torch import nn

    proto = onnx.load(str(path))
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    convs = [node for node in proto.graph.node if node.op_type == "Conv"]
    (gemm,) = [node for node in proto.graph.node if node.op_type == "Gemm"]

    class FoldedCnn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.convs = nn.ModuleList()
            for node in convs:
                kernel = weights[node.input[1]]
                conv = nn.Conv2d(kernel.shape[1], kernel.shape[0], 3, padding=1)
                conv.weight.data = torch.from_numpy(kernel.copy())
                conv.bias.data = torch.from_numpy(weights[node.input[2]].copy())
                self.convs.append(conv)
            self.pool = nn.MaxPool2d(2)
            head = weights[gemm.input[1]]
            self.head = nn.Linear(head.shape[1], head.shape[0])
            self.head.weight.data = torch.from_numpy(head.copy())
            self.head.bias.data = torch.from_numpy(weights[gemm.input[2]].copy())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for index, conv in enumerate(self.convs):
                x = torch.relu(conv(x))
                if index in POOL_AFTER:
                    x = self.pool(x)
            return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    return FoldedCnn().eval()


def onnx_bytes(model: Any) -> bytes:
    """``model`` exported to ONNX in memory (input ``input``, output ``logits``)."""
    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(1, 1, 28, 28),), buffer, dynamo=False,
                          opset_version=17, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return buffer.getvalue()


def finetune(model: Any, x: np.ndarray, y: np.ndarray, epochs: float, seed: int) -> None:
    from experiments.train import train_torch

    train_torch(model, x, y, epochs, 5e-4, seed, 128, log=lambda message: None)


def prune_loop(judge: Sp2PSJudge, steps: int, max_rate: float, floor: float,
               finetune_epochs: float = 0.0, train: tuple[np.ndarray, np.ndarray] | None = None,
               seed: int = 0) -> dict[str, Any]:
    """Prune step by step until Sp2PS falls below ``floor``; the curve and the kept model."""
    import torch
    import torch_pruning as tp

    torch.manual_seed(seed)
    model = bundled_cnn()
    pruner = tp.pruner.MetaPruner(
        model, torch.zeros(1, 1, 28, 28),
        importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=max_rate,
        iterative_steps=steps, ignored_layers=[model.head],
    )
    curve, kept, stopped, accuracy = [], None, False, None
    for step in range(steps + 1):
        if step:
            pruner.step()
            if finetune_epochs and train is not None:
                finetune(model, *train, finetune_epochs, seed + step)
        exported = onnx_bytes(model)
        score = judge.score(exported)
        low, high = score.result.ci95 or (None, None)
        point = {
            "step": step, "rate": max_rate * step / steps,
            "parameters": score.info.parameters, "sp2ps": score.sp2ps,
            "ci95_low": low, "ci95_high": high,
            "accuracy": score.result.accuracy_pruned,
            "top1_agreement": score.result.top1_agreement,
        }
        curve.append(point)
        accuracy = score.result.accuracy_original
        if score.sp2ps < floor:
            stopped = True
            break
        kept = (point, exported)
    return {"floor": floor, "curve": curve, "stopped": stopped, "accuracy_original": accuracy,
            "kept": None if kept is None else kept[0],
            "kept_onnx": None if kept is None else kept[1]}


def plot(result: dict[str, Any], accuracy_original: float, path: Path) -> None:
    """Accuracy and Sp2PS against the pruning rate, with the floor and the kept rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = result["curve"]
    rate = [100 * p["rate"] for p in curve]
    figure, axis = plt.subplots(figsize=(6, 3.6), dpi=120)
    axis.plot(rate, [p["sp2ps"] for p in curve], "o-", color="C0", label="Sp2PS")
    if all(p["ci95_low"] is not None for p in curve):
        axis.fill_between(rate, [p["ci95_low"] for p in curve],
                          [p["ci95_high"] for p in curve], color="C0", alpha=0.2,
                          label="Sp2PS 95% CI")
    axis.plot(rate, [p["accuracy"] for p in curve], "s-", color="C1", label="accuracy")
    axis.axhline(accuracy_original, color="C1", ls=":", lw=1, label="original accuracy")
    axis.axhline(result["floor"], color="C3", ls="--", lw=1, label=f"floor {result['floor']:g}")
    if result["kept"] is not None:
        axis.axvline(100 * result["kept"]["rate"], color="grey", lw=1,
                     label=f"kept: {100 * result['kept']['rate']:.0f} %")
    axis.set_xlabel("channels pruned per conv (%)")
    axis.set_ylim(0, 1.02)
    axis.legend(fontsize=7, loc="lower left")
    axis.set_title("Torch-Pruning (L1 filters) of the bundled CNN", fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="evaluation images")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--max-rate", type=float, default=0.8)
    parser.add_argument("--floor", type=float, default=0.85)
    parser.add_argument("--finetune", type=float, default=0.0, help="epochs per step")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--out", default="prune-loop")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x, y = split("test", args.n)
    data = out / "eval.npz"
    np.savez(data, x=x, y=y)
    judge = Sp2PSJudge(ORIGINAL, data, data_options=DataOptions(preset="unit"),
                       metric=MetricOptions(n_bootstrap=args.bootstrap),
                       run=RunOptions(device="cpu"))
    train = split("train", 60000) if args.finetune else None
    result = prune_loop(judge, args.steps, args.max_rate, args.floor, args.finetune, train)
    if result["kept_onnx"] is not None:
        (out / "kept.onnx").write_bytes(result["kept_onnx"])
    accuracy = float(result["accuracy_original"])
    summary = {k: v for k, v in result.items() if k != "kept_onnx"}
    summary.update(n=int(len(x)), floor_random=None if not judge.references else judge.references[0].sp2ps)
    (out / "curve.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(result, accuracy, out / "curve.png")
    for p in result["curve"]:
        print(f"rate {100 * p['rate']:5.1f} %  params {p['parameters']:7d}  "
              f"Sp2PS {p['sp2ps']:.3f}  accuracy {p['accuracy']:.3f}")
    kept = result["kept"]
    print("kept: none" if kept is None else f"kept: rate {100 * kept['rate']:.1f} % "
          f"(Sp2PS {kept['sp2ps']:.3f} >= {args.floor}); wrote {out}/")
    return summary


if __name__ == "__main__":
    main()
