"""The study's translation augmentation (experiments.train.random_shift) against a plain
slicing definition: every image moved by one offset within the bound, zeros shifted in."""

from __future__ import annotations

import numpy as np

from experiments.train import random_shift


def translated(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``image`` moved down by ``dy`` and right by ``dx`` (negative: up/left), zero-filled."""
    height, width = image.shape
    out = np.zeros_like(image)
    out[max(0, dy):height + min(0, dy), max(0, dx):width + min(0, dx)] = \
        image[max(0, -dy):height + min(0, -dy), max(0, -dx):width + min(0, -dx)]
    return out


def test_each_image_is_translated_by_one_offset_within_the_bound() -> None:
    images = np.random.default_rng(0).integers(1, 256, size=(200, 28, 28)).astype(np.uint8)
    shifted = random_shift(images, 2, np.random.default_rng(1))
    assert shifted.shape == images.shape and shifted.dtype == images.dtype
    offsets = []
    for image, moved in zip(images, shifted, strict=True):
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if np.array_equal(translated(image, dy, dx), moved)]
        assert len(matches) == 1  # nonzero pixels make the offset unique
        offsets.append(matches[0])
    # All 25 offsets occur, roughly uniformly (200 draws: ~8 each).
    counts = np.unique(np.array(offsets), axis=0, return_counts=True)[1]
    assert len(counts) == 25 and counts.min() >= 1


def test_no_shift_and_the_same_generator_state_repeat() -> None:
    images = np.random.default_rng(2).integers(0, 256, size=(16, 28, 28)).astype(np.uint8)
    assert random_shift(images, 0, np.random.default_rng(3)) is images
    first = random_shift(images, 3, np.random.default_rng(4))
    again = random_shift(images, 3, np.random.default_rng(4))
    assert np.array_equal(first, again)
