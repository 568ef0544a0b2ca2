"""Pruning, compression and randomisation of the base models.

* **filter pruning** (``l1-filter``, ``random-filter``): the same fraction of every conv's
  output channels is removed, channels really dropped. PyTorch uses Torch-Pruning, whose
  dependency graph also removes the coupled BatchNorm channels, next-layer input channels
  and residual partners; the L1 importance is the plain L1 norm of each conv filter (the
  first layer of its group). Keras is pruned by hand, the same way, by rebuilding a
  narrower model and copying the kept weights.
* **magnitude**: global unstructured pruning of all Conv/Linear(Dense) weights by absolute
  value; during fine-tuning the masks keep pruned weights at zero.
* **cascading randomisation** (Adebayo et al., 2018): the Conv/Linear weights of the top
  ``k`` layers are re-initialised with the layer's own default initialiser, from the
  classifier down. BatchNorm statistics are left as trained.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np

from .nets import VGG_WIDTHS, keras_vgg

# --------------------------------------------------------------------------------------
# PyTorch


def _torch_weighted(model) -> list:
    from torch import nn

    return [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def torch_magnitude(model, rate: int):
    """A copy with the ``rate`` % smallest weights masked (masks stay until :func:`torch_finalize`)."""
    from torch.nn.utils import prune

    pruned = copy.deepcopy(model)
    parameters = [(module, "weight") for module in _torch_weighted(pruned)]
    prune.global_unstructured(parameters, pruning_method=prune.L1Unstructured, amount=rate / 100)
    return pruned


def torch_finalize(model):
    """Make pruning masks permanent (zeros in the weights) before export."""
    from torch.nn.utils import prune

    for module in _torch_weighted(model):
        if prune.is_pruned(module) and hasattr(module, "weight_orig"):
            prune.remove(module, "weight")
    model.eval()
    return model


def torch_filter(model, rate: int, importance: str, seed: int):
    """A copy with ``rate`` % of every conv's output channels removed (Torch-Pruning)."""
    import torch
    import torch_pruning as tp

    torch.manual_seed(seed)
    pruned = copy.deepcopy(model).eval()
    if importance == "l1":
        scorer = tp.importance.MagnitudeImportance(p=1, group_reduction="first", normalizer=None)
    elif importance == "random":
        scorer = tp.importance.RandomImportance()
    else:
        raise ValueError(f"unknown filter importance {importance!r}")
    pruner = tp.pruner.MetaPruner(
        pruned,
        torch.zeros(1, 1, 28, 28),
        importance=scorer,
        pruning_ratio=rate / 100,
        ignored_layers=[pruned.fc],
    )
    pruner.step()
    return pruned.eval()


def torch_randomize_top(model, layers: int, seed: int):
    """A copy whose top ``layers`` Conv/Linear layers have fresh default-initialised weights."""
    import torch

    randomized = copy.deepcopy(model)
    torch.manual_seed(seed)
    for module in list(reversed(_torch_weighted(randomized)))[:layers]:
        module.reset_parameters()
    return randomized.eval()


def torch_layer_count(model) -> int:
    return len(_torch_weighted(model))


# --------------------------------------------------------------------------------------
# Keras


def _keras_weighted(model) -> list:
    from keras import layers

    return [layer for layer in model.layers if isinstance(layer, layers.Conv2D | layers.Dense)]


def keras_clone(model):
    import keras

    twin = keras.models.clone_model(model)
    twin.set_weights(model.get_weights())
    return twin


def keras_magnitude(model, rate: int):
    """A copy with the ``rate`` % smallest kernel weights zeroed, and the masks (kernel, 0/1)."""
    pruned = keras_clone(model)
    kernels = [layer.kernel for layer in _keras_weighted(pruned)]
    magnitudes = np.sort(np.concatenate([np.abs(k.numpy()).ravel() for k in kernels]))
    cut = int(round(magnitudes.size * rate / 100))
    # The same count as torch's global L1 pruning: the `cut` smallest weights, ties by order.
    order = np.argsort(np.concatenate([np.abs(k.numpy()).ravel() for k in kernels]), kind="stable")
    flat_mask = np.ones(magnitudes.size, dtype=np.float32)
    flat_mask[order[:cut]] = 0.0
    masks, start = [], 0
    for kernel in kernels:
        size = int(np.prod(kernel.shape))
        masks.append((kernel, flat_mask[start:start + size].reshape(kernel.shape)))
        start += size
    from .train import apply_masks

    apply_masks(masks)
    return pruned, masks


def keras_filter(model, rate: int, importance: str, seed: int,
                 widths: Sequence[int] = VGG_WIDTHS):
    """A narrower copy of the Keras VGG with ``rate`` % of every conv's filters removed."""
    rng = np.random.default_rng(seed)
    keeps = []
    for index, width in enumerate(widths):
        kernel = model.get_layer(f"conv{index}").kernel.numpy()  # (kh, kw, in, out)
        count = max(1, width - int(width * rate / 100))
        if importance == "l1":
            norms = np.abs(kernel).sum(axis=(0, 1, 2))
            keep = np.sort(np.argsort(-norms, kind="stable")[:count])
        elif importance == "random":
            keep = np.sort(rng.choice(width, size=count, replace=False))
        else:
            raise ValueError(f"unknown filter importance {importance!r}")
        keeps.append(keep)
    smaller = keras_vgg([len(keep) for keep in keeps])
    previous = np.arange(1)
    for index, keep in enumerate(keeps):
        kernel = model.get_layer(f"conv{index}").kernel.numpy()
        smaller.get_layer(f"conv{index}").set_weights([kernel[:, :, previous][..., keep]])
        norm = model.get_layer(f"bn{index}").get_weights()
        smaller.get_layer(f"bn{index}").set_weights([w[keep] for w in norm])
        previous = keep
    dense_kernel, dense_bias = model.get_layer("logits").get_weights()
    smaller.get_layer("logits").set_weights([dense_kernel[previous], dense_bias])
    return smaller


def keras_randomize_top(model, layers: int, seed: int):
    """A copy whose top ``layers`` Conv2D/Dense kernels are drawn again from their initialiser."""
    import keras

    randomized = keras_clone(model)
    keras.utils.set_random_seed(seed)
    for layer in list(reversed(_keras_weighted(randomized)))[:layers]:
        layer.kernel.assign(layer.kernel_initializer(layer.kernel.shape))
        if layer.use_bias:
            layer.bias.assign(layer.bias_initializer(layer.bias.shape))
    return randomized


def keras_layer_count(model) -> int:
    return len(_keras_weighted(model))


def cascade_steps(layer_count: int) -> list[tuple[str, int]]:
    """Names and depths of the randomisation cascade: head, top 2, top half, all layers."""
    steps = [("head", 1), ("top2", 2), ("top-half", max(3, layer_count // 2)), ("all", layer_count)]
    seen, unique = set(), []
    for name, depth in steps:
        depth = min(depth, layer_count)
        if depth not in seen:
            seen.add(depth)
            unique.append((name, depth))
    return unique
