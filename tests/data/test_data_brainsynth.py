"""SynthMorph-style brain pairs: determinism, label/image consistency, contrast relations, deformations."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from emorph_deploy.data import brainsynth as bs
from emorph_deploy.data.brainsynth import BrainSynthConfig, BrainSynthPairs, brain_pair, heldout_pairs

SHAPE = (32, 32, 32)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _pair(seed=0, **kw):
    return brain_pair(SHAPE, seed, spacing_mm=None, **kw)


def test_pair_shapes_ranges_and_determinism():
    a, b, c = _pair((1, 2, 3)), _pair((1, 2, 3)), _pair((1, 2, 4))
    for key in ("moving", "fixed"):
        assert a[key].shape == (1, *SHAPE) and a[key].dtype == torch.float32
        assert float(a[key].min()) >= 0.0 and float(a[key].max()) <= 1.0
        assert torch.equal(a[key], b[key])  # a pure function of the seed
    assert a["moving_labels"].dtype == torch.int64
    assert not torch.equal(a["moving"], c["moving"])


def test_labels_parcellate_tissues_and_images_vanish_outside_labels():
    cfg = BrainSynthConfig(parcels=3, p_head=1.0)
    p = _pair(5, config=cfg)
    for role in ("moving", "fixed"):
        lab = p[f"{role}_labels"]
        # 6 tissue classes (brain + head shells) x 3 parcels, 0 background
        assert int(lab.max()) <= 18 and len(torch.unique(lab)) > 10
        assert float(p[role][lab == 0].abs().max()) == 0.0  # background stays zero (as the preprocessing)
        assert float((p[role] > 0).float().mean()) > 0.1


def test_subjects_differ_by_a_deformation_the_labels_carry():
    cfg = BrainSynthConfig(p_head=0.0, parcels=1)
    p = _pair(11, config=cfg)
    m, f = p["moving_labels"].numpy(), p["fixed_labels"].numpy()
    from emorph_deploy.metrics import mean_dice

    d = mean_dice(m, f)
    assert 0.2 < d < 0.95  # overlapping anatomy, not identical
    flat = brain_pair(
        SHAPE,
        11,
        spacing_mm=None,
        config=BrainSynthConfig(p_head=0.0, parcels=1, amplitude=0.0, max_disp_mm=0.0),
    )
    assert mean_dice(flat["moving_labels"].numpy(), flat["fixed_labels"].numpy()) == pytest.approx(1.0)


def test_forced_contrast_relations():
    same = heldout_pairs(3, SHAPE, None, "same")
    diff = heldout_pairs(3, SHAPE, None, "different")
    assert all(float(p["same_contrast"]) == 1.0 for p in same)
    assert all(float(p["same_contrast"]) == 0.0 for p in diff)
    for p in same:
        a, b = p["contrast"].split("/")
        assert a == b
    for p in diff:
        assert p["contrast"] != "t1/t1"
    with pytest.raises(ValueError):
        heldout_pairs(1, SHAPE, None, "both")


def test_paired_heldout_sets_differ_only_in_the_fixed_contrast():
    same = heldout_pairs(3, SHAPE, None, "same", paired=True)
    diff = heldout_pairs(3, SHAPE, None, "different", paired=True)
    for s, d in zip(same, diff, strict=True):
        # one geometry and one moving image per index: only the fixed image's rendering differs
        for key in ("moving", "moving_labels", "fixed_labels"):
            assert torch.equal(s[key], d[key]), key
        assert float(s["same_contrast"]) == 1.0 and float(d["same_contrast"]) == 0.0
        assert s["contrast"].split("/")[0] == d["contrast"].split("/")[0]
        assert (s["fixed"] - d["fixed"]).abs().max() > 0.1
    # a different index is a different geometry
    assert not torch.equal(same[0]["moving_labels"], same[1]["moving_labels"])
    # the unpaired sets (the training runs' validation) are unchanged by the option
    unpaired = heldout_pairs(1, SHAPE, None, "same")[0]
    assert torch.equal(unpaired["moving"], brain_pair(SHAPE, (20261205, 7, 0), None, None, "same")["moving"])
    with pytest.raises(ValueError, match="render_seed"):
        brain_pair(SHAPE, 1, None, render_seed=2)


def test_same_t1_contrast_keeps_intensity_order():
    # both images in the template's T1 contrast: the mean intensity of WM (tissue 3) exceeds GM (2) in both
    cfg = BrainSynthConfig(
        parcels=1,
        p_head=0.0,
        p_same_contrast=1.0,
        p_t1_given_same=1.0,
        bias_std=0.0,
        noise_std=(0.0, 0.0),
        gamma_std=0.0,
    )
    p = _pair(3, config=cfg)
    assert p["contrast"] == "t1/t1"
    for role in ("moving", "fixed"):
        img, lab = p[role], p[f"{role}_labels"]
        assert float(img[lab == 3].mean()) > float(img[lab == 2].mean()) + 0.1


def _jacobian_det(disp: torch.Tensor) -> np.ndarray:
    """det(I + grad u) of a (1, 3, D, H, W) voxel displacement, by central differences."""
    grads = np.stack(np.gradient(disp[0].numpy(), axis=(1, 2, 3)), 1)  # (3 comps, 3 axes, D, H, W)
    jac = grads + np.eye(3)[:, :, None, None, None]
    return np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))


def test_svf_displacement_is_bounded_and_invertible():
    g = torch.Generator().manual_seed(4)
    shape = (40, 48, 56)
    for kw in ({}, {"min_downsample": 2, "steps": 4}):
        disp = bs._svf_displacement(g, shape, 2.0, (6.0, 12.0), 3.0, **kw)
        assert disp.shape == (1, 3, *shape)
        # at most 3 mm = 1.5 voxels (scaling and squaring of a field scaled to that norm: within 20 %)
        assert 0.0 < float(disp.pow(2).sum(1).sqrt().max()) <= 1.5 * 1.2
        assert float(_jacobian_det(disp).min()) > 0.0  # a diffeomorphism: no folding


def test_fine_deformation_moves_labels_at_small_scale_only():
    rigid = dict(p_head=0.0, parcels=1, max_disp_mm=0.0, rotation_deg=0.0, scale=0.0, shear=0.0)
    rigid["translation_mm"] = 0.0
    from emorph_deploy.metrics import mean_dice

    # 4 mm voxels, so that the 6-12 mm fine control spacing is resolved
    def dice(seed: int, fine_mm: float) -> float:
        p = brain_pair((40, 48, 40), seed, 4.0, BrainSynthConfig(**rigid, fine_disp_mm=fine_mm))
        return mean_dice(p["moving_labels"].numpy(), p["fixed_labels"].numpy())

    assert dice(24, 0.0) == pytest.approx(1.0)  # no deformation of any kind: identical subjects
    moved = [dice(seed, 16.0) for seed in (24, 25, 26)]
    # boundaries moved by a voxel or two, the anatomy kept
    assert all(0.8 < d < 0.99 for d in moved) and np.mean(moved) < 0.95


def test_affine_fraction_scales_only_the_residual_affine():
    from emorph_deploy.metrics import mean_dice

    def dice(**kw: float) -> float:
        cfg = BrainSynthConfig(**{"p_head": 0.0, "parcels": 1, "max_disp_mm": 0.0, **kw})
        p = brain_pair((40, 48, 40), 31, 4.0, cfg)
        return mean_dice(p["moving_labels"].numpy(), p["fixed_labels"].numpy())

    assert dice(affine_fraction=0.0) == pytest.approx(1.0)  # no deformation, no affine: identical subjects
    full, small = dice(), dice(affine_fraction=0.25)
    assert full < small < 1.0  # a quarter of the affine ranges leaves a smaller relative pose
    # the deformation is not scaled: with the affine off the subjects still differ
    assert dice(affine_fraction=0.0, max_disp_mm=15.0) < 0.99


def test_integrate_zero_velocity_and_identity_sampling():
    v = torch.zeros(1, 3, 8, 9, 10)
    assert torch.equal(bs._integrate(v), v)
    src = torch.rand(1, 2, 8, 9, 10)
    out = bs._sample(src, bs._identity((8, 9, 10)), "bilinear", "zeros")
    torch.testing.assert_close(out, src, atol=1e-5, rtol=0)


def test_normalise_maps_percentiles_to_unit_range():
    img = torch.zeros(1, 1, 20, 20, 20)
    img[0, 0, 5:15, 5:15, 5:15] = torch.linspace(1, 11, 1000).reshape(10, 10, 10)
    out = bs._normalise(img)
    assert float(out.max()) == pytest.approx(1.0) and float(out[img == 0].abs().max()) == 0.0
    inside = out[img > 0]
    assert float(np.percentile(inside.numpy(), 50)) == pytest.approx(0.5, abs=0.02)


def test_dataset_keys_and_ramp():
    ds = BrainSynthPairs(4, SHAPE, seed=3, spacing_mm=None, ramp_epochs=10)
    assert len(ds) == 4 and ds.amplitude(0) == pytest.approx(0.4) and ds.amplitude(10) == pytest.approx(1.0)
    a = ds[(2, 1)]
    ds.set_epoch(2)
    assert torch.equal(a["moving"], ds[1]["moving"]) and a["index"] == 1
    with pytest.raises(IndexError):
        ds[(0, 4)]


def test_known_flow_pairs_carry_their_true_displacement():
    from emorph_deploy.models.warp import warp

    # the template's own T1 in both images, no intensity augmentation: the images differ by geometry only
    plain = dict(p_head=0.0, parcels=1, p_same_contrast=1.0, p_t1_given_same=1.0, blur_sigma_vox=(0.0, 0.0))
    plain.update(bias_std=0.0, gamma_std=0.0, noise_std=(0.0, 0.0))
    p = _pair(11, config=BrainSynthConfig(known_flow=True, **plain))
    flow = p["flow"]
    assert flow.shape == (3, *SHAPE) and flow.dtype == torch.float32 and bool(torch.isfinite(flow).all())
    assert float(flow.norm(dim=0).max()) > 0.5  # a real deformation, not the identity
    fixed, moving = p["fixed"][None], p["moving"][None]
    warped = warp(moving, flow[None])
    inside = fixed > 0.05

    def corr(a):
        return float(torch.corrcoef(torch.stack([a[inside], fixed[inside]]))[0, 1])

    # the fixed subject is the moving one at x + flow(x): warping by the true flow recovers it (up to the
    # two trilinear samplings), far better than no warp
    assert corr(warped) > 0.97 and corr(warped) > corr(moving) + 0.05
    # off: no flow, and the two subjects independent
    off = _pair(11, config=BrainSynthConfig(**plain))
    assert "flow" not in off and not torch.equal(off["fixed"], p["fixed"])


def test_same_subject_pairs_are_near_identical_at_random_strength():
    from emorph_deploy.models.warp import warp

    plain = dict(p_head=0.0, parcels=1, p_same_contrast=1.0, p_t1_given_same=1.0, blur_sigma_vox=(0.0, 0.0))
    plain.update(bias_std=0.0, gamma_std=0.0, noise_std=(0.0, 0.0))
    # every pair one subject, with the true flow kept so the pair can be checked against it
    cfg = BrainSynthConfig(p_same_subject=1.0, known_flow=True, **plain)
    pairs = [_pair(s, config=cfg) for s in range(6)]
    assert all(p["same_subject"] for p in pairs)
    sizes = [float(p["flow"].norm(dim=0).max()) for p in pairs]
    full = [
        float(_pair(s, config=replace(cfg, p_same_subject=0.0))["flow"].norm(dim=0).max()) for s in range(6)
    ]
    # random strength: smaller than the full-strength relative maps on average, and spread out
    assert np.mean(sizes) < np.mean(full) and max(sizes) > 2 * min(sizes)
    p = pairs[0]
    fixed, warped = p["fixed"][None], warp(p["moving"][None], p["flow"][None])
    inside = fixed > 0.05
    assert float(torch.corrcoef(torch.stack([warped[inside], fixed[inside]]))[0, 1]) > 0.97
    # a share in between mixes both kinds; off, no pair is one subject
    mixed = [_pair(s, config=BrainSynthConfig(p_same_subject=0.5))["same_subject"] for s in range(12)]
    assert 0 < sum(mixed) < 12
    assert not any(_pair(s)["same_subject"] for s in range(3))


def test_shapes_pairs_replace_the_parcels_inside_the_head():
    cfg = BrainSynthConfig(p_shapes=1.0, p_head=0.0)
    p = _pair(3, config=cfg)
    brain = _pair(3, config=BrainSynthConfig(p_head=0.0))
    assert p["shapes"] and not brain["shapes"] and p["contrast"] == "labels/labels"
    k = int(p["moving_labels"].max())
    assert cfg.shape_labels[0] <= k <= cfg.shape_labels[1] and k > int(brain["moving_labels"].max())
    # the outline is the head's (here the brain's): shapes only where the tissue map has a label
    inside = torch.zeros(1, 1, *SHAPE, dtype=torch.bool)
    inside[..., 4:-4, 5:-5, 6:-6] = True
    shapes = bs._shape_labels(torch.Generator().manual_seed(0), inside, 4.0, cfg)
    assert torch.equal(shapes > 0, inside)
    n_p, n_b = int((p["moving_labels"] > 0).sum()), int((brain["moving_labels"] > 0).sum())
    assert 0.8 < n_p / n_b < 1.25  # another subject of the same brain, not a box
    # the images follow the shapes: each label has its own mean, so the labels explain most of the variance
    img, lab = p["moving"][0], p["moving_labels"][0]
    inside = lab > 0
    means = torch.zeros(k + 1).index_add_(0, lab[inside], img[inside]) / torch.bincount(
        lab[inside], minlength=k + 1
    ).clamp_min(1)
    resid = img[inside] - means[lab[inside]]
    assert float(resid.var()) < 0.5 * float(img[inside].var())
    mixed = [_pair(s, config=BrainSynthConfig(p_shapes=0.5))["shapes"] for s in range(12)]
    assert 0 < sum(mixed) < 12
