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


def box_pair(grid: tuple[int, int, int] = (16, 16, 16)) -> tuple[tuple, tuple]:
    """``((fixed, affine), (moving, affine))`` at 4 mm: a noisy box and the same shifted 2 voxels along
    axis 0, in one space."""
    rng = np.random.default_rng(0)
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    fixed = np.zeros(grid, np.float32)
    fixed[3:13, 4:12, 2:14] = 1.0
    fixed += rng.random(grid, dtype=np.float32) * 0.1
    return (fixed, affine), (np.roll(fixed, 2, axis=0), affine)


@pytest.fixture(scope="session")
def pair_in_one_space():
    """:func:`box_pair` on the 16³ grid."""
    return box_pair()


@pytest.fixture(scope="session")
def stub_runner():
    """Factory ``stub_runner(flow, spacing=3.0, pre_grid=None)`` -> :class:`StubRunner`."""
    return StubRunner


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory, tiny_em):
    """A tiny torch checkpoint (16³ model grid at 4 mm) and three pairs of smooth-noise volumes (~20³ voxels
    at ~3 mm, the first with a label map): ``{"ckpt", "csv", "dir", "fixed", "moving": [...], "labels"}``.
    The CSV names the pairs ``p0``–``p2`` by relative paths."""
    import nibabel as nib
    from scipy.ndimage import gaussian_filter

    from emorph_deploy.data.preprocess import Preprocessing
    from emorph_deploy.train.checkpoint import save_checkpoint

    def blob(shape, seed):
        v = gaussian_filter(np.random.default_rng(seed).random(shape), 1.5).astype(np.float32)
        return (v - v.min()) / (v.max() - v.min())

    d = tmp_path_factory.mktemp("cohort")
    grid = (16, 16, 16)
    save_checkpoint(
        tiny_em(grid), d / "tiny", preprocessing=Preprocessing(grid_shape=grid, spacing_mm=(4.0,) * 3)
    )
    fixed = d / "fixed.nii.gz"
    nib.save(nib.Nifti1Image(blob((20, 22, 18), 0), np.diag([3.0, 3.0, 3.0, 1.0])), str(fixed))
    moving = []
    for i in range(3):
        path = d / f"moving{i}.nii.gz"
        nib.save(nib.Nifti1Image(blob((18, 20, 22), i + 1), np.diag([-3.2, 3.0, 2.8, 1.0])), str(path))
        moving.append(path)
    labels = d / "labels0.nii.gz"
    seg = (blob((18, 20, 22), 1) > 0.5).astype(np.uint8) * 5
    nib.save(nib.Nifti1Image(seg, np.diag([-3.2, 3.0, 2.8, 1.0])), str(labels))
    csv = d / "cohort.csv"
    csv.write_text(
        "fixed,moving,moving_labels,id\n"
        "fixed.nii.gz,moving0.nii.gz,labels0.nii.gz,p0\n"
        "fixed.nii.gz,moving1.nii.gz,,p1\n"
        "fixed.nii.gz,moving2.nii.gz,,p2\n"
    )
    return {"ckpt": d / "tiny.json", "csv": csv, "dir": d, "fixed": fixed, "moving": moving, "labels": labels}
