"""What one run of the study does: data sizes, training budget, pruning grid, scoring."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

ARCHITECTURES = ("torch-vgg", "keras-vgg", "torch-resnet")
"""Base models: ``framework-architecture``. The Keras VGG has the same layers as the
PyTorch VGG, which is what the cross-framework check compares."""

PRUNING_METHODS = ("random-filter", "l1-filter", "magnitude")
"""Random filter pruning, L1-norm filter pruning (channels really removed) and global
unstructured magnitude pruning of all Conv/Dense weights."""


@dataclass
class StudyConfig:
    """Every knob of one run; written into results.md next to the numbers."""

    train_images: int | None = None  # None: all 60,000
    test_images: int | None = None  # None: all 10,000 (scoring and accuracy)
    epochs: float = 3
    batch_size: int = 256
    learning_rate: float = 3e-3
    finetune_fraction: float = 0.05  # fine-tune for this fraction of one epoch (3,000 images)
    finetune_learning_rate: float = 5e-4
    rates: tuple[int, ...] = (10, 30, 50, 70, 90)
    methods: tuple[str, ...] = PRUNING_METHODS
    architectures: tuple[str, ...] = ARCHITECTURES
    cam_methods: tuple[str, ...] = ("gradcam", "gradcam++")
    noise_sigma: float = 0.02  # the ceiling: input noise, in units of the [0, 1] pixel range
    seed: int = 20240601
    retrain_seed_offset: int = 7919
    calibration_images: int = 512
    score_batch: int = 256
    n_bootstrap: int = 1000
    examples: int = 4  # worst samples kept per model for the pictures
    photo_rates: tuple[int, ...] = (10, 20, 30, 40, 50)
    photos: bool = True
    threads: int = 2  # TensorFlow intra-op threads
    torch_threads: int = 1  # PyTorch: one thread needs a quarter of the CPU time of two on a loaded 2-core machine
    smoke: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def full(cls) -> StudyConfig:
        return cls()

    @classmethod
    def smoke_test(cls) -> StudyConfig:
        """A tiny subset that exercises every stage in well under two minutes."""
        return cls(
            train_images=512,
            test_images=128,
            epochs=1,
            finetune_fraction=0.25,
            rates=(50,),
            architectures=("torch-vgg", "keras-vgg"),
            cam_methods=("gradcam", "gradcam++"),
            calibration_images=32,
            score_batch=64,
            n_bootstrap=100,
            examples=2,
            photo_rates=(30,),
            smoke=True,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
