"""Training and fine-tuning: Adam with a cosine learning-rate schedule.

``epochs`` may be fractional: 3 trains three passes over the data, 0.5 half a pass (a random
half). Both frameworks get the same recipe, so the study's cross-framework check compares
pruning, not training. The study augments with random horizontal flips (``flip``); random
translations of up to ``shift`` pixels are available but off in its configuration
(:class:`experiments.config.StudyConfig` says why). ``models/build.py`` trains the bundled
PyTorch models with flips, through the same loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

import numpy as np

Log = Callable[[str], None]


def _step_count(n: int, epochs: float, batch_size: int) -> int:
    return max(1, round(epochs * math.ceil(n / batch_size)))


def _batches(n: int, steps: int, batch_size: int, rng: np.random.Generator
             ) -> Iterator[np.ndarray]:
    """The sample indices of every step: whole shuffled epochs, then a partial one.

    Each epoch's permutation is drawn when its first batch is asked for, so that draws made
    between steps (the flips of :func:`train_torch`) follow it in ``rng``'s stream."""
    made = 0
    while made < steps:
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            if made == steps:
                return
            made += 1
            yield order[start:start + batch_size]


def random_shift(images: np.ndarray, shift: int, rng: np.random.Generator) -> np.ndarray:
    """Translate each image (N, H, W) by its own random offset of up to ``shift`` pixels in
    each direction, filling with zeros (the background): zero-pad by ``shift``, then crop."""
    if shift <= 0:
        return images
    n, height, width = images.shape
    padded = np.pad(images, ((0, 0), (shift, shift), (shift, shift)))
    dy, dx = rng.integers(0, 2 * shift + 1, size=(2, n))
    rows = (dy[:, None] + np.arange(height))[:, :, None]
    cols = (dx[:, None] + np.arange(width))[:, None, :]
    return padded[np.arange(n)[:, None, None], rows, cols]


SGD_MOMENTUM = 0.9
WEIGHT_DECAY = 5e-3
"""The default ``weight_decay`` of SGD (``optimizer="sgd"``): Nesterov momentum and decoupled
weight decay (each step shrinks the Conv/Linear weights by ``lr * weight_decay``, as Keras'
``weight_decay`` does, so both frameworks run the same algorithm); BatchNorm parameters and
biases are not decayed."""


def _torch_optimizer(model, optimizer: str, lr: float):
    import torch

    if optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr), []
    if optimizer != "sgd":
        raise ValueError(f"unknown optimizer {optimizer!r}")
    decayed = [p for p in model.parameters() if p.ndim > 1]
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=SGD_MOMENTUM,
                           nesterov=True), decayed


def train_torch(model, x: np.ndarray, y: np.ndarray, epochs: float, lr: float, seed: int,
                batch_size: int, log: Log, flip: bool = False, optimizer: str = "adam",
                shift: int = 0, weight_decay: float = WEIGHT_DECAY) -> None:
    """Train in place; ``x`` uint8 (N, 28, 28). With torch.nn.utils.prune masks attached the
    pruned weights stay zero (the masks are applied in every forward). ``flip`` mirrors a
    random half of every batch left-right (label-preserving for Fashion-MNIST); ``shift``
    translates every image by up to that many pixels (:func:`random_shift`).
    ``optimizer``: ``adam`` or ``sgd`` (see :data:`WEIGHT_DECAY`), with a cosine schedule."""
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    inputs = torch.from_numpy(x.astype(np.float32) / 255.0)[:, None]
    targets = torch.from_numpy(y)
    steps = _step_count(len(inputs), epochs, batch_size)
    optimizer, decayed = _torch_optimizer(model, optimizer, lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    started, total_loss = time.time(), 0.0
    for batch in _batches(len(inputs), steps, batch_size, rng):
        index = torch.from_numpy(batch)
        if shift > 0:
            images = torch.from_numpy(random_shift(x[batch], shift, rng).astype(np.float32)
                                      / 255.0)[:, None]
        else:
            images = inputs[index]
        if flip:
            mirrored = torch.from_numpy(rng.random(len(index)) < 0.5)
            images = torch.where(mirrored[:, None, None, None], images.flip(3), images)
        loss = torch.nn.functional.cross_entropy(model(images), targets[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if decayed:
            with torch.no_grad():
                shrink = 1.0 - schedule.get_last_lr()[0] * weight_decay
                for parameter in decayed:
                    parameter.mul_(shrink)
        schedule.step()
        total_loss += float(loss.detach())
    model.eval()
    log(f"    {epochs:g} epoch(s), {steps} steps: loss {total_loss / steps:.4f} "
        f"({time.time() - started:.0f} s)")


def compile_adam_cosine(model, lr: float, steps: int) -> None:
    """Compile a Keras classifier (softmax output) for Adam with a cosine decay over ``steps``."""
    import keras

    schedule = keras.optimizers.schedules.CosineDecay(lr, steps)
    model.compile(keras.optimizers.Adam(schedule), "sparse_categorical_crossentropy")


def compile_sgd_cosine(model, lr: float, steps: int, weight_decay: float = WEIGHT_DECAY
                       ) -> None:
    """Compile a Keras classifier for SGD as :func:`train_torch` runs it: Nesterov momentum,
    decoupled weight decay on the kernels, cosine decay over ``steps``."""
    import keras

    optimizer = keras.optimizers.SGD(keras.optimizers.schedules.CosineDecay(lr, steps),
                                     momentum=SGD_MOMENTUM, nesterov=True,
                                     weight_decay=weight_decay)
    optimizer.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
    model.compile(optimizer, "sparse_categorical_crossentropy")


def mask_keeper(masks: list[tuple[object, np.ndarray]]):
    """A Keras callback that re-applies ``masks`` (kernel variable, 0/1 array) after every
    training batch, so that magnitude-pruned weights stay zero while fine-tuning."""
    import keras

    class ReapplyMasks(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None) -> None:
            apply_masks(masks)

    return ReapplyMasks()


def train_keras(model, x: np.ndarray, y: np.ndarray, epochs: float, lr: float, seed: int,
                batch_size: int, log: Log, masks: list[tuple[object, np.ndarray]] | None = None,
                flip: bool = False, optimizer: str = "adam", shift: int = 0,
                weight_decay: float = WEIGHT_DECAY) -> None:
    """Train in place with the same schedule; ``masks`` (kernel variable, 0/1 array) are
    re-applied after every step so magnitude-pruned weights stay zero. ``flip`` and ``shift``
    augment as in :func:`train_torch`."""
    import keras

    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    steps = list(_batches(len(x), _step_count(len(x), epochs, batch_size), batch_size, rng))
    if optimizer == "sgd":
        compile_sgd_cosine(model, lr, len(steps), weight_decay)
    else:
        compile_adam_cosine(model, lr, len(steps))
    started, losses = time.time(), []
    per_call = math.ceil(len(x) / batch_size)  # one epoch of images in memory at a time
    for first in range(0, len(steps), per_call):
        order = np.concatenate(steps[first:first + per_call])
        images = (random_shift(x[order], shift, rng).astype(np.float32) / 255.0)[..., None]
        if flip:
            mirrored = rng.random(len(order)) < 0.5
            images[mirrored] = images[mirrored][:, :, ::-1]
        history = model.fit(images, y[order], batch_size=batch_size, epochs=1, shuffle=False,
                            verbose=0, callbacks=[mask_keeper(masks)] if masks else [])
        losses.append(history.history["loss"][-1])
    apply_masks(masks)
    log(f"    {epochs:g} epoch(s), {len(steps)} steps: loss {losses[-1]:.4f} "
        f"({time.time() - started:.0f} s)")


def apply_masks(masks: list[tuple[object, np.ndarray]] | None) -> None:
    for kernel, mask in masks or []:
        kernel.assign(kernel.numpy() * mask)


def recalibrate_torch(model, x: np.ndarray, images: int, seed: int, batch_size: int = 256) -> None:
    """Re-estimate every BatchNorm's running mean and variance on ``images`` training images
    (cumulative average, no weight changes): after pruning, the statistics the layers were
    trained with no longer describe their inputs."""
    import torch
    from torch import nn

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative moving average over the batches below
    index = np.random.default_rng(seed).choice(len(x), size=min(images, len(x)), replace=False)
    inputs = torch.from_numpy(x[index].astype(np.float32) / 255.0)[:, None]
    model.train()
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            model(inputs[start:start + batch_size])
    for norm, momentum in zip(norms, saved, strict=True):
        norm.momentum = momentum
    model.eval()


def recalibrate_keras(model, x: np.ndarray, images: int, seed: int, batch_size: int = 256
                      ) -> None:
    """The Keras twin of :func:`recalibrate_torch`: each BatchNormalization's moving
    statistics become the mean and variance of its input over ``images`` training images
    (computed layer by layer, in graph order, from the recalibrated layers before it)."""
    import keras

    index = np.random.default_rng(seed).choice(len(x), size=min(images, len(x)), replace=False)
    inputs = (x[index].astype(np.float32) / 255.0)[..., None]
    for layer in model.layers:
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        probe = keras.Model(model.inputs, layer.input)
        features = np.concatenate([np.asarray(probe(inputs[s:s + batch_size], training=False))
                                   for s in range(0, len(inputs), batch_size)])
        axes = tuple(range(features.ndim - 1))
        gamma, beta, _, _ = layer.get_weights()
        layer.set_weights([gamma, beta, features.mean(axis=axes), features.var(axis=axes)])
