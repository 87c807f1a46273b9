"""Fixtures of the reliability tests: smooth random volumes (``runner``: tests/conftest.py)."""

from __future__ import annotations

import numpy as np
import pytest


def smooth_volume(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """A smooth random volume in [0, 1], float32, ``shape`` voxels."""
    from scipy.ndimage import gaussian_filter

    v = gaussian_filter(np.random.default_rng(seed).random(shape), 1.5).astype(np.float32)
    return (v - v.min()) / (v.max() - v.min())


@pytest.fixture(scope="session")
def blob():
    """Factory ``blob(shape, seed)`` -> :func:`smooth_volume`."""
    return smooth_volume
