"""Shared tiny-model settings for the training tests (32³ grid, narrow widths)."""

from __future__ import annotations

import pytest


@pytest.fixture
def tiny_overrides() -> dict:
    return {
        "embed_dims": [16, 32],
        "patch_dim": 12,
        "decoder_widths": [16, 8],
        "skip_width": 8,
        "heads": [2, 4],
        "depths": [1, 1],
    }


@pytest.fixture
def tiny_cli() -> list[str]:
    return [
        "--grid-shape",
        "32x32x32",
        "--embed-dims",
        "16,32",
        "--patch-dim",
        "12",
        "--decoder-widths",
        "16,8",
        "--skip-width",
        "8",
        "--heads",
        "2,4",
        "--depths",
        "1,1",
        "--no-progress",
        "--no-tensorboard",
    ]


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
