"""grid_sample_3d: the thread-split sampler equals F.grid_sample bit for bit, and really splits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from emorph_deploy import sampling
from emorph_deploy.sampling import grid_sample_3d


def _case(seed: int, out: tuple[int, int, int], channels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    src = torch.rand(1, channels, 9, 11, 13, generator=g)
    grid = torch.rand(1, *out, 3, generator=g) * 2.4 - 1.2  # some points outside [-1, 1]
    return src, grid


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("channels", [1, 3])
def test_equals_grid_sample_bitwise(monkeypatch, mode, padding, parts, channels):
    monkeypatch.setattr(sampling, "_MIN_POINTS_PER_PART", 16)
    src, grid = _case(0, (7, 5, 11), channels)  # 385 points: not a multiple of 2 or 3 (a tail run)
    ref = F.grid_sample(src, grid, mode=mode, padding_mode=padding, align_corners=True)
    got = grid_sample_3d(src, grid, mode=mode, padding_mode=padding, parts=parts)
    assert got.shape == ref.shape
    assert torch.equal(got, ref)


def test_splits_into_a_batch_of_views(monkeypatch):
    """The split path really runs (a batch of ``parts`` expanded views), and small calls do not split."""
    monkeypatch.setattr(sampling, "_MIN_POINTS_PER_PART", 16)
    seen: list[tuple[int, ...]] = []
    real = F.grid_sample

    def spy(inp, grid, **kw):
        seen.append(tuple(grid.shape))
        return real(inp, grid, **kw)

    monkeypatch.setattr(sampling.F, "grid_sample", spy)
    src, grid = _case(1, (4, 4, 4))  # 64 points
    grid_sample_3d(src, grid, parts=4)
    assert seen == [(4, 16, 1, 1, 3)]
    seen.clear()
    grid_sample_3d(src, grid, parts=8)  # 8 points per part < 16: plain call
    assert seen == [(1, 4, 4, 4, 3)]


def test_gradient_wrt_grid_matches(monkeypatch):
    monkeypatch.setattr(sampling, "_MIN_POINTS_PER_PART", 16)
    src, grid = _case(2, (6, 6, 6))
    g1 = grid.clone().requires_grad_(True)
    g2 = grid.clone().requires_grad_(True)
    ref = F.grid_sample(src, g1, mode="bilinear", padding_mode="zeros", align_corners=True)
    ref.square().sum().backward()
    grid_sample_3d(src, g2, mode="bilinear", padding_mode="zeros", parts=2).square().sum().backward()
    torch.testing.assert_close(g2.grad, g1.grad, rtol=0, atol=1e-6)


def test_batch_and_single_thread_fall_back(monkeypatch):
    monkeypatch.setattr(sampling, "_MIN_POINTS_PER_PART", 1)
    src, grid = _case(3, (3, 4, 5))
    src2, grid2 = torch.cat([src, src]), torch.cat([grid, grid.flip(1)])
    ref = F.grid_sample(src2, grid2, align_corners=True)
    assert torch.equal(grid_sample_3d(src2, grid2, parts=2), ref)
    assert torch.equal(grid_sample_3d(src, grid, parts=1), F.grid_sample(src, grid, align_corners=True))


def test_index_to_grid_maps_corners_to_plus_minus_one() -> None:
    import numpy as np

    from emorph_deploy.sampling import index_to_grid

    shape = (5, 7, 9)
    n = index_to_grid(shape)
    corner0 = n @ np.array([0, 0, 0, 1.0])
    corner1 = n @ np.array([4, 6, 8, 1.0])
    np.testing.assert_allclose(corner0, [-1, -1, -1, 1])
    np.testing.assert_allclose(corner1, [1, 1, 1, 1])
    # x follows the last array axis: index (0, 0, 4) → x = 2·4/8 − 1 = 0
    np.testing.assert_allclose(n @ np.array([0, 0, 4, 1.0]), [0, -1, -1, 1])
    # a volume sampled at index_to_grid of its own indices is returned unchanged
    vol = torch.arange(5 * 7 * 9, dtype=torch.float32).view(1, 1, *shape)
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    g = (np.c_[idx, np.ones(len(idx))] @ n.T)[:, :3]
    out = F.grid_sample(vol, torch.from_numpy(g).float().view(1, *shape, 3), align_corners=True)
    torch.testing.assert_close(out, vol, rtol=0, atol=1e-3)
