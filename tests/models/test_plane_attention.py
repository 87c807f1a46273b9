"""Plane attention: matches a loop reference, outputs follow their voxels (un-permute), batches never mix."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from emorph_deploy.models.layers import CascadedGroupPlaneAttention, PlaneAttention, plane_attention


@pytest.fixture(autouse=True)
def _single_thread():
    """2 shared cores: intra-op threads only contend on these tiny problems (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


PLANES = [(1, 2), (2, 3), (3, 1)]
GRID = (4, 5, 6)  # (D, H, W), all different so axis mix-ups change shapes/values


def reference_plane_attention(q, k, v, plane, heads):
    """Loops over voxels: token = plane position, vector = its head channels concatenated along the stack."""
    q, k, v = (t.double().numpy() for t in (q, k, v))
    bsz, c = q.shape[0], q.shape[-1]
    a, b = plane
    s = 6 - a - b
    sizes = q.shape[1:4]
    na, nb, ns = sizes[a - 1], sizes[b - 1], sizes[s - 1]
    g = c // heads
    out = np.zeros_like(q)

    def voxel(ia, ib, is_):
        idx = [0, 0, 0]
        idx[a - 1], idx[b - 1], idx[s - 1] = ia, ib, is_
        return tuple(idx)

    positions = [(ia, ib) for ia in range(na) for ib in range(nb)]
    for bi in range(bsz):
        for h in range(heads):
            ch = slice(h * g, (h + 1) * g)

            def tokens(t, bi=bi, ch=ch):
                return np.stack(
                    [
                        np.concatenate([t[(bi, *voxel(ia, ib, i))][ch] for i in range(ns)])
                        for ia, ib in positions
                    ]
                )  # (N, S·g)

            tq, tk, tv = tokens(q), tokens(k), tokens(v)
            logits = tq @ tk.T / math.sqrt(ns * g)
            attn = np.exp(logits - logits.max(axis=1, keepdims=True))
            attn /= attn.sum(axis=1, keepdims=True)
            to = attn @ tv  # (N, S·g)
            for n, (ia, ib) in enumerate(positions):
                for i in range(ns):
                    out[(bi, *voxel(ia, ib, i))][ch] = to[n, i * g : (i + 1) * g]
    return out


@pytest.mark.parametrize("plane", PLANES)
@pytest.mark.parametrize("heads", [1, 2])
def test_matches_loop_reference(plane, heads):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, *GRID, 4, generator=g) for _ in range(3))
    out = plane_attention(q, k, v, plane, heads)
    np.testing.assert_allclose(
        out.double().numpy(), reference_plane_attention(q, k, v, plane, heads), atol=1e-5, rtol=0
    )
    out_static = plane_attention(q, k, v, plane, heads, shape=(*GRID, 4))
    torch.testing.assert_close(out_static, out, atol=0, rtol=0)


def _permute_plane_positions(x, plane, perm):
    """Apply a permutation of the N plane positions (same for every slice along the stacking axis)."""
    a, b = plane
    s = 6 - a - b
    xp = x.permute(0, a, b, s, 4)  # (B, A, Bp, S, C)
    shp = xp.shape
    xp = xp.reshape(shp[0], shp[1] * shp[2], shp[3], shp[4])[:, perm].reshape(shp)
    inv = [(0, a, b, s, 4).index(i) for i in range(5)]
    return xp.permute(*inv)


@pytest.mark.parametrize("plane", PLANES)
@pytest.mark.parametrize("cls", [PlaneAttention, CascadedGroupPlaneAttention])
def test_outputs_follow_their_voxels(plane, cls):
    torch.manual_seed(0)
    attn = cls(8, 2, plane, GRID).eval()
    x = torch.randn(1, *GRID, 8)
    y = attn(x)
    a, b = plane
    n = GRID[a - 1] * GRID[b - 1]
    s_axis = 6 - a - b
    # 1) moving one feature column (all slices) to another plane position moves its output with it
    swap = torch.arange(n)
    swap[[0, n - 1]] = swap[[n - 1, 0]]
    # 2) any permutation of the plane positions permutes the output equally
    perm = torch.randperm(n)
    for p in (swap, perm):
        xp = _permute_plane_positions(x, plane, p)
        torch.testing.assert_close(attn(xp), _permute_plane_positions(y, plane, p), atol=1e-5, rtol=0)
    # 3) reordering the stacking axis reorders the output (each slice keeps its own output)
    sperm = torch.randperm(GRID[s_axis - 1])
    torch.testing.assert_close(
        attn(x.index_select(s_axis, sperm)), y.index_select(s_axis, sperm), atol=1e-5, rtol=0
    )
    # 4) a different permutation per slice is *not* a symmetry (tokens span the stacking axis)
    mixed = torch.cat(
        [
            _permute_plane_positions(sl, plane, torch.randperm(n) if i else torch.arange(n))
            for i, sl in enumerate(x.split(1, dim=s_axis))
        ],
        dim=s_axis,
    )
    assert not torch.allclose(attn(mixed), y, atol=1e-3)


@pytest.mark.parametrize("cls", [PlaneAttention, CascadedGroupPlaneAttention])
def test_batch_items_never_mix(cls):
    torch.manual_seed(0)
    for plane in PLANES:
        attn = cls(8, 4, plane).eval()
        x = torch.randn(3, *GRID, 8)
        y = attn(x)
        for i in range(3):
            torch.testing.assert_close(attn(x[i : i + 1]), y[i : i + 1], atol=1e-6, rtol=0)


def test_plane_attention_module_is_reference_plus_projections():
    torch.manual_seed(0)
    attn = PlaneAttention(8, 2, (3, 1), GRID)
    assert attn.qkv.bias is None
    x = torch.randn(2, *GRID, 8)
    q, k, v = attn.qkv(x).split(8, dim=-1)
    ref = reference_plane_attention(q.detach(), k.detach(), v.detach(), (3, 1), 2)
    expected = attn.proj(torch.from_numpy(ref).float())
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=0)
