"""Synthetic pairs: determinism per seed, the returned flow is the true deformation, offline MNI152
templates."""

from __future__ import annotations

import socket

import numpy as np
import pytest
from scipy.ndimage import map_coordinates

from emorph_deploy.data.synthetic import (
    SyntheticPairs,
    iter_pairs,
    load_template,
    random_displacement,
    synth_pair,
    template_pair,
)

SHAPE = (32, 36, 40)


def _scipy_warp(src: np.ndarray, flow: np.ndarray, order: int) -> np.ndarray:
    """Independent reference: out(x) = src(x + flow(x)), voxel centres at integer indices."""
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in src.shape], indexing="ij"))
    return map_coordinates(src.astype(np.float64), grid + flow, order=order, mode="grid-constant", cval=0.0)


def _jacobian_det(flow: np.ndarray) -> np.ndarray:
    grads = (
        np.stack(np.gradient(flow.astype(np.float64), axis=(1, 2, 3)), 1) + np.eye(3)[:, :, None, None, None]
    )
    return np.linalg.det(np.moveaxis(grads, (0, 1), (-2, -1)))


def test_deterministic_per_seed() -> None:
    a = synth_pair(SHAPE, seed=3, n_labels=8)
    b = synth_pair(SHAPE, seed=3, n_labels=8)
    c = synth_pair(SHAPE, seed=4, n_labels=8)
    for key in ("moving", "fixed", "moving_labels", "fixed_labels", "flow"):
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a.moving, c.moving)
    assert not np.array_equal(a.flow, c.flow)


def test_pair_shapes_ranges_and_dtypes() -> None:
    p = synth_pair(SHAPE, seed=0, n_labels=8, max_disp=3.0)
    assert p.moving.shape == p.fixed.shape == SHAPE and p.flow.shape == (3, *SHAPE)
    assert p.moving.dtype == p.fixed.dtype == p.flow.dtype == np.float32
    assert p.moving_labels.dtype == p.fixed_labels.dtype == np.int32
    for img in (p.moving, p.fixed):
        assert img.min() >= 0.0 and img.max() <= 1.0 and img.std() > 0.05
    assert len(np.unique(p.moving_labels)) >= 6
    norm = np.sqrt((p.flow**2).sum(0))
    assert 1.0 < norm.max() < 3.0 * 1.5  # configured magnitude (velocity max 3 voxels)
    assert _jacobian_det(p.flow).min() > 0.0  # diffeomorphic: no folding
    t = p.to_tensors()
    assert tuple(t["moving"].shape) == (1, *SHAPE) and tuple(t["flow"].shape) == (3, *SHAPE)


def test_returned_flow_is_the_true_deformation() -> None:
    """fixed(x) = moving(x + flow(x)) before intensity augmentation, checked with independent samplers."""
    p = synth_pair(SHAPE, seed=5, n_labels=8, max_disp=4.0, augment=False)
    ref = _scipy_warp(p.moving, p.flow, order=1)
    np.testing.assert_allclose(p.fixed, ref, atol=1e-4)
    ref_lab = _scipy_warp(p.moving_labels, p.flow, order=0)
    assert np.mean(ref_lab == p.fixed_labels) > 0.999  # only exact .5 ties may round differently
    # the flow is not trivial: the identity is a worse model of fixed than the flow
    assert np.abs(p.fixed - p.moving).mean() > 5 * np.abs(p.fixed - ref).mean() + 1e-3
    try:
        import torch

        from emorph_deploy.models.warp import warp
    except ImportError:
        pytest.skip("emorph_deploy.models.warp not available: checked against scipy only")
    with torch.no_grad():
        out = warp(torch.from_numpy(p.moving)[None, None], torch.from_numpy(p.flow)[None])[0, 0].numpy()
    np.testing.assert_allclose(out, p.fixed, atol=1e-4)


def test_augmented_pair_still_follows_flow() -> None:
    p = synth_pair(SHAPE, seed=6, n_labels=8)
    warped = _scipy_warp(p.moving, p.flow, order=1)
    before = np.corrcoef(p.moving.ravel(), p.fixed.ravel())[0, 1]
    after = np.corrcoef(warped.ravel(), p.fixed.ravel())[0, 1]
    assert after > before + 0.05 and after > 0.8


def test_non_diffeomorphic_magnitude() -> None:
    f = random_displacement(SHAPE, 1, max_disp=2.5, diffeomorphic=False)
    np.testing.assert_allclose(np.sqrt((f**2).sum(0)).max(), 2.5, rtol=0.05)


def test_template_pair_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    tpl = load_template(SHAPE)
    assert tpl.image.shape == SHAPE and set(np.unique(tpl.labels)) == {0, 1, 2, 3}
    assert (tpl.labels == 3).sum() > 500 and (tpl.labels == 2).sum() > 500
    p = template_pair(SHAPE, seed=1, augment=False)
    assert set(np.unique(p.fixed_labels)) == {0, 1, 2, 3}
    np.testing.assert_allclose(p.fixed, _scipy_warp(p.moving, p.flow, order=1), atol=1e-4)
    q = template_pair(SHAPE, seed=1)
    r = template_pair(SHAPE, seed=1)
    np.testing.assert_array_equal(q.fixed, r.fixed)
    assert q.moving.min() >= 0 and q.moving.max() <= 1


def test_dataset_and_iterator() -> None:
    ds = SyntheticPairs(length=3, shape=(16, 16, 16), seed=2, kind="mix")
    assert len(ds) == 3
    a, b = ds[0], ds[0]
    for key in ("moving", "fixed", "moving_labels", "fixed_labels", "flow"):
        np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())
    assert tuple(a["moving"].shape) == (1, 16, 16, 16) and str(a["fixed_labels"].dtype) == "torch.int64"
    ds.set_epoch(1)
    assert not np.array_equal(ds[0]["moving"].numpy(), a["moving"].numpy())
    pairs = list(iter_pairs(2, shape=(16, 18, 20), seed=0, n_labels=4))
    assert len(pairs) == 2 and pairs[0].moving.shape == (16, 18, 20)
    assert not np.array_equal(pairs[0].moving, pairs[1].moving)
    with pytest.raises(IndexError):
        ds[3]
