"""Fixtures of the reliability tests: a CliRunner with stderr apart, smooth random volumes."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner


@pytest.fixture
def runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:  # click >= 8.2 always separates stderr
        return CliRunner()


def smooth_volume(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """A smooth random volume in [0, 1], float32, ``shape`` voxels."""
    from scipy.ndimage import gaussian_filter

    v = gaussian_filter(np.random.default_rng(seed).random(shape), 1.5).astype(np.float32)
    return (v - v.min()) / (v.max() - v.min())


@pytest.fixture(scope="session")
def blob():
    """Factory ``blob(shape, seed)`` -> :func:`smooth_volume`."""
    return smooth_volume
