"""Stages that make models: train the base models and their reference retrains, prune
and randomise them, and build the deployment artifacts. Each writes ONNX files into the
cache and records them in the manifest (:class:`Manifest`)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import artifacts, nets, prune
from .config import StudyConfig
from .train import train_keras, train_torch

Log = Callable[[str], None]


@dataclass
class Entry:
    """One model of the study, scored against its base model ``base``."""

    name: str
    path: str
    framework: str  # pytorch | keras
    arch: str  # one of config.ARCHITECTURES
    base: str  # name of the original it is compared with ("" for an original)
    kind: str  # original | pruned | reference | deploy
    method: str = ""  # random-filter | l1-filter | magnitude | retrain | cascade-* | ort-qdq | ...
    rate: int | None = None
    finetuned: bool = False
    note: str = ""


class Manifest:
    """The study's models, kept as JSON in the cache so stages can run separately."""

    def __init__(self, cache: Path) -> None:
        self.path = cache / "manifest.json"
        self.entries: dict[str, Entry] = {}
        self.reload()

    def reload(self) -> None:
        """Read the file again: stages for different architectures may run in parallel
        processes, each adding its own entries."""
        if self.path.is_file():
            for item in json.loads(self.path.read_text()):
                self.entries[item["name"]] = Entry(**item)

    def add(self, entry: Entry) -> None:
        self.reload()
        self.entries[entry.name] = entry
        self.save()

    def drop(self, predicate: Callable[[Entry], bool]) -> None:
        self.reload()
        self.entries = {k: v for k, v in self.entries.items() if not predicate(v)}
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps([asdict(e) for e in self.entries.values()], indent=1))
        tmp.replace(self.path)

    def of(self, arch: str) -> list[Entry]:
        return [e for e in self.entries.values() if e.arch == arch and e.kind != "original"]


def framework_of(arch: str) -> str:
    return "pytorch" if arch.startswith("torch") else "keras"


def set_threads(threads: int, torch_threads: int) -> None:
    """Thread counts for both frameworks. PyTorch's lazily imported parts are imported
    before TensorFlow: importing torch._dynamo after TensorFlow crashes the process."""
    import torch
    import torch._dynamo  # noqa: F401
    import torch.onnx  # noqa: F401
    import torch_pruning  # noqa: F401

    torch.set_num_threads(torch_threads)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # already initialised in this process
        pass


def _new_torch(arch: str):
    return nets.torch_vgg() if arch == "torch-vgg" else nets.torch_resnet()


def _weights_path(cache: Path, arch: str, retrain: bool) -> Path:
    suffix = ".keras" if arch.startswith("keras") else ".pt"
    return cache / "trained" / f"{arch}{'-retrain' if retrain else ''}{suffix}"


def load_base(cache: Path, arch: str, retrain: bool = False):
    """The trained base model (framework object) from the cache."""
    path = _weights_path(cache, arch, retrain)
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run the 'train' stage first (--only train)")
    if arch.startswith("keras"):
        import keras

        return keras.models.load_model(path)
    import torch

    model = _new_torch(arch)
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def _train_one(arch: str, data: dict, config: StudyConfig, seed: int, log: Log):
    if arch.startswith("keras"):
        model = nets.keras_vgg()
        train_keras(model, data["x_train"], data["y_train"], config.epochs, config.learning_rate,
                    seed, config.batch_size, log)
        return model
    import torch

    torch.manual_seed(seed)
    model = _new_torch(arch)
    train_torch(model, data["x_train"], data["y_train"], config.epochs, config.learning_rate,
                seed, config.batch_size, log)
    return model


def _export(model, arch: str, path: Path) -> Path:
    if arch.startswith("keras"):
        return artifacts.export_keras(model, path)
    return artifacts.export_torch(model, path)


def train_stage(data: dict, config: StudyConfig, cache: Path, manifest: Manifest, log: Log) -> None:
    """Train every base model and its independent retrain (another seed)."""
    for arch in config.architectures:
        for retrain in (False, True):
            seed = config.seed + (config.retrain_seed_offset if retrain else 0)
            name = f"{arch}-retrain" if retrain else arch
            onnx_path = cache / "onnx" / f"{name}.onnx"
            if _weights_path(cache, arch, retrain).is_file() and onnx_path.is_file():
                log(f"train {name}: already trained, kept (delete {cache} to retrain)")
                manifest.add(_trained_entry(name, onnx_path, arch, retrain, seed))
                continue
            log(f"train {name} (seed {seed})")
            model = _train_one(arch, data, config, seed, log)
            weights = _weights_path(cache, arch, retrain)
            weights.parent.mkdir(parents=True, exist_ok=True)
            if arch.startswith("keras"):
                model.save(weights)
            else:
                import torch

                torch.save(model.state_dict(), weights)
            path = _export(model, arch, onnx_path)
            accuracy = artifacts.onnx_accuracy(path, data["x_test"], data["y_test"])
            log(f"  {name}: test accuracy {100 * accuracy:.2f} %")
            manifest.add(_trained_entry(name, path, arch, retrain, seed))


def _trained_entry(name: str, path: Path, arch: str, retrain: bool, seed: int) -> Entry:
    return Entry(
        name=name, path=str(path), framework=framework_of(arch), arch=arch,
        base=arch if retrain else "", kind="reference" if retrain else "original",
        method="retrain" if retrain else "", note=f"seed {seed}",
    )


def prune_stage(data: dict, config: StudyConfig, cache: Path, manifest: Manifest, log: Log) -> None:
    """Every pruning method x rate, without and with fine-tuning, and the randomisation
    cascade, for every base model."""
    for arch in config.architectures:
        base = load_base(cache, arch)
        keras = arch.startswith("keras")
        for method in config.methods:
            for rate in config.rates:
                for finetune in (False, True):
                    name = f"{arch}-{method}{rate}{'-ft' if finetune else ''}"
                    started = time.time()
                    seed = config.seed + 31 * rate + (1 if finetune else 0)
                    model, masks = _prune(base, arch, method, rate, seed)
                    if finetune:
                        if keras:
                            train_keras(model, data["x_train"], data["y_train"],
                                        config.finetune_fraction, config.finetune_learning_rate,
                                        seed, config.batch_size, log, masks=masks)
                        else:
                            train_torch(model, data["x_train"], data["y_train"],
                                        config.finetune_fraction, config.finetune_learning_rate,
                                        seed, config.batch_size, log)
                    if not keras:
                        prune.torch_finalize(model)
                    path = _export(model, arch, cache / "onnx" / f"{name}.onnx")
                    manifest.add(Entry(
                        name=name, path=str(path), framework=framework_of(arch), arch=arch,
                        base=arch, kind="pruned", method=method, rate=rate, finetuned=finetune,
                        note=(f"fine-tuned {config.finetune_fraction:g} epoch" if finetune else ""),
                    ))
                    log(f"pruned {name} ({time.time() - started:.0f} s)")
        count = prune.keras_layer_count(base) if keras else prune.torch_layer_count(base)
        for step, depth in prune.cascade_steps(count):
            name = f"{arch}-cascade-{step}"
            seed = config.seed + 500 + depth
            model = (prune.keras_randomize_top(base, depth, seed) if keras
                     else prune.torch_randomize_top(base, depth, seed))
            path = _export(model, arch, cache / "onnx" / f"{name}.onnx")
            manifest.add(Entry(
                name=name, path=str(path), framework=framework_of(arch), arch=arch, base=arch,
                kind="reference", method=f"cascade-{step}", rate=None,
                note=f"top {depth} of {count} Conv/Linear layers re-initialised",
            ))
            log(f"randomised {name}")


def _prune(base, arch: str, method: str, rate: int, seed: int):
    """(pruned copy, masks for Keras fine-tuning or None)."""
    if arch.startswith("keras"):
        if method == "magnitude":
            return prune.keras_magnitude(base, rate)
        return prune.keras_filter(base, rate, method.split("-")[0], seed), None
    if method == "magnitude":
        return prune.torch_magnitude(base, rate), None
    return prune.torch_filter(base, rate, method.split("-")[0], seed), None


def calibration_images(data: dict, config: StudyConfig, layout: str) -> np.ndarray:
    """Model inputs (unit scale) of training images for int8 calibration."""
    rng = np.random.default_rng(config.seed + 99)
    index = rng.choice(len(data["x_train"]), size=config.calibration_images, replace=False)
    x = data["x_train"][index].astype(np.float32) / 255.0
    return x[:, None] if layout == "NCHW" else x[..., None]


def deploy_stage(data: dict, config: StudyConfig, cache: Path, manifest: Manifest, log: Log) -> None:
    """ORT static int8 QDQ of every base model; full-int8 TFLite of the Keras model."""
    manifest.drop(lambda e: e.kind == "deploy" and e.arch in config.architectures)
    for arch in config.architectures:
        original = manifest.entries.get(arch)
        if original is None:
            raise SystemExit(f"{arch} is not in the manifest: run the 'train' stage first")
        layout = "NHWC" if arch.startswith("keras") else "NCHW"
        name = f"{arch}-ort-qdq-int8"
        path = artifacts.quantize_qdq(Path(original.path), cache / "onnx" / f"{name}.onnx",
                                      calibration_images(data, config, layout))
        manifest.add(Entry(
            name=name, path=str(path), framework=framework_of(arch), arch=arch, base=arch,
            kind="deploy", method="ort-qdq-int8",
            note=f"onnxruntime quantize_static QDQ, per-channel int8 weights, uint8 "
                 f"activations, MinMax on {config.calibration_images} training images",
        ))
        log(f"quantized {name}")
        if arch.startswith("keras"):
            name = f"{arch}-tflite-int8"
            try:
                path = artifacts.keras_to_onnx_via_tflite(
                    load_base(cache, arch), calibration_images(data, config, layout)[:256],
                    "int8", cache / "onnx" / f"{name}.onnx")
            except Exception as exc:  # a conversion failure is a finding, not a crash
                log(f"TFLite int8 conversion failed: {exc}")
                manifest.add(Entry(
                    name=name, path="", framework="keras", arch=arch, base=arch, kind="deploy",
                    method="tflite-int8", note=f"conversion failed: {type(exc).__name__}: {exc}",
                ))
                continue
            manifest.add(Entry(
                name=name, path=str(path), framework="keras", arch=arch, base=arch,
                kind="deploy", method="tflite-int8",
                note="TFLiteConverter full-integer int8 (TFLITE_BUILTINS_INT8, float I/O), "
                     "representative dataset of 256 training images, then tf2onnx",
            ))
            log(f"converted {name}")
