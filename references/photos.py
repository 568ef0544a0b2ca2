"""Real photos as model inputs, and the per-image CAM agreement, for the deployment tests
and ``benchmarks/bench_zoo.py``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sample_photos(size: int, nchw: bool, mean: Sequence[float] = IMAGENET_MEAN,
                  std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """scikit-image's astronaut, chelsea, coffee and rocket, resized to ``size`` x ``size``
    (anti-aliased), scaled to [0, 1], normalised by ``mean``/``std``: float32 (4, 3, s, s)
    when ``nchw``, else (4, s, s, 3)."""
    from skimage import data, transform

    images = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    x = np.stack([transform.resize(i, (size, size), anti_aliasing=True) for i in images])
    x = (x - np.asarray(mean)) / np.asarray(std)
    return (x.transpose(0, 3, 1, 2) if nchw else x).astype(np.float32)


def per_image_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each pair of maps ``a[i]``, ``b[i]`` (NaN for a constant map)."""
    return np.array([np.corrcoef(p.ravel(), q.ravel())[0, 1] for p, q in zip(a, b, strict=True)])
