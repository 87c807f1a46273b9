"""Fixtures of the packaged-model tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_em):
    """Factory ``tiny_checkpoint(folder, stem="default") -> .safetensors path``: :func:`tiny_em` on a 16³
    grid at 4 mm saved as ``<folder>/<stem>.{safetensors,json}``."""

    def make(folder: Path, stem: str = "default") -> Path:
        from emorph_deploy.data.preprocess import Preprocessing
        from emorph_deploy.train.checkpoint import save_checkpoint

        grid = (16, 16, 16)
        pre = Preprocessing(grid_shape=grid, spacing_mm=(4.0,) * 3)
        save_checkpoint(tiny_em(grid), folder / stem, preprocessing=pre)
        return folder / f"{stem}.safetensors"

    return make
