"""Stages that make models: train the base models and their reference retrains, prune
and randomise them, and build the deployment artifacts. Each writes ONNX files into the
cache and records them in the manifest (:class:`Manifest`)."""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import artifacts, nets, prune
from .config import StudyConfig
from .train import (
    apply_masks,
    recalibrate_keras,
    recalibrate_torch,
    train_keras,
    train_torch,
)

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
    seed: int = 0  # index of the base model's seed (0 .. config.seeds - 1)
    extra: dict = field(default_factory=dict)


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock beside ``path``: processes for different architectures read, merge
    and rewrite the same JSON files, and must not interleave."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
        with file_lock(self.path):
            self.reload()
            self.entries[entry.name] = entry
            self.save()

    def drop(self, predicate: Callable[[Entry], bool]) -> None:
        with file_lock(self.path):
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


def base_name(arch: str, k: int) -> str:
    """The name of base model ``k`` (seed index) of ``arch``."""
    return f"{arch}-s{k}"


def _weights_path(cache: Path, name: str, arch: str) -> Path:
    suffix = ".keras" if arch.startswith("keras") else ".pt"
    return cache / "trained" / f"{name}{suffix}"


def load_base(cache: Path, arch: str, k: int):
    """Trained base model ``k`` of ``arch`` (framework object) from the cache."""
    path = _weights_path(cache, base_name(arch, k), arch)
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run the 'train' stage first (--only train)")
    if arch.startswith("keras"):
        import keras

        return keras.models.load_model(path)
    import torch

    model = _new_torch(arch)
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def _fit(model, arch: str, data: dict, epochs: float, lr: float, seed: int, config: StudyConfig,
         log: Log, masks=None, optimizer: str = "adam") -> None:
    if arch.startswith("keras"):
        train_keras(model, data["x_train"], data["y_train"], epochs, lr, seed, config.batch_size,
                    log, masks=masks, flip=config.flip, optimizer=optimizer,
                    shift=config.shift, weight_decay=config.weight_decay)
    else:
        train_torch(model, data["x_train"], data["y_train"], epochs, lr, seed, config.batch_size,
                    log, flip=config.flip, optimizer=optimizer, shift=config.shift,
                    weight_decay=config.weight_decay)


def _train_one(arch: str, data: dict, config: StudyConfig, seed: int, log: Log):
    if arch.startswith("keras"):
        import keras

        keras.utils.set_random_seed(seed)
        model = nets.keras_vgg()
    else:
        import torch

        torch.manual_seed(seed)
        model = _new_torch(arch)
    _fit(model, arch, data, config.epochs, config.learning_rate, seed, config, log,
         optimizer=config.optimizer)
    return model


def _export(model, arch: str, path: Path) -> Path:
    if arch.startswith("keras"):
        return artifacts.export_keras(model, path)
    return artifacts.export_torch(model, path)


def _accuracy(model, arch: str, data: dict) -> float:
    """Top-1 accuracy of a framework model on the test images (before export)."""
    x = data["x_test"].astype(np.float32) / 255.0
    if arch.startswith("keras"):
        logits = np.asarray(model.predict(x[..., None], batch_size=1000, verbose=0))
    else:
        import torch

        with torch.no_grad():
            logits = model.eval()(torch.from_numpy(x[:, None])).numpy()
    return float((logits.argmax(1) == data["y_test"]).mean())


def train_stage(data: dict, config: StudyConfig, cache: Path, manifest: Manifest, log: Log) -> None:
    """Train ``config.seeds`` base models per architecture; each is the others' independent
    retrain (same recipe, another seed)."""
    for arch in config.architectures:
        for k in config.seed_indices():
            seed, name = config.base_seed(k), base_name(arch, k)
            onnx_path = cache / "onnx" / f"{name}.onnx"
            weights = _weights_path(cache, name, arch)
            if weights.is_file() and onnx_path.is_file() and name in manifest.entries:
                log(f"train {name}: already trained, kept (delete {weights} to retrain)")
                continue
            log(f"train {name} (seed {seed})")
            started = time.time()
            model = _train_one(arch, data, config, seed, log)
            weights.parent.mkdir(parents=True, exist_ok=True)
            if arch.startswith("keras"):
                model.save(weights)
            else:
                import torch

                torch.save(model.state_dict(), weights)
            path = _export(model, arch, onnx_path)
            accuracy = artifacts.onnx_accuracy(path, data["x_test"], data["y_test"])
            log(f"  {name}: test accuracy {100 * accuracy:.2f} % ({time.time() - started:.0f} s)")
            manifest.add(Entry(
                name=name, path=str(path), framework=framework_of(arch), arch=arch, base="",
                kind="original", seed=k, note=f"seed {seed}",
                extra={"train_seconds": round(time.time() - started, 1)},
            ))


def prune_stage(data: dict, config: StudyConfig, cache: Path, manifest: Manifest, log: Log) -> None:
    """Every pruning method x rate of every base model: as pruned (``raw``), and recovered
    (BatchNorm statistics recalibrated, then ``finetune_epochs`` of fine-tuning with a cosine
    schedule; ``-ft``). The accuracy after the recalibration alone is recorded too."""
    for arch in config.architectures:
        for k in config.seed_indices():
            base = load_base(cache, arch, k)
            for method in config.methods:
                for rate in config.rates:
                    _prune_one(base, arch, k, method, rate, data, config, cache, manifest, log)
            del base


def _prune_one(base, arch: str, k: int, method: str, rate: int, data: dict, config: StudyConfig,
               cache: Path, manifest: Manifest, log: Log) -> None:
    keras = arch.startswith("keras")
    name = f"{base_name(arch, k)}-{method}{rate}"
    if name in manifest.entries and f"{name}-ft" in manifest.entries:
        log(f"prune {name}: already made, kept")
        return
    started = time.time()
    seed = config.base_seed(k) + 31 * rate + {"random-filter": 1, "l1-filter": 2}.get(method, 3)
    model, _ = _prune(base, arch, method, rate, seed)  # pruning is deterministic in seed
    raw = _export(model if keras else prune.torch_finalize(model), arch,
                  cache / "onnx" / f"{name}.onnx")
    model, masks = _prune(base, arch, method, rate, seed)
    common = dict(framework=framework_of(arch), arch=arch, base=base_name(arch, k), kind="pruned",
                  method=method, rate=rate, seed=k)
    manifest.add(Entry(name=name, path=str(raw), finetuned=False, note="as pruned", **common))
    if keras:
        recalibrate_keras(model, data["x_train"], config.recalibration_images, seed)
        apply_masks(masks)
    else:
        recalibrate_torch(model, data["x_train"], config.recalibration_images, seed)
    recalibrated = _accuracy(model, arch, data)
    _fit(model, arch, data, config.finetune_epochs, config.finetune_learning_rate, seed, config,
         log, masks=masks)
    if not keras:
        prune.torch_finalize(model)
    path = _export(model, arch, cache / "onnx" / f"{name}-ft.onnx")
    manifest.add(Entry(
        name=f"{name}-ft", path=str(path), finetuned=True,
        note=f"BatchNorm recalibrated on {config.recalibration_images} training images, then "
             f"{config.finetune_epochs:g} epochs of fine-tuning", **common,
        extra={"accuracy_recalibrated": recalibrated},
    ))
    log(f"pruned {name} and {name}-ft ({time.time() - started:.0f} s)")


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
    """ORT static int8 QDQ of every base model; full-int8 TFLite of every Keras base model."""
    seeds = config.seed_indices()
    manifest.drop(lambda e: e.kind == "deploy" and e.arch in config.architectures
                  and e.seed in seeds)
    for arch in config.architectures:
        layout = "NHWC" if arch.startswith("keras") else "NCHW"
        for k in config.seed_indices():
            base = base_name(arch, k)
            original = manifest.entries.get(base)
            if original is None:
                raise SystemExit(f"{base} is not in the manifest: run the 'train' stage first")
            common = dict(framework=framework_of(arch), arch=arch, base=base, kind="deploy",
                          seed=k)
            name = f"{base}-ort-qdq-int8"
            path = artifacts.quantize_qdq(Path(original.path), cache / "onnx" / f"{name}.onnx",
                                          calibration_images(data, config, layout))
            manifest.add(Entry(
                name=name, path=str(path), method="ort-qdq-int8", **common,
                note=f"onnxruntime quantize_static QDQ, per-channel int8 weights, uint8 "
                     f"activations, MinMax on {config.calibration_images} training images",
            ))
            log(f"quantized {name}")
            if not arch.startswith("keras"):
                continue
            name = f"{base}-tflite-int8"
            try:
                path = artifacts.keras_to_onnx_via_tflite(
                    load_base(cache, arch, k), calibration_images(data, config, layout)[:256],
                    "int8", cache / "onnx" / f"{name}.onnx")
            except Exception as exc:  # a conversion failure is a finding, not a crash
                log(f"TFLite int8 conversion failed: {exc}")
                manifest.add(Entry(name=name, path="", method="tflite-int8", **common,
                                   note=f"conversion failed: {type(exc).__name__}: {exc}"))
                continue
            manifest.add(Entry(
                name=name, path=str(path), method="tflite-int8", **common,
                note="TFLiteConverter full-integer int8 (TFLITE_BUILTINS_INT8, float I/O), "
                     "representative dataset of 256 training images, then tf2onnx",
            ))
            log(f"converted {name}")
