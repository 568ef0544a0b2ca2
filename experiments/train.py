"""Training and fine-tuning: Adam with a cosine learning-rate schedule, no augmentation.

``fraction`` counts epochs: 3 trains three passes over the data, 0.5 half a pass (a random
half). Both frameworks get the same recipe, so the cross-framework check compares pruning,
not training.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np

Log = Callable[[str], None]


def _schedule(n: int, epochs: float, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The sample indices of every step: whole shuffled epochs, then a partial one."""
    steps_per_epoch = math.ceil(n / batch_size)
    total = max(1, round(epochs * steps_per_epoch))
    batches: list[np.ndarray] = []
    while len(batches) < total:
        order = rng.permutation(n)
        batches += [order[i:i + batch_size] for i in range(0, n, batch_size)]
    return batches[:total]


def train_torch(model, x: np.ndarray, y: np.ndarray, epochs: float, lr: float, seed: int,
                batch_size: int, log: Log, keep_masks: bool = False) -> None:
    """Train in place; ``x`` uint8 (N, 28, 28). With torch.nn.utils.prune masks attached the
    pruned weights stay zero (the masks are applied in every forward)."""
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    inputs = torch.from_numpy(x.astype(np.float32) / 255.0)[:, None]
    targets = torch.from_numpy(y)
    steps = _schedule(len(inputs), epochs, batch_size, rng)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, len(steps))
    model.train()
    started, total_loss = time.time(), 0.0
    for batch in steps:
        index = torch.from_numpy(batch)
        images = inputs[index]
        loss = torch.nn.functional.cross_entropy(model(images), targets[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        total_loss += float(loss.detach())
    model.eval()
    log(f"    {epochs:g} epoch(s), {len(steps)} steps: loss {total_loss / len(steps):.4f} "
        f"({time.time() - started:.0f} s)")


def train_keras(model, x: np.ndarray, y: np.ndarray, epochs: float, lr: float, seed: int,
                batch_size: int, log: Log, masks: list[tuple[object, np.ndarray]] | None = None
                ) -> None:
    """Train in place with the same schedule; ``masks`` (kernel variable, 0/1 array) are
    re-applied after every step so magnitude-pruned weights stay zero."""
    import keras

    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    steps = _schedule(len(x), epochs, batch_size, rng)
    schedule = keras.optimizers.schedules.CosineDecay(lr, len(steps))
    model.compile(keras.optimizers.Adam(schedule), "sparse_categorical_crossentropy")

    class ReapplyMasks(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None) -> None:
            apply_masks(masks)

    started, losses = time.time(), []
    per_call = math.ceil(len(x) / batch_size)  # one epoch of images in memory at a time
    for first in range(0, len(steps), per_call):
        order = np.concatenate(steps[first:first + per_call])
        images = (x[order].astype(np.float32) / 255.0)[..., None]
        history = model.fit(images, y[order], batch_size=batch_size, epochs=1, shuffle=False,
                            verbose=0, callbacks=[ReapplyMasks()] if masks else [])
        losses.append(history.history["loss"][-1])
    apply_masks(masks)
    log(f"    {epochs:g} epoch(s), {len(steps)} steps: loss {losses[-1]:.4f} "
        f"({time.time() - started:.0f} s)")


def apply_masks(masks: list[tuple[object, np.ndarray]] | None) -> None:
    for kernel, mask in masks or []:
        kernel.assign(kernel.numpy() * mask)
