"""Rebuild every bundled model, the labelled test sample and metrics.json from scratch.

Run from the repository root with the project's build environment::

    .venv/bin/python -m models.build          # full build (~12 min on 2 idle cores)
    .venv/bin/python -m models.build --quick  # smoke run on a small subset

The data reader, the training loop, the exporters and global magnitude pruning are the
study's (:mod:`experiments.fmnist`, :mod:`experiments.train`, :mod:`experiments.artifacts`,
:mod:`experiments.prune`); the weight counts are :mod:`sp2ps_onnx.graph`'s. What stays here
is what only the bundled models have: their architecture, L1 filter pruning by rebuilding a
narrower net, their recipe (seeds, epochs, flips) and metrics.json.

Requirements (build-only; none of them is a runtime dependency of ``sp2ps_onnx``):

* Debian package ``dataset-fashion-mnist`` (``apt-get install -y dataset-fashion-mnist``), which
  installs the original Fashion-MNIST IDX files under ``/usr/share/datasets/fashion-mnist/``
  (override the folder with the environment variable ``FMNIST_DIR``).
* Python packages: numpy, torch (CPU), onnx, onnxruntime, tensorflow-cpu (Keras 3), tf2onnx,
  imageio (comes with scikit-image) -- all in the project's ``test`` extra.

Outputs (all under ``models/``): ``fmnist_cnn.onnx``, ``pruned/*.onnx``, ``keras/*.onnx``,
``samples/`` (npz + PNG ImageFolder + classes.txt), ``metrics.json``. ``README.md`` (the model
card) is written by hand from ``metrics.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from experiments import artifacts, fmnist, prune
from experiments.train import apply_masks, compile_adam_cosine, mask_keeper, train_torch
from sp2ps_onnx.graph import parameter_count, weight_statistics

MODELS_DIR = Path(__file__).resolve().parent
DEBIAN_PACKAGE = "dataset-fashion-mnist"
SEED = 20231127
OPSET = 17
NUM_THREADS = 2

# Label order of Fashion-MNIST, made filesystem-safe ("T-shirt/top" -> "T-shirt_top").
CLASS_NAMES = fmnist.FOLDER_NAMES

# Conv widths of the reference CNN; max-pooling follows the 2nd and 4th conv (28 -> 14 -> 7).
WIDTHS = (32, 32, 64, 64, 128)
POOL_AFTER = (1, 3)

TORCH_EPOCHS = 4
KERAS_EPOCHS = 3
FINETUNE_EPOCHS = 1
BATCH_SIZE = 128
LEARNING_RATE = 2e-3
FINETUNE_LEARNING_RATE = 5e-4
MAGNITUDE_AMOUNTS = {50: True, 80: True, 95: False}  # amount % -> fine-tune afterwards?
FILTER_AMOUNTS = (25, 50)
KERAS_MAGNITUDE_AMOUNT = 70
SAMPLES_PER_CLASS = 30
PNG_SAMPLES = 100


def log(message: str) -> None:
    print(f"[build {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def load_fashion_mnist() -> dict[str, np.ndarray]:
    """Uint8 images (N,28,28) and int64 labels (N,) of the train and test splits."""
    try:
        return fmnist.load()
    except (fmnist.DatasetMissing, FileNotFoundError) as exc:
        raise SystemExit(f"{exc}\nInstall the Debian package that provides it: "
                         f"sudo apt-get install -y {DEBIAN_PACKAGE}") from exc


def stratified_sample(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of `per_class` items of every class, then shuffled so any prefix mixes classes."""
    rng = np.random.default_rng(seed)
    chosen = [
        rng.choice(np.flatnonzero(labels == label), size=per_class, replace=False)
        for label in range(len(CLASS_NAMES))
    ]
    indices = np.concatenate(chosen)
    rng.shuffle(indices)
    return indices


def write_samples(data: dict[str, np.ndarray], out_dir: Path) -> None:
    import imageio.v3 as iio

    indices = stratified_sample(data["y_test"], SAMPLES_PER_CLASS, SEED)
    images = data["x_test"][indices]
    labels = data["y_test"][indices]
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_dir / "fmnist_test.npz", x=images, y=labels)
    (out_dir / "classes.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    png_root = out_dir / "fmnist_png"
    for position in range(PNG_SAMPLES):
        class_dir = png_root / CLASS_NAMES[int(labels[position])]
        class_dir.mkdir(parents=True, exist_ok=True)
        iio.imwrite(class_dir / f"{position:03d}.png", images[position])
    log(f"samples: {len(indices)} test images (+{PNG_SAMPLES} PNG) -> {out_dir}")


# --------------------------------------------------------------------------------------------
# PyTorch CNN, training, pruning, export
# --------------------------------------------------------------------------------------------


def build_torch_model(widths: tuple[int, ...]):
    import torch
    from torch import nn

    class FashionCnn(nn.Module):
        """Conv-BN-ReLU stack with two max-pools, global average pooling and a linear head."""

        def __init__(self, widths: tuple[int, ...]) -> None:
            super().__init__()
            self.widths = tuple(widths)
            self.convs = nn.ModuleList()
            self.norms = nn.ModuleList()
            in_channels = 1
            for width in self.widths:
                self.convs.append(nn.Conv2d(in_channels, width, 3, padding=1, bias=False))
                self.norms.append(nn.BatchNorm2d(width))
                in_channels = width
            self.pool = nn.MaxPool2d(2)
            self.head = nn.Linear(in_channels, len(CLASS_NAMES))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for index, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
                x = torch.relu(norm(conv(x)))
                if index in POOL_AFTER:
                    x = self.pool(x)
            x = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1)
            return self.head(x)

    return FashionCnn(widths)


def magnitude_prune(model, amount_percent: int, finetune: bool, data, epochs: int, seed: int):
    """Global L1 unstructured pruning of all conv+linear weights; masks stay during fine-tune."""
    pruned = prune.torch_magnitude(model, amount_percent)
    if finetune:
        train(pruned, data, epochs, FINETUNE_LEARNING_RATE, seed)
    return prune.torch_finalize(pruned)


def train(model, data: dict[str, np.ndarray], epochs: int, lr: float, seed: int) -> None:
    """Adam with a cosine learning-rate schedule; random horizontal flips (label-preserving)."""
    train_torch(model, data["x_train"], data["y_train"], epochs, lr, seed, BATCH_SIZE, log,
                flip=True)


def filter_prune(model, amount_percent: int, data, epochs: int, seed: int):
    """Remove the lowest-L1 `amount_percent` of every conv's filters and rebuild a smaller net."""
    import torch

    kept_per_layer = []
    for conv in model.convs:
        norms = conv.weight.detach().abs().sum(dim=(1, 2, 3))
        keep_count = conv.out_channels - int(round(conv.out_channels * amount_percent / 100.0))
        keep = torch.sort(torch.topk(norms, keep_count).indices).values
        kept_per_layer.append(keep)
    smaller = build_torch_model(tuple(len(keep) for keep in kept_per_layer))
    previous = torch.arange(1)
    with torch.no_grad():
        for old_conv, old_norm, new_conv, new_norm, keep in zip(
            model.convs, model.norms, smaller.convs, smaller.norms, kept_per_layer, strict=True
        ):
            new_conv.weight.copy_(old_conv.weight[keep][:, previous])
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(new_norm, name).copy_(getattr(old_norm, name)[keep])
            new_norm.num_batches_tracked.copy_(old_norm.num_batches_tracked)
            previous = keep
        smaller.head.weight.copy_(model.head.weight[:, previous])
        smaller.head.bias.copy_(model.head.bias)
    train(smaller, data, epochs, FINETUNE_LEARNING_RATE, seed)
    return smaller


def export_torch(model, path: Path) -> None:
    artifacts.export_torch(model, path)
    log(f"exported {path.relative_to(MODELS_DIR)}")


def build_torch_models(data: dict[str, np.ndarray], epochs: int, finetune_epochs: int) -> None:
    import torch

    torch.set_num_threads(NUM_THREADS)
    torch.manual_seed(SEED)
    model = build_torch_model(WIDTHS)
    log(f"torch: training {WIDTHS} CNN for {epochs} epochs on {len(data['x_train'])} images")
    train(model, data, epochs, LEARNING_RATE, SEED)
    export_torch(model, MODELS_DIR / "fmnist_cnn.onnx")

    for amount, finetune in MAGNITUDE_AMOUNTS.items():
        log(f"torch: global magnitude pruning {amount}% (fine-tune: {finetune})")
        pruned = magnitude_prune(model, amount, finetune, data, finetune_epochs, SEED + amount)
        export_torch(pruned, MODELS_DIR / "pruned" / f"fmnist_cnn_mag{amount}.onnx")

    for amount in FILTER_AMOUNTS:
        log(f"torch: L1 filter pruning {amount}% of every conv")
        smaller = filter_prune(model, amount, data, finetune_epochs, SEED + 1000 + amount)
        export_torch(smaller, MODELS_DIR / "pruned" / f"fmnist_cnn_l1filter{amount}.onnx")


# --------------------------------------------------------------------------------------------
# Keras (TensorFlow) CNN via tf2onnx
# --------------------------------------------------------------------------------------------


def build_keras_models(data: dict[str, np.ndarray], epochs: int, finetune_epochs: int) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(NUM_THREADS)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras
    from keras import layers

    keras.utils.set_random_seed(SEED)
    inputs = keras.Input((28, 28, 1), name="input")
    x = inputs
    for index, width in enumerate(WIDTHS):
        x = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"conv{index}")(x)
        x = layers.BatchNormalization(name=f"bn{index}")(x)
        x = layers.ReLU(name=f"relu{index}")(x)
        if index in POOL_AFTER:
            x = layers.MaxPooling2D(name=f"pool{index}")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dense(len(CLASS_NAMES), name="logits")(x)
    outputs = layers.Softmax(name="probs")(x)
    model = keras.Model(inputs, outputs, name="fmnist_keras")

    x_train = (data["x_train"].astype(np.float32) / 255.0)[..., None]
    y_train = data["y_train"]
    # Keras' own shuffling (fit(shuffle=True)), not experiments.train.train_keras's order:
    # the recipe the bundled Keras models were built with.
    compile_adam_cosine(model, LEARNING_RATE, epochs * int(np.ceil(len(x_train) / BATCH_SIZE)))
    log(f"keras: training for {epochs} epochs")
    started = time.time()
    model.fit(x_train, y_train, batch_size=BATCH_SIZE, epochs=epochs, shuffle=True, verbose=2)
    log(f"keras: trained in {time.time() - started:.0f} s")
    export_keras(model, MODELS_DIR / "keras" / "fmnist_keras.onnx")

    # Global magnitude pruning of every Conv2D/Dense kernel; masks re-applied after each batch.
    pruned, masks = prune.keras_magnitude(model, KERAS_MAGNITUDE_AMOUNT)
    if finetune_epochs > 0:
        steps = finetune_epochs * int(np.ceil(len(x_train) / BATCH_SIZE))
        compile_adam_cosine(pruned, FINETUNE_LEARNING_RATE, steps)
        log(f"keras: fine-tuning {KERAS_MAGNITUDE_AMOUNT}% magnitude-pruned copy")
        pruned.fit(x_train, y_train, batch_size=BATCH_SIZE, epochs=finetune_epochs,
                   shuffle=True, verbose=2, callbacks=[mask_keeper(masks)])
        apply_masks(masks)
    export_keras(pruned, MODELS_DIR / "keras" / f"fmnist_keras_mag{KERAS_MAGNITUDE_AMOUNT}.onnx")


def export_keras(model, path: Path) -> None:
    artifacts.export_keras(model, path, output_name="probs", batch_name="batch")
    log(f"exported {path.relative_to(MODELS_DIR)}")


def model_statistics(model_proto) -> dict[str, int]:
    """Parameters, and the weights and zero weights of Conv/Gemm/MatMul (sp2ps_onnx.graph)."""
    weights_total, weights_zero = weight_statistics(model_proto)
    return {"params": parameter_count(model_proto), "weights_total": weights_total,
            "weights_zero": weights_zero}


def evaluate(path: Path, images: np.ndarray, labels: np.ndarray) -> float:
    return artifacts.onnx_accuracy(path, images, labels, threads=NUM_THREADS)


MODEL_TABLE = (
    # relative path, framework, input layout, output kind, pruning description
    ("fmnist_cnn.onnx", "pytorch", "NCHW", "logits", "none (original)"),
    ("pruned/fmnist_cnn_mag50.onnx", "pytorch", "NCHW", "logits",
     "global L1 unstructured 50%, 1-epoch fine-tune"),
    ("pruned/fmnist_cnn_mag80.onnx", "pytorch", "NCHW", "logits",
     "global L1 unstructured 80%, 1-epoch fine-tune"),
    ("pruned/fmnist_cnn_mag95.onnx", "pytorch", "NCHW", "logits",
     "global L1 unstructured 95%, no fine-tune"),
    ("pruned/fmnist_cnn_l1filter25.onnx", "pytorch", "NCHW", "logits",
     "L1 filter pruning, 25% of every conv's filters removed, 1-epoch fine-tune"),
    ("pruned/fmnist_cnn_l1filter50.onnx", "pytorch", "NCHW", "logits",
     "L1 filter pruning, 50% of every conv's filters removed, 1-epoch fine-tune"),
    ("keras/fmnist_keras.onnx", "keras", "NHWC", "probs", "none (original)"),
    ("keras/fmnist_keras_mag70.onnx", "keras", "NHWC", "probs",
     "global magnitude 70% of Conv2D/Dense kernels, 1-epoch fine-tune with masks"),
)


def write_metrics(data: dict[str, np.ndarray]) -> dict:
    import onnx

    samples = np.load(MODELS_DIR / "samples" / "fmnist_test.npz")
    entries = {}
    for relative, framework, layout, output_kind, pruning in MODEL_TABLE:
        path = MODELS_DIR / relative
        if not path.is_file():
            log(f"metrics: {relative} missing, skipped")
            continue
        model_proto = onnx.load(str(path))
        stats = model_statistics(model_proto)
        entries[relative] = {
            "framework": framework,
            "input_layout": layout,
            "input_shape": [None, 1, 28, 28] if layout == "NCHW" else [None, 28, 28, 1],
            "input_name": model_proto.graph.input[0].name,
            "output_name": model_proto.graph.output[0].name,
            "output": output_kind,
            "preprocessing": "unit (x / 255)",
            "pruning": pruning,
            "test_accuracy": round(evaluate(path, data["x_test"], data["y_test"]), 4),
            "sample_accuracy": round(evaluate(path, samples["x"], samples["y"]), 4),
            **stats,
            "sparsity": round(stats["weights_zero"] / stats["weights_total"], 6),
            "size_bytes": path.stat().st_size,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }
        log(f"metrics: {relative}: acc {entries[relative]['test_accuracy']:.4f}, "
            f"params {stats['params']}, sparsity {entries[relative]['sparsity']:.3f}")
    metrics = {
        "dataset": {
            "name": "Fashion-MNIST",
            "source": f"Debian package {DEBIAN_PACKAGE} (original Zalando IDX files)",
            "test_images": int(len(data["y_test"])),
            "train_images": int(len(data["y_train"])),
            "classes": list(CLASS_NAMES),
        },
        "sparsity_definition": "fraction of exactly-zero elements in Conv/Gemm/MatMul "
                               "weight initializers",
        "params_definition": "number of float elements in all ONNX initializers (BatchNorm "
                             "is folded into the preceding conv by the exporters)",
        "samples": {
            "file": "samples/fmnist_test.npz",
            "count": int(len(samples["y"])),
            "per_class": SAMPLES_PER_CLASS,
            "seed": SEED,
        },
        "models": entries,
    }
    (MODELS_DIR / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 3000 training images, 1 epoch everywhere")
    parser.add_argument("--skip-keras", action="store_true", help="build the PyTorch models only")
    parser.add_argument("--skip-torch", action="store_true", help="build the Keras models only")
    parser.add_argument("--metrics-only", action="store_true",
                        help="only rewrite samples/ and metrics.json from existing ONNX files")
    args = parser.parse_args(argv)

    started = time.time()
    data = load_fashion_mnist()
    log(f"data: train {data['x_train'].shape}, test {data['x_test'].shape}")
    write_samples(data, MODELS_DIR / "samples")
    epochs, finetune_epochs = TORCH_EPOCHS, FINETUNE_EPOCHS
    keras_epochs = KERAS_EPOCHS
    if args.quick:
        data = {**data, "x_train": data["x_train"][:3000], "y_train": data["y_train"][:3000]}
        epochs = keras_epochs = 1
    if not args.metrics_only:
        if not args.skip_torch:
            build_torch_models(data, epochs, finetune_epochs)
        if not args.skip_keras:
            build_keras_models(data, keras_epochs, finetune_epochs)
    write_metrics(data)
    log(f"done in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
