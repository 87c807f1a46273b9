"""Registration options of issues 15/20: one set of defaults, masks (affine fit, refinement, QC), the QC
region and Dice, an initial affine, and output prefixes (``Result.save``)."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is needed for the registration pipeline")

from emorph_deploy.errors import InputError, OutputExistsError  # noqa: E402
from emorph_deploy.registration import DEFAULTS, Registrar, RegistrationDefaults  # noqa: E402
from emorph_deploy.registration.affine import affine_prealign  # noqa: E402

GRID = (16, 16, 16)


# ------------------------------------------------------------------------------------------------ defaults
def test_one_frozen_set_of_defaults_feeds_the_api():
    from emorph_deploy.refine import RefineConfig
    from emorph_deploy.registration.batch import PairOptions, run_batch
    from emorph_deploy.registration.cluster import run_batch_dask
    from emorph_deploy.registration.pipeline import Result, _refine_config

    assert dataclasses.is_dataclass(RegistrationDefaults) and RegistrationDefaults.__dataclass_params__.frozen
    assert RegistrationDefaults() == DEFAULTS and DEFAULTS.affine is True
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULTS.affine = False  # type: ignore[misc]
    assert inspect.signature(Registrar).parameters["affine"].default is DEFAULTS.affine
    assert inspect.signature(run_batch_dask).parameters["affine"].default is DEFAULTS.affine
    save = inspect.signature(Result.save).parameters
    assert save["qc_png"].default is DEFAULTS.qc_png and save["voxel_flow"].default is DEFAULTS.voxel_flow
    batch = inspect.signature(run_batch).parameters
    assert batch["qc_png"].default is DEFAULTS.qc_png and batch["voxel_flow"].default is DEFAULTS.voxel_flow
    opts = PairOptions()
    assert (opts.qc_png, opts.voxel_flow, opts.refine) == (DEFAULTS.qc_png, DEFAULTS.voxel_flow, None)
    # register(refine=None) and refine=N take the defaults' refinement (N replaces only the steps)
    cfg = DEFAULTS.refine_config()
    assert _refine_config(None) == cfg and cfg.steps == DEFAULTS.refine_steps
    assert _refine_config(3) == dataclasses.replace(cfg, steps=3)
    assert (cfg.levels, cfg.full_steps, cfg.similarity) == (
        DEFAULTS.refine_levels,
        DEFAULTS.refine_full_steps,
        DEFAULTS.refine_similarity,
    )
    plain = RefineConfig()  # RefineConfig's own defaults are these too (steps=0: off)
    assert (plain.levels, plain.full_steps, plain.similarity) == (cfg.levels, cfg.full_steps, cfg.similarity)
    with pytest.raises(InputError, match="refine"):
        _refine_config(-1)


def test_registration_defaults_import_no_torch():
    import subprocess
    import sys

    code = (
        "import sys; from emorph_deploy.registration.defaults import DEFAULTS; "
        "import emorph_deploy.cli.app; print('torch' in sys.modules, 'numpy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# ------------------------------------------------------------------------------------------------ affine fit
@pytest.fixture(scope="module")
def brain():
    """MNI152 at 3 mm and a copy moved by a known affine onto an oblique grid (test_affine's construction)."""
    pytest.importorskip("nilearn", reason="nilearn ships the MNI152 template")
    from test_affine import _known_affine, _moved

    from emorph_deploy.data.synthetic import mni152_images

    img = mni152_images(3)[0]
    fixed = np.asarray(img.dataobj, dtype=np.float32)
    a_f = np.asarray(img.affine, dtype=np.float64)
    t_true = _known_affine()
    moving, a_m = _moved(fixed, a_f, t_true)
    return fixed, a_f, moving.astype(np.float32), a_m, t_true


@pytest.mark.parametrize("role", ["fixed", "moving"])
def test_masks_keep_the_affine_fit_off_a_distractor(brain, role):
    """A bright slab outside the brain misleads the fit; the mask that leaves it out restores the known
    affine."""
    from test_affine import _errors

    fixed, a_f, moving, a_m, t_true = brain
    img = (fixed if role == "fixed" else moving).copy()
    mask = img > 0.05 * img.max()
    sl = np.s_[:, -14:, :] if role == "fixed" else np.s_[:, :12, :]
    img[sl] = img.max()
    mask[sl] = False
    f, m = (img, moving) if role == "fixed" else (fixed, img)
    plain = affine_prealign(f, a_f, m, a_m)
    masked = affine_prealign(f, a_f, m, a_m, **{f"{role}_mask": np.ascontiguousarray(mask)})
    # a mask in the other memory order (nibabel reads NIfTI in Fortran order) gives the same fit
    other = affine_prealign(f, a_f, m, a_m, **{f"{role}_mask": np.asfortranarray(mask)})
    np.testing.assert_allclose(other.matrix, masked.matrix, atol=1e-9, rtol=0)
    err_plain = _errors(plain.matrix, t_true)
    err_lin, err_t = _errors(masked.matrix, t_true)
    print(f"{role} mask: plain {err_plain}, masked ({err_lin:.4f}, {err_t:.2f} mm)")
    assert masked.accepted and err_lin <= 0.02 and err_t <= 1.0
    assert err_plain[1] > 2.0 or not plain.accepted  # without the mask the slab wins (or the check rejects)


def test_initial_affine_starts_the_fit_and_is_kept_when_it_cannot_be_improved(brain):
    from test_affine import _errors

    fixed, a_f, moving, a_m, t_true = brain
    start = np.linalg.inv(t_true)
    start[:3, 3] += [4.0, -3.0, 2.0]  # 5.4 mm off
    res = affine_prealign(fixed, a_f, moving, a_m, initial=start)
    err_lin, err_t = _errors(res.matrix, t_true)
    assert res.accepted and res.start == "initial" and err_lin <= 0.02 and err_t <= 1.0
    # an initial affine on noise: the check keeps the start itself, not the identity
    noise = np.random.default_rng(0).random(moving.shape).astype(np.float32)
    bad = affine_prealign(fixed, a_f, noise, a_m, initial=start)
    assert not bad.accepted and np.array_equal(bad.matrix, start)
    from emorph_deploy.registration.affine import rejection_warning

    qc = {"affine_accepted": False, "affine_source": "initial+fit", "affine_reason": bad.reason}
    assert rejection_warning(qc).startswith("warning: affine pre-alignment rejected, initial affine kept: ")


# ------------------------------------------------------------------------------------------------ refinement
def test_refinement_weight_is_the_fixed_mask():
    """All-ones weights give the plain losses; a local mask moves only the flow within the similarity's
    reach."""
    from emorph_deploy.choices import Similarity
    from emorph_deploy.refine import _Objective, refine_flow

    g = torch.Generator().manual_seed(0)
    shape = (1, 1, 16, 16, 16)
    fixed = torch.nn.functional.avg_pool3d(torch.rand(shape, generator=g), 3, 1, 1)
    moving = torch.roll(fixed, 1, dims=2)
    for sim in (Similarity.ncc, Similarity.mind, Similarity.ngf):
        obj = _Objective(sim, 9, 1.5, torch.device("cpu"))
        target = obj.target(fixed)
        plain, ones = obj.loss(moving, target), obj.loss(moving, target, torch.ones(shape))
        torch.testing.assert_close(ones, plain, atol=1e-6, rtol=0, msg=sim.value)
        half = torch.zeros(shape)
        half[..., :8] = 1.0
        assert abs(float(obj.loss(moving, target, half)) - float(plain)) > 1e-5, sim.value
    flow0 = torch.zeros(1, 3, *shape[2:])
    mask = torch.zeros(shape)
    mask[..., 6:10, 6:10, 6:10] = 1.0
    out = refine_flow(
        moving, fixed, flow0, steps=3, levels=1, reg_weight=0.0, similarity="ncc", fixed_mask=mask
    )
    moved = out.abs().amax(dim=1)[0] > 0  # (D, H, W)
    reach = torch.zeros(shape[2:], dtype=torch.bool)
    reach[1:15, 1:15, 1:15] = True  # the mask dilated by the NCC window's radius (4) plus one voxel of warp
    assert moved[6:10, 6:10, 6:10].all() and not (moved & ~reach).any()
    with pytest.raises(InputError, match="fixed_mask"):
        refine_flow(moving, fixed, flow0, steps=1, fixed_mask=torch.ones(1, 1, 4, 4, 4))


def test_weighted_similarity_maps_average_to_the_losses():
    from emorph_deploy.losses import MINDSSCLoss, NGFLoss

    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(1, 1, 12, 12, 12, generator=g), torch.rand(1, 1, 12, 12, 12, generator=g)
    ngf = NGFLoss()
    torch.testing.assert_close(1.0 - ngf.cos2(a, b).mean(), ngf(a, b))
    mind = MINDSSCLoss()
    da, db = mind.descriptor(a), mind.descriptor(b)
    torch.testing.assert_close(MINDSSCLoss.distance_map(da, db).mean(), MINDSSCLoss.distance(da, db))


# ------------------------------------------------------------------------------------------------ QC
def test_fixed_foreground_fills_dark_holes_and_skips_the_background():
    from emorph_deploy.qc import fixed_foreground

    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[:32, :32, :32]
    r = np.sqrt((z - 16) ** 2 + (y - 16) ** 2 + (x - 16) ** 2)
    img = np.where(r < 11, 0.8, 0.0) + 0.01 * rng.random((32, 32, 32))
    img[r < 4] = 0.03  # a dark "ventricle" inside
    fg = fixed_foreground(img.astype(np.float32))
    assert fg is not None and fg[r < 9].all() and not fg[r > 14].any()
    assert fixed_foreground(np.zeros((8, 8, 8), np.float32)) is None


def test_fill_holes_equals_scipy_binary_fill_holes():
    """qc.fill_holes (one labelling of the background) gives scipy's binary_fill_holes on random blobby
    masks with enclosed and border-touching background, an all-foreground and an all-background volume."""
    from scipy.ndimage import binary_fill_holes, gaussian_filter

    from emorph_deploy.qc import fill_holes

    rng = np.random.default_rng(1)
    masks = [gaussian_filter(rng.random((20, 23, 17)), 2.0) > t for t in (0.45, 0.5, 0.55) for _ in range(5)]
    masks += [np.ones((4, 5, 6), bool), np.zeros((4, 5, 6), bool)]
    shell = np.zeros((9, 9, 9), bool)
    shell[1:8, 1:8, 1:8] = True
    shell[3:6, 3:6, 3:6] = False  # an enclosed hole
    masks.append(shell)
    for m in masks:
        np.testing.assert_array_equal(fill_holes(m), binary_fill_holes(m))
    filled = fill_holes(shell)
    assert filled[4, 4, 4] and not filled[0, 0, 0]  # the hole filled, the outside left alone


def _stub_pair(stub_runner):
    rng = np.random.default_rng(3)
    fixed = np.zeros(GRID, np.float32)
    fixed[3:13, 4:12, 2:14] = 0.6
    fixed[6:10, 6:10, 6:10] = 1.0
    fixed += 0.02 * rng.random(GRID, dtype=np.float32)
    moving = np.roll(fixed, 1, axis=0)
    a = np.diag([3.0, 3.0, 3.0, 1.0])
    flow = 0.3 * np.ones((3, *GRID), np.float32)
    return Registrar(stub_runner(flow), affine=False, warmup=False), (fixed, a), (moving, a)


def test_qc_ncc_inside_the_fixed_foreground_or_mask(stub_runner):
    from emorph_deploy.qc import fixed_foreground, region_ncc
    from emorph_deploy.registration.pipeline import load_inputs

    reg, fixed, moving = _stub_pair(stub_runner)
    q = reg.register(fixed, moving).qc
    assert q["qc_region"] == "fixed-foreground" and q["masks"] == {"fixed": False, "moving": False}
    f_img, m_img, _ = load_inputs(fixed, moving)
    f, m = np.asanyarray(f_img.dataobj), np.asanyarray(m_img.dataobj)
    mask = np.zeros(GRID, np.uint8)
    mask[5:11, 5:11, 5:11] = 1
    pair = reg._to_model_grid(f_img, f, f_img.affine, m, m_img.affine, None, mask.astype(bool))
    fg = fixed_foreground(pair.fixed)
    assert fg is not None and 0 < fg.sum() < fg.size
    assert q["ncc_before"] == pytest.approx(region_ncc(pair.fixed, pair.moving_unaligned, fg), abs=1e-6)
    whole = region_ncc(pair.fixed, pair.moving_unaligned, None)
    assert abs(q["ncc_before"] - whole) > 1e-3  # the background no longer counts
    masked = reg.register(fixed, moving, fixed_mask=(mask, fixed[1])).qc
    assert masked["qc_region"] == "fixed-mask" and masked["masks"]["fixed"] is True
    inside = pair.fixed_mask >= 0.5
    assert masked["ncc_before"] == pytest.approx(
        region_ncc(pair.fixed, pair.moving_unaligned, inside), abs=1e-6
    )


def test_masks_and_fixed_labels_must_be_on_their_images_grid(stub_runner):
    reg, fixed, moving = _stub_pair(stub_runner)
    mask = np.ones(GRID, np.uint8)
    with pytest.raises(
        InputError, match=r"fixed mask: expected the fixed image's grid .*got shape \(8, 8, 8\)"
    ):
        reg.register(fixed, moving, fixed_mask=(np.ones((8, 8, 8), np.uint8), fixed[1]))
    with pytest.raises(InputError, match=r"moving mask: .*another affine"):
        reg.register(fixed, moving, moving_mask=(mask, np.diag([2.0, 3.0, 3.0, 1.0])))
    with pytest.raises(InputError, match="fixed labels: "):
        reg.register(fixed, moving, fixed_labels=(np.ones((8, 8, 8), np.uint8), fixed[1]))
    with pytest.raises(InputError, match="all-zero"):
        reg.register(fixed, moving, fixed_mask=(np.zeros(GRID, np.uint8), fixed[1]))


def test_dice_before_and_after_with_fixed_labels(stub_runner):
    from emorph_deploy.metrics import dice_per_label

    reg, fixed, moving = _stub_pair(stub_runner)
    f_lab = (fixed[0] > 0.3).astype(np.uint8) + (fixed[0] > 0.8).astype(np.uint8)  # labels 1, 2
    m_lab = np.roll(f_lab, 1, axis=0)
    res = reg.register(fixed, moving, labels=(m_lab, moving[1]), fixed_labels=(f_lab, fixed[1]))
    q = res.qc
    after = dice_per_label(f_lab, np.asanyarray(res.warped_labels.dataobj))
    before = dice_per_label(f_lab, m_lab)  # same grid: no registration = the moving labels as they are
    assert q["dice_per_label_after"] == after and q["dice_per_label_before"] == before
    assert q["dice_after"] == pytest.approx(np.mean(list(after.values())), abs=1e-12)
    assert q["dice_before"] == pytest.approx(np.mean(list(before.values())), abs=1e-12)
    assert set(after) == {1, 2}
    assert (
        "dice_after" not in reg.register(fixed, moving, fixed_labels=(f_lab, fixed[1])).qc
    )  # no moving labels


# ----------------------------------------------------------------------------------------- initial affine
def test_initial_affine_without_the_fit_is_the_prealignment(stub_runner, tmp_path):
    from emorph_deploy.data.transforms import read_itk_affine, write_itk_affine

    reg, fixed, moving = _stub_pair(stub_runner)
    t = np.eye(4)
    t[:3, 3] = [3.0, 0.0, 0.0]  # one voxel: moving(T p) = fixed(p) for the roll
    res = reg.register(fixed, moving, initial_affine=t)
    np.testing.assert_array_equal(res.pre_affine, t)
    assert res.qc["affine_prealignment"] is True and res.qc["affine_source"] == "initial"
    written = res.save(tmp_path / "o", qc_png=False)
    np.testing.assert_allclose(read_itk_affine(written["affine"]), t, atol=1e-12)
    write_itk_affine(tmp_path / "t.txt", t)  # a file works the same
    again = reg.register(fixed, moving, initial_affine=tmp_path / "t.txt")
    np.testing.assert_allclose(
        np.asanyarray(again.warped.dataobj), np.asanyarray(res.warped.dataobj), atol=1e-6, rtol=0
    )
    with pytest.raises(InputError, match="initial affine"):
        reg.register(fixed, moving, initial_affine=np.zeros((4, 4)))
    with pytest.raises(InputError, match="initial affine"):
        reg.register(fixed, moving, initial_affine=tmp_path / "missing.mat")


# ------------------------------------------------------------------------------------------------ prefix
def test_prefixed_output_sets_are_separate(stub_runner, tmp_path):
    reg, fixed, moving = _stub_pair(stub_runner)
    res = reg.register(fixed, moving)
    out = tmp_path / "o"
    a = res.save(out, prefix="sub01_")
    assert {p.name for p in a.values()} == {p.name for p in out.iterdir()}
    assert all(p.name.startswith("sub01_") for p in a.values()) and "sub01_qc.png" in {
        p.name for p in a.values()
    }
    res.save(out, prefix="sub02_")
    with pytest.raises(OutputExistsError, match="sub01_"):
        res.save(out, prefix="sub01_")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name.startswith("sub02_")}
    res.save(out, force=True, prefix="sub01_", qc_png=False)  # the whole sub01_ set, nothing else
    names = {p.name for p in out.iterdir()}
    assert "sub01_qc.png" not in names and "sub01_warped.nii.gz" in names
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name.startswith("sub02_")} == before
    assert not [n for n in names if n.startswith(".")]
    import json

    assert json.loads((out / "sub01_qc.json").read_text())["outputs"]["warped"] == "sub01_warped.nii.gz"
    for bad in ("a/b", ".hidden", " x"):
        with pytest.raises(InputError, match="--prefix"):
            res.save(out, prefix=bad)
