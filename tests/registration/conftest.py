"""Fixtures of the registration tests: a stub runner on the :class:`~emorph_deploy.runners.base.Runner`
protocol that returns a fixed flow."""

from __future__ import annotations

import numpy as np
import pytest

from emorph_deploy.runners.base import Runner


class StubRunner(Runner):
    """Returns ``flow`` (3, D, H, W) float32 model-grid voxels for every feed; the model grid is the flow's,
    at ``spacing`` mm (``pre_grid``: a different preprocessing grid, to test the mismatch check)."""

    name = "stub"

    def __init__(
        self, flow: np.ndarray, spacing: float = 3.0, pre_grid: tuple[int, int, int] | None = None
    ) -> None:
        from emorph_deploy.data.preprocess import Preprocessing

        super().__init__()
        self.flow = np.asarray(flow, dtype=np.float32)
        self._grid_shape = tuple(int(s) for s in self.flow.shape[1:])
        pre = Preprocessing(grid_shape=pre_grid or self._grid_shape, spacing_mm=(spacing,) * 3)
        self._meta = {"preprocessing": pre.to_dict(), "precision": "fp32"}

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"flow": self.flow[None].copy()}


@pytest.fixture(scope="session")
def stub_runner():
    """Factory ``stub_runner(flow, spacing=3.0, pre_grid=None)`` -> :class:`StubRunner`."""
    return StubRunner
